"""launch/tpu_vm.py and launch/slurm.py: the commands and scripts they print, flag errors,
and the scripts run locally.

tpu_vm.py is always run with --dry-run (or with gcloud hidden from PATH), so nothing here
talks to Google Cloud. The remote run/wait/stop scripts are executed with a local bash against
a fake home directory to check their quoting, logging, signals and exit-status handling. The
--until-done loop is checked three ways: the commands a dry run prints for scripted outcomes
(--simulate), decide() case by case, and until_done() against a fake runner. slurm.py's batch
script is checked line by line and run with bash against stand-ins for srun, scontrol and
score_jax.main.
"""
import importlib.util
import os
import signal
import time
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "launch" / "tpu_vm.py"
SLURM = REPO_ROOT / "launch" / "slurm.py"
BASE = ["--name=score-t", "--zone=us-west4-a", "--config=configs/sft.py"]


def launch(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


def dry_run(*args) -> list:
    """The printed commands, each split back into its argv."""
    result = launch(*args, "--dry-run")
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def remote_command(argv: list) -> str:
    """The remote shell string of a `gcloud ... ssh` argv."""
    [flag] = [a for a in argv if a.startswith("--command=")]
    return flag[len("--command="):]


def test_single_host_commands_in_order():
    tarball = os.path.join(tempfile.gettempdir(), "score_jax-score-t.tar.gz")
    cmds = dry_run(*BASE, "--workdir=runs/sft", "--delete-after")
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    zone = "--zone=us-west4-a"
    assert cmds[0] == tpu + ["create", "score-t", zone, "--accelerator-type=v5litepod-8",
                             "--version=v2-alpha-tpuv5-lite"]
    assert cmds[1] == ["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz",
                       f"--output={tarball}", "HEAD"]
    assert cmds[2] == tpu + ["scp", tarball, "score-t:score_jax.tar.gz", zone]
    assert cmds[3][:7] == tpu + ["ssh", "score-t", zone]
    assert "tar -xzf score_jax.tar.gz -C score_jax" in remote_command(cmds[3])
    setup = remote_command(cmds[4])
    assert "install -y -qq bubblewrap python3.11 python3.11-venv" in setup
    assert "python3.11 -m venv score_jax_venv" in setup
    assert "pip install -q -r score_jax/requirements.txt" in setup
    assert '"jax[tpu]==0.10.2" -f https://storage.googleapis.com/jax-releases/' in setup
    assert "python -u -m score_jax.main --config=configs/sft.py" in remote_command(cmds[5])
    assert "tail -n 50 -f" in remote_command(cmds[6])
    assert cmds[7] == ["mkdir", "-p", "tpu_runs/score-t"]
    assert cmds[8] == tpu + ["scp", "score-t:runs/sft", "tpu_runs/score-t", zone, "--recurse"]
    assert cmds[9] == tpu + ["scp", "score-t:score_jax_logs/score-t.log", "tpu_runs/score-t",
                             zone]
    assert cmds[10] == tpu + ["delete", "score-t", zone, "--quiet"]
    assert len(cmds) == 11
    assert not any("--worker=all" in c for c in cmds)


def test_pod_runs_on_all_workers_and_fetches_from_gcs():
    cmds = dry_run(*BASE, "--accelerator=v5litepod-16", "--spot", "--project=proj",
                   "--workdir=gs://bucket/runs/sft", "--repo-url=https://example.com/r.git")
    create, clone, setup, run, wait, mkdir, pull, log = cmds
    assert "--spot" in create and "--accelerator-type=v5litepod-16" in create
    for ssh in (clone, setup, run, wait):
        assert ssh[4] == "ssh" and "--worker=all" in ssh and "--project=proj" in ssh
    assert remote_command(clone).startswith(
        "rm -rf score_jax && git clone https://example.com/r.git score_jax")
    assert "--workdir=gs://bucket/runs/sft --config.distributed=True;" in remote_command(run)
    assert pull == ["gcloud", "storage", "cp", "--recursive", "gs://bucket/runs/sft",
                    "tpu_runs/score-t"]
    assert "--worker=all" not in log  # the log is fetched from worker 0 only


def test_overrides_pass_through_quoted():
    [run] = dry_run(*BASE, "--workdir=/abs/run", "--steps=run",
                    "--config.run_name=my run", "--config.learner.lr=1e-5")
    words = shlex.split(remote_command(run))
    start = words.index("-m")
    assert words[start + 1:start + 6] == [
        "score_jax.main", "--config=configs/sft.py", "--workdir=/abs/run",
        "--config.run_name=my run", "--config.learner.lr=1e-5;"]


def test_pod_keeps_an_explicit_distributed_override():
    [run] = dry_run(*BASE, "--accelerator=v4-16", "--workdir=gs://b/r", "--steps=run",
                    "--config.distributed=False")
    assert shlex.split(remote_command(run)).count("--config.distributed=False;") == 1
    assert "--config.distributed=True" not in remote_command(run)


def test_steps_subset_runs_in_canonical_order():
    cmds = dry_run("--name=score-t", "--zone=z", "--steps=delete,create")
    assert [c[4] for c in cmds] == ["create", "delete"]


@pytest.mark.parametrize("args, message", [
    (["--zone=z"], "the following arguments are required: --name"),
    (["--name=score-t", "--zone=z", "--workdir=w"], "--config is required"),
    ([*BASE], "--workdir is required"),
    ([*BASE, "--workdir=runs/x", "--accelerator=v4-32"], "use a gs:// --workdir"),
    ([*BASE, "--workdir=w", "--config.lr"], "only --config.KEY=VALUE overrides"),
    ([*BASE, "--workdir=w", "--steps=create,bogus"], "unknown step(s) ['bogus']"),
    ([*BASE, "--workdir=w", "--name=Bad_Name"], "--name='Bad_Name' must be"),
    ([*BASE, "--workdir=w", "--spot", "--preemptible"], "not allowed with argument"),
])
def test_bad_flags_error_clearly(args, message):
    result = launch(*args, "--dry-run")
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_missing_gcloud_is_reported(tmp_path):
    result = launch(*BASE, "--workdir=w", env={**os.environ, "PATH": str(tmp_path)})
    assert result.returncode == 2
    assert "install the Google Cloud SDK" in result.stderr


FAKE_MAIN = """\
import pathlib, signal, sys, time
args = sys.argv[1:]
workdir = pathlib.Path([a for a in args if a.startswith("--workdir=")][0][len("--workdir="):])
workdir.mkdir(parents=True, exist_ok=True)
if "--config.hold=yes" in args:  # runs until SIGTERM, then "saves" and exits 0
    def save(signum, frame):
        (workdir / "saved").write_text("")
        sys.exit(0)
    signal.signal(signal.SIGTERM, save)
(workdir / "argv.txt").write_text("\\n".join(args))
print("training", args, flush=True)
while "--config.hold=yes" in args:
    time.sleep(0.05)
sys.exit(3 if "--config.fail=yes" in args else 0)
"""


def fake_home(tmp_path: Path) -> Path:
    """A home directory laid out as setup leaves it, with a stand-in score_jax.main."""
    package = tmp_path / "score_jax" / "score_jax"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(FAKE_MAIN)
    (tmp_path / "score_jax_venv" / "bin").mkdir(parents=True)
    (tmp_path / "score_jax_venv" / "bin" / "python").symlink_to(sys.executable)
    return tmp_path


@pytest.mark.parametrize("fail", [False, True])
def test_remote_run_and_wait_scripts(tmp_path, fail):
    home = fake_home(tmp_path)
    overrides = ["--config.run_name=my run"] + (["--config.fail=yes"] if fail else [])
    run, wait = dry_run(*BASE, "--workdir=runs/x", "--steps=run,wait", *overrides)
    env = {**os.environ, "HOME": str(home)}

    def remote(cmd):
        return subprocess.run(["bash", "-c", remote_command(cmd)], cwd=home, env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    assert remote(run).returncode == 0
    waited = remote(wait)
    assert waited.returncode == (3 if fail else 0), waited.stderr
    assert "training" in waited.stdout
    argv = (home / "runs" / "x" / "argv.txt").read_text().splitlines()
    assert argv == ["--config=configs/sft.py", f"--workdir={home}/runs/x", *overrides]
    assert "training" in (home / "score_jax_logs" / "score-t.log").read_text()


def wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_remote_stop_script_saves_the_running_job(tmp_path):
    home = fake_home(tmp_path)
    stop, run = dry_run(*BASE, "--workdir=runs/x", "--steps=stop,run", "--config.hold=yes")
    env = {**os.environ, "HOME": str(home)}

    def remote(cmd):
        return subprocess.run(["bash", "-c", remote_command(cmd)], cwd=home, env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    assert remote(stop).returncode == 0  # no job yet: nothing to stop
    try:
        assert remote(run).returncode == 0
        wait_for(home / "runs" / "x" / "argv.txt")
        assert remote(run).returncode == 1  # refuses a second job of the same name
        stopped = remote(stop)
        assert stopped.returncode == 0, stopped.stderr
        assert "stopping the score_jax job score-t (SIGTERM" in stopped.stderr
        assert (home / "runs" / "x" / "saved").exists()
        wait_for(home / "score_jax_logs" / "score-t.exit")  # the subshell writes it as python exits
        assert (home / "score_jax_logs" / "score-t.exit").read_text().strip() == "0"
        assert remote(run).returncode == 0  # the job is gone: a rerun may start
    finally:
        remote(stop)  # the held job of the last start (or of a failed assertion) never outlives the test


# --- the --until-done loop -------------------------------------------------------------------

POD = [*BASE, "--accelerator=v5litepod-16", "--spot", "--workdir=gs://b/runs/sft", "--until-done"]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
ZONE = "--zone=us-west4-a"


def kind(argv: list) -> str:
    """A short name for one printed command, to compare whole sequences."""
    if argv[0] in ("sleep", "mkdir", "git"):
        return {"git": "archive"}.get(argv[0], argv[0])
    if argv[:3] == ["gcloud", "storage", "ls"]:
        return "check"
    if argv[:3] == ["gcloud", "storage", "cp"]:
        return "fetch"
    group, verb = argv[3], argv[4]
    if group == "queued-resources":
        return "qr-" + verb
    if verb == "scp":
        return "scp" if argv[5].endswith(".tar.gz") else "fetch-log"
    if verb != "ssh":
        return verb
    remote = remote_command(argv)
    for needle, name in (("tar -xzf", "unpack"), ("-m venv", "setup"), ("pkill", "stop"),
                         ("-m score_jax.main", "run"), ("tail -n 50", "wait"),
                         ("test -f", "check")):
        if needle in remote:
            return name
    raise AssertionError(remote)


FIRST = ["create", "archive", "scp", "unpack", "setup", "run", "wait"]
COPY_SETUP_RUN = ["archive", "scp", "unpack", "setup", "run", "wait"]
FETCH = ["mkdir", "fetch", "fetch-log"]


def loop_dry_run(*args) -> tuple:
    result = launch(*args, "--dry-run")
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()], result.stderr


def test_until_done_first_attempt_done_fetches_once():
    cmds, err = loop_dry_run(*POD, "--delete-after")
    assert [kind(c) for c in cmds] == [*FIRST, "check", *FETCH, "delete"]
    assert cmds[7] == ["gcloud", "storage", "ls", "gs://b/runs/sft/summary.json"]
    assert "attempt 1 of 5: summary.json exists: the run is done" in err


def test_until_done_reruns_after_a_save_and_recreates_a_preempted_pod():
    cmds, err = loop_dry_run(*POD, "--simulate=saved,preempted,done", "--delete-after")
    assert [kind(c) for c in cmds] == [
        *FIRST, "check", "describe", "sleep",             # attempt 1: saved on SIGTERM
        "stop", "run", "wait", "check", "describe", "sleep",  # attempt 2: the pod preempted
        "delete", *FIRST, "check",                         # attempt 3: recreated, done
        *FETCH, "delete"]
    describe = TPU + ["describe", "score-t", ZONE, "--format=value(state)"]
    assert cmds[8] == cmds[14] == describe
    assert cmds[9] == cmds[15] == ["sleep", "120"]
    assert cmds[10][:8] == TPU + ["ssh", "score-t", ZONE, "--worker=all"]
    assert cmds[16] == TPU + ["delete", "score-t", ZONE, "--quiet"]
    # every attempt runs exactly the first attempt's job, and the recreate repeats create,
    # copy and setup verbatim
    assert cmds[11] == cmds[5] == cmds[22] and cmds[12] == cmds[6] == cmds[23]
    assert cmds[17:22] == cmds[0:5]
    assert "the job stopped on SIGTERM (after saving a checkpoint) without summary.json; " \
           "the TPU VM is READY: rerun" in err
    assert "the TPU VM is PREEMPTED: delete and recreate it" in err
    assert "attempt 3 of 5: summary.json exists" in err


def test_until_done_queued_spot_resource_is_replaced_when_suspended():
    cmds, _ = loop_dry_run(*POD, "--queued", "--simulate=preempted,done")
    create = QR + ["create", "score-t", ZONE, "--node-id=score-t",
                   "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
                   "--spot"]
    describe = QR + ["describe", "score-t", ZONE, "--format=value(state.state)"]
    assert [kind(c) for c in cmds] == [
        "qr-create", "qr-describe", *COPY_SETUP_RUN, "check", "qr-describe", "sleep",
        "qr-delete", "qr-create", "qr-describe", *COPY_SETUP_RUN, "check", *FETCH]
    assert cmds[0] == cmds[12] == create
    assert cmds[1] == cmds[9] == cmds[13] == describe
    assert cmds[11] == QR + ["delete", "score-t", ZONE, "--force", "--quiet"]


def test_until_done_recreates_a_deleted_vm_without_a_delete():
    cmds, err = loop_dry_run(*POD, "--simulate=deleted,done", "--retry-wait=7")
    assert [kind(c) for c in cmds] == [*FIRST, "check", "describe", "sleep", *FIRST, "check",
                                       *FETCH]
    assert cmds[9] == ["sleep", "7"]
    assert "the TPU VM is gone: recreate it" in err


def test_until_done_stops_on_a_config_error_and_gives_up_after_max_attempts():
    cmds, err = loop_dry_run(*POD, "--simulate=lost,error")
    assert [kind(c) for c in cmds] == [*FIRST, "check", "describe", "sleep",
                                       "stop", "run", "wait", "check"]
    assert "attempt 2 of 5: the job exited with status 2 (a config, data or workdir error)" in err
    assert "a real run would exit with status 2" in err
    cmds, err = loop_dry_run(*POD, "--simulate=lost", "--max-attempts=3")
    assert [kind(c) for c in cmds].count("run") == 3
    assert [kind(c) for c in cmds].count("sleep") == 2 and "fetch" not in map(kind, cmds)
    assert "summary.json is still missing after 3 attempts" in err
    assert "gcloud compute tpus tpu-vm delete score-t" in err  # what still costs money


def test_until_done_one_host_checks_worker_0_and_knows_eval_json():
    cmds, err = loop_dry_run(*BASE, "--workdir=runs/x", "--until-done", "--steps=run,wait",
                             "--simulate=lost,done")
    assert [kind(c) for c in cmds] == ["run", "wait", "check", "describe", "sleep",
                                       "stop", "run", "wait", "check"]  # no fetch: not in --steps
    assert cmds[2] == TPU + ["ssh", "score-t", ZONE, "--worker=0",
                             '--command=test -f "$HOME"/runs/x/summary.json']
    cmds, _ = loop_dry_run("--name=score-t", "--zone=us-west4-a", "--config=configs/eval.py",
                           "--workdir=gs://b/ev/", "--until-done", "--steps=run,wait")
    assert cmds[2] == ["gcloud", "storage", "ls", "gs://b/ev/eval.json"]
    cmds, _ = loop_dry_run(*BASE, "--workdir=/abs/r", "--until-done", "--steps=wait",
                           "--done-file=done.txt")
    assert remote_command(cmds[1]) == "test -f /abs/r/done.txt"
    # an on-demand VM that is gone took the workdir on its disk with it
    cmds, err = loop_dry_run(*BASE, "--workdir=runs/x", "--until-done", "--steps=run,wait",
                             "--simulate=deleted")
    assert [kind(c) for c in cmds] == ["run", "wait", "check", "describe"]
    assert "is lost with it: a run that survives that needs a gs:// --workdir" in err


@pytest.mark.parametrize("args, message", [
    ([*BASE, "--workdir=runs/x", "--spot", "--until-done"], "use a gs:// --workdir"),
    ([*BASE, "--workdir=gs://b/r", "--until-done", "--steps=create,run"], "keep wait in --steps"),
    (["--name=score-t", "--zone=z", "--until-done", "--steps=wait"], "pass --config and --workdir"),
    ([*BASE, "--workdir=gs://b/r", "--until-done", "--max-attempts=0"], "at least 1"),
    ([*BASE, "--workdir=gs://b/r", "--until-done", "--simulate=done,oops"],
     "unknown outcome(s) ['oops']"),
    ([*BASE, "--workdir=gs://b/r", "--simulate=done"], "only applies to --until-done"),
    ([*BASE, "--workdir=gs://b/r", "--queued", "--preemptible"], "not --preemptible"),
])
def test_bad_loop_flags_error_clearly(args, message):
    test_bad_flags_error_clearly(args, message)


def test_simulate_needs_dry_run(tmp_path):
    result = launch(*BASE, "--workdir=gs://b/r", "--until-done", "--simulate=done",
                    env={**os.environ, "PATH": str(tmp_path)})
    assert result.returncode == 2 and "only applies to --until-done with --dry-run" in result.stderr


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu_vm = load(SCRIPT, "tpu_vm")
Obs = tpu_vm.Observation


@pytest.mark.parametrize("obs, queued, durable, action, steps", [
    (Obs("wait", 0), False, True, "check", ()),
    (Obs("wait", 255), False, True, "check", ()),
    (Obs("wait", 0, done=True), False, True, "done", ()),
    (Obs("wait", 1, done=True), False, True, "done", ()),  # the file decides, not the status
    (Obs("wait", 2, done=False), False, True, "fail", ()),
    (Obs("wait", 3, done=False), True, True, "fail", ()),
    (Obs("wait", 0, done=False), False, True, "describe", ()),
    (Obs("run", 1), False, True, "describe", ()),  # no check before the job ran
    (Obs("create", 2), False, True, "describe", ()),  # 2 is final only as the job's status
    (Obs("wait", 0, False, "READY"), False, True, "rerun", ("stop", "run", "wait")),
    (Obs("wait", 143, False, "READY"), False, True, "rerun", ("stop", "run", "wait")),
    (Obs("run", 1, None, "READY"), False, True, "rerun", ("stop", "run", "wait")),
    (Obs("setup", 1, None, "READY"), False, True, "rerun", ("setup", "stop", "run", "wait")),
    (Obs("create", 1, None, "READY"), False, True, "rerun",
     ("copy", "setup", "stop", "run", "wait")),
    (Obs("wait", 255, False, "NOT_FOUND"), False, True, "recreate",
     ("create", "copy", "setup", "run", "wait")),
    (Obs("create", 1, None, "NOT_FOUND"), False, True, "recreate",
     ("create", "copy", "setup", "run", "wait")),  # e.g. a spot create with no capacity
    (Obs("wait", 255, False, "PREEMPTED"), False, True, "replace",
     ("delete", "create", "copy", "setup", "run", "wait")),
    (Obs("wait", 255, False, "TERMINATED"), False, True, "replace",
     ("delete", "create", "copy", "setup", "run", "wait")),
    (Obs("wait", 255, False, "PREEMPTED"), False, False, "fail", ()),
    (Obs("wait", 255, False, "NOT_FOUND"), False, False, "fail", ()),
    (Obs("wait", 0, False, "READY"), False, False, "rerun", ("stop", "run", "wait")),
    (Obs("wait", 255, False, "REPAIRING"), False, True, "poll", ()),
    (Obs("wait", 255, False, "UNKNOWN"), False, True, "poll", ()),
    (Obs("wait", 255, False, "STOPPED"), False, True, "fail", ()),
    (Obs("wait", 255, False, "ACTIVE"), True, True, "rerun", ("stop", "run", "wait")),
    (Obs("wait", 255, False, "SUSPENDED"), True, True, "replace",
     ("delete", "create", "copy", "setup", "run", "wait")),
    (Obs("create", 1, None, "FAILED"), True, True, "replace",
     ("delete", "create", "copy", "setup", "run", "wait")),
    (Obs("wait", 255, False, "WAITING_FOR_RESOURCES"), True, True, "poll", ()),
    (Obs("wait", 255, False, "READY"), True, True, "fail", ()),  # a node state, not a queued one
])
def test_decide(obs, queued, durable, action, steps):
    decision = tpu_vm.decide(obs, queued, durable)
    assert (decision.action, decision.steps) == (action, steps), decision.reason
    if action == "fail":
        assert decision.code == (obs.code if obs.code in (2, 3) else 1)


@pytest.mark.parametrize("result, state", [
    (tpu_vm.Result(0, "READY\n"), "READY"),
    (tpu_vm.Result(0, "preempted"), "PREEMPTED"),
    (tpu_vm.Result(0, ""), "UNKNOWN"),
    (tpu_vm.Result(1, "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource "
                      "'projects/p/locations/z/nodes/n' was not found"), "NOT_FOUND"),
    (tpu_vm.Result(1, "ERROR: (gcloud) There was a problem refreshing your credentials."),
     "UNKNOWN"),
])
def test_state_of_a_describe(result, state):
    assert tpu_vm.state_of(result) == state


class FakeRunner:
    """Answers each probe from a script (probe -> list of Results, consumed in order) and
    fails the first runs of the steps in `failures`; records what it was asked to do."""

    def __init__(self, probes: dict, failures: dict = None):
        self.probes = {k: list(v) for k, v in probes.items()}
        self.failures = {k: list(v) for k, v in (failures or {}).items()}
        self.log = []

    def run(self, command):
        self.log.append(command.probe or command.step)
        if command.probe:
            return self.probes[command.probe].pop(0)
        codes = self.failures.get(command.step)
        return tpu_vm.Result(codes.pop(0) if codes else 0)

    def sleep(self, seconds, why):
        self.log.append(f"sleep {seconds}")


def run_loop(flags: list, runner) -> int:
    args, steps, overrides = tpu_vm.parse_args(flags)
    return tpu_vm.until_done(tpu_vm.Planner(args, overrides), steps, runner)


R = tpu_vm.Result


def test_loop_polls_a_repairing_vm_then_reruns():
    runner = FakeRunner({"job": [R(255), R(0)], "done": [R(1), R(0)],
                         "state": [R(0, "REPAIRING"), R(1, "network down"), R(0, "READY")]})
    flags = [*POD, "--steps=run,wait,fetch", "--poll-interval=5", "--retry-wait=9"]
    assert run_loop(flags, runner) == 0
    assert runner.log == ["run", "job", "done", "state", "sleep 5", "state", "sleep 5", "state",
                          "sleep 9", "stop", "run", "job", "done", "fetch", "fetch", "fetch"]


def test_loop_retries_a_spot_create_without_capacity():
    runner = FakeRunner({"job": [R(0)], "done": [R(0)],
                         "state": [R(1, "ERROR: NOT_FOUND")]}, failures={"create": [1]})
    assert run_loop([*POD, "--steps=create,run,wait"], runner) == 0
    assert runner.log == ["create", "state", "sleep 120", "create", "copy", "copy", "copy",
                          "setup", "run", "job", "done"]


def test_loop_gives_up_on_a_vm_that_stays_pending():
    runner = FakeRunner({"job": [R(255)], "done": [R(1)], "state": [R(0, "CREATING")] * 9})
    flags = [*POD, "--steps=wait", "--poll-interval=10", "--provision-timeout=25"]
    assert run_loop(flags, runner) == 1
    assert runner.log == ["job", "done", "state", "sleep 10", "state", "sleep 10", "state",
                          "sleep 10", "state"]


def test_loop_waits_for_a_queued_resource_to_become_active():
    runner = FakeRunner({"active": [R(0, "WAITING_FOR_RESOURCES"), R(0, "PROVISIONING"),
                                    R(0, "ACTIVE")],
                         "job": [R(0)], "done": [R(0)]})
    flags = [*POD, "--queued", "--steps=create,run,wait", "--poll-interval=30"]
    assert run_loop(flags, runner) == 0
    assert runner.log == ["create", "active", "sleep 30", "active", "sleep 30", "active", "run",
                          "job", "done"]
    # a queued resource that FAILED ends the attempt at create; the loop replaces it
    runner = FakeRunner({"active": [R(0, "FAILED"), R(0, "ACTIVE")], "job": [R(0)],
                         "done": [R(0)], "state": [R(0, "FAILED")]})
    assert run_loop([*POD, "--queued", "--steps=create,run,wait"], runner) == 0
    assert runner.log == ["create", "active", "state", "sleep 120", "delete", "create", "active",
                          "copy", "copy", "copy", "setup", "run", "job", "done"]


# --- launch/slurm.py -------------------------------------------------------------------------

SLURM_BASE = ["--name=sft", "--config=configs/sft.py", "--workdir=/shared/runs/sft"]


def slurm(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SLURM), *args], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


def slurm_script(*args) -> str:
    result = slurm(*args, "--dry-run")
    assert result.returncode == 0, result.stderr
    return result.stdout


def sbatch_lines(script: str) -> list:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def srun_line(script: str) -> list:
    """The srun command, continuation lines joined, split into words (without the '&')."""
    joined = script.replace("\\\n", " ")
    [line] = [ln for ln in joined.splitlines() if ln.strip().startswith("srun ")]
    words = shlex.split(line)
    assert words[-1] == "&"
    return words[:-1]


def test_slurm_two_nodes_one_process_per_gpu():
    script = slurm_script(*SLURM_BASE, "--nodes=2", "--gpus-per-node=8", "--partition=gpu",
                          "--account=proj", "--time=24:00:00", "--cpus-per-task=12",
                          "--sbatch=--exclusive", "--config.run_name=my run")
    assert script.startswith("#!/bin/bash\n#SBATCH ")
    assert sbatch_lines(script) == [
        "#SBATCH --job-name=sft", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gres=gpu:8", "#SBATCH --cpus-per-task=12", "#SBATCH --partition=gpu",
        "#SBATCH --account=proj", "#SBATCH --time=24:00:00",
        f"#SBATCH --output={REPO_ROOT}/runs/slurm/%x-%j.out", "#SBATCH --open-mode=append",
        "#SBATCH --requeue", "#SBATCH --signal=TERM@120", "#SBATCH --exclusive"]
    assert srun_line(script) == [
        "srun", "--nodes=2", "--ntasks-per-node=8", "--kill-on-bad-exit=1", "$VENV/bin/python",
        "-u", "-m", "score_jax.main", "--config=configs/sft.py", "--workdir=/shared/runs/sft",
        "--config.run_name=my run", "--config.distributed=True"]
    assert "score_jax.main in 16 processes (one per GPU)" in script
    assert f"cd {REPO_ROOT} || exit 2\n" in script
    assert 'VENV="$HOME"/score_jax_cuda_venv\n' in script
    assert "JAX_LOCAL_DEVICE_IDS" not in script  # JAX gives each process its SLURM_LOCALID GPU
    assert 'if ! cmp -s requirements-cuda.txt "$VENV"/requirements-cuda.txt; then' in script
    assert ('python3.11 -m venv "$VENV"' in script
            and '"$VENV"/bin/pip install -q -r requirements-cuda.txt' in script)
    assert "run_done() { test -f /shared/runs/sft/summary.json; }" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert 'if [ "$restarts" -ge 10 ]; then' in script and "attempt $attempt of 3" in script
    assert "trap 'stopping=1;" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0


def test_slurm_one_process_per_node_gets_all_its_gpus():
    script = slurm_script(*SLURM_BASE, "--nodes=2", "--gpus-per-node=4", "--gpu-type=a100",
                          "--procs=per-node", "--env=NCCL_DEBUG=WARN", "--python=python3",
                          "--prelude=module load cuda/12", "--venv=/opt/v", "--signal-time=300",
                          "--config.distributed=True")
    lines = sbatch_lines(script)
    assert lines[:4] == ["#SBATCH --job-name=sft", "#SBATCH --nodes=2",
                         "#SBATCH --ntasks-per-node=1", "#SBATCH --gres=gpu:a100:4"]
    assert "#SBATCH --signal=TERM@300" in lines
    srun = srun_line(script)
    assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun.count("--config.distributed=True") == 1
    assert "score_jax.main in 2 processes (one per node)" in script
    body = script.splitlines()
    assert body.index("module load cuda/12") < body.index("export PYTHONUNBUFFERED=1")
    assert "export NCCL_DEBUG=WARN" in body
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3  # all the node's GPUs, one process" in body
    assert "VENV=/opt/v" in body and 'python3 -m venv "$VENV"' in script


def test_slurm_gs_workdir_and_eval_done_file():
    script = slurm_script("--config=configs/eval.py", "--workdir=gs://b/ev")
    assert "run_done() { gcloud storage ls gs://b/ev/eval.json >/dev/null 2>&1; }" in script
    assert sbatch_lines(script)[:4] == ["#SBATCH --job-name=score_jax", "#SBATCH --nodes=1",
                                        "#SBATCH --ntasks-per-node=8", "#SBATCH --gres=gpu:8"]


def test_slurm_writes_the_script_and_submits_it(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    sbatch = fake_bin / "sbatch"
    sbatch.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/sbatch.args"\n'
                      'echo "Submitted batch job 42"\n')
    sbatch.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    out = tmp_path / "repo"
    args = [*SLURM_BASE, f"--repo-dir={out}", "--nodes=2"]
    written = slurm(*args, env=env)
    assert written.returncode == 0, written.stderr
    path = out / "runs" / "slurm" / "sft.sbatch"
    assert f"submit it with: sbatch {path}" in written.stdout
    assert path.read_text() == slurm_script(*args)
    submitted = slurm(*args, "--submit", env=env)
    assert submitted.returncode == 0 and "Submitted batch job 42" in submitted.stdout
    assert (fake_bin / "sbatch.args").read_text().split() == [str(path)]
    no_sbatch = slurm(*args, "--submit", env={**os.environ, "PATH": str(tmp_path / "none")})
    assert no_sbatch.returncode == 2 and "sbatch is not on PATH" in no_sbatch.stderr


@pytest.mark.parametrize("args, message", [
    (["--workdir=w"], "the following arguments are required: --config"),
    ([*SLURM_BASE, "--procs=per-task"], "invalid choice: 'per-task'"),
    ([*SLURM_BASE, "--nodes=0"], "at least 1"),
    ([*SLURM_BASE, "--env=NO_EQUALS"], "is not KEY=VALUE"),
    ([*SLURM_BASE, "--config.lr"], "only --config.KEY=VALUE overrides"),
    ([*SLURM_BASE, "--sbatch=exclusive"], "is not one sbatch option"),
    ([*SLURM_BASE, "--name=bad name"], "--name='bad name' must be"),
    ([*SLURM_BASE, "--submit", "--dry-run"], "not allowed with argument"),
])
def test_slurm_bad_flags_error_clearly(args, message):
    result = slurm(*args, "--dry-run") if "--dry-run" not in args else slurm(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_requirements_cuda_is_requirements_with_jax_cuda12():
    def pins(name):
        text = (REPO_ROOT / name).read_text()
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]

    base, cuda = pins("requirements.txt"), pins("requirements-cuda.txt")
    [jax] = [ln for ln in base if ln.startswith("jax==")]
    assert cuda == [f"jax[cuda12]=={jax[len('jax=='):]}" if ln == jax else ln for ln in base]


FAKE_SLURM_MAIN = """\
import os, pathlib, sys, time
args = sys.argv[1:]
workdir = pathlib.Path([a for a in args if a.startswith("--workdir=")][0][len("--workdir="):])
workdir.mkdir(parents=True, exist_ok=True)
plan = os.environ["FAKE_PLAN"].split(",")
calls = workdir / "calls"
n = len(calls.read_text().splitlines()) if calls.exists() else 0
with calls.open("a") as f:
    f.write(" ".join(args) + " JAX_LOCAL_DEVICE_IDS=" + os.environ.get("JAX_LOCAL_DEVICE_IDS", "")
            + "\\n")
what = plan[min(n, len(plan) - 1)]
if what == "done":
    (workdir / "summary.json").write_text("{}")
    sys.exit(0)
if what == "hold":  # until the test says so, then exit 0 as after a save
    (workdir / "started").write_text("")
    while not (workdir / "release").exists():
        time.sleep(0.05)
    sys.exit(0)
sys.exit(int(what))
"""


def fake_cluster(tmp_path: Path) -> tuple:
    """A repo dir with a stand-in score_jax.main and a built venv, and bin/ with srun (runs
    the command once, as one process) and scontrol (records its arguments)."""
    repo = tmp_path / "repo"
    (repo / "score_jax").mkdir(parents=True)
    (repo / "score_jax" / "__init__.py").write_text("")
    (repo / "score_jax" / "main.py").write_text(FAKE_SLURM_MAIN)
    (repo / "requirements-cuda.txt").write_text("jax[cuda12]==0\n")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "requirements-cuda.txt").write_text("jax[cuda12]==0\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                   'exec "$@"\n')
    (fake_bin / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/scontrol.log"\n')
    for tool in ("srun", "scontrol"):
        (fake_bin / tool).chmod(0o755)
    return repo, venv, fake_bin


def batch(tmp_path, plan, restarts=0, extra=()):
    """Writes the batch script for the fake cluster; returns (Popen args, env, workdir)."""
    repo, venv, fake_bin = fake_cluster(tmp_path) if not (tmp_path / "repo").exists() else \
        (tmp_path / "repo", tmp_path / "venv", tmp_path / "bin")
    script = slurm_script("--name=t", "--config=configs/sft.py", "--workdir=runs/t",
                          f"--repo-dir={repo}", f"--venv={venv}", "--retry-wait=0", *extra)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "123",
           "SLURM_RESTART_COUNT": str(restarts), "FAKE_PLAN": plan}
    return ["bash", str(path)], env, repo / "runs" / "t"


def run_batch(tmp_path, plan, restarts=0, extra=()) -> tuple:
    argv, env, workdir = batch(tmp_path, plan, restarts, extra)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                            check=False)
    calls = (workdir / "calls").read_text().splitlines() if (workdir / "calls").exists() else []
    log = tmp_path / "bin" / "scontrol.log"
    return result, calls, (log.read_text().splitlines() if log.exists() else [])


def test_slurm_script_requeues_after_a_save_and_stops_once_done(tmp_path):
    result, calls, scontrol = run_batch(tmp_path, "0")
    assert result.returncode == 0, result.stderr
    assert calls == ["--config=configs/sft.py --workdir=runs/t --config.distributed=True "
                     "JAX_LOCAL_DEVICE_IDS="]
    assert scontrol == ["requeue 123"]
    assert "requeueing job 123" in result.stderr
    # the requeued job (SLURM_RESTART_COUNT=1) resumes and finishes; a third start does nothing
    result, calls, scontrol = run_batch(tmp_path, "0,done", restarts=1)
    assert result.returncode == 0 and len(calls) == 2 and scontrol == ["requeue 123"]
    result, calls, _ = run_batch(tmp_path, "0,done", restarts=2)
    assert result.returncode == 0 and len(calls) == 2
    assert "summary.json exists: the run is done" in result.stderr


def test_slurm_script_reruns_a_crash_in_the_allocation(tmp_path):
    result, calls, scontrol = run_batch(tmp_path, "1,143,done", extra=["--procs=per-node"])
    assert result.returncode == 0, result.stderr
    assert len(calls) == 3 and scontrol == []
    assert all(c.endswith("JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7") for c in calls)
    assert "attempt 3 of 3 in this allocation" in result.stderr


def test_slurm_script_requeues_after_max_attempts_and_gives_up_after_max_requeues(tmp_path):
    result, calls, scontrol = run_batch(tmp_path, "1", extra=["--max-attempts=2"])
    assert result.returncode == 0 and len(calls) == 2 and scontrol == ["requeue 123"]
    result, calls, scontrol = run_batch(tmp_path, "1", restarts=4,
                                        extra=["--max-attempts=2", "--max-requeues=4"])
    assert result.returncode == 1 and len(calls) == 4 and scontrol == ["requeue 123"]
    assert "after 4 requeues (--max-requeues): giving up" in result.stderr


@pytest.mark.parametrize("code", [2, 3])
def test_slurm_script_does_not_rerun_a_final_error(tmp_path, code):
    result, calls, scontrol = run_batch(tmp_path, str(code))
    assert result.returncode == code and len(calls) == 1 and scontrol == []
    assert "not rerun" in result.stderr


def test_slurm_script_waits_for_the_save_on_its_own_sigterm(tmp_path):
    argv, env, workdir = batch(tmp_path, "hold")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for(workdir / "started")
        proc.send_signal(signal.SIGTERM)  # a preemption: SLURM signals the batch shell too
        time.sleep(0.3)
        assert proc.poll() is None  # still waiting for the processes
        (workdir / "release").write_text("")
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "SIGTERM: waiting for the processes to save" in err
    assert "stopped by SIGTERM" in err
    assert not (tmp_path / "bin" / "scontrol.log").exists()  # SLURM requeues a preempted job
