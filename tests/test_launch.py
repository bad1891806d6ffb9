"""launch/tpu_vm.py: the commands printed by --dry-run, flag errors, and the remote scripts.

The script is always run with --dry-run (or with gcloud hidden from PATH), so nothing here
talks to Google Cloud. The remote run/wait scripts are executed with a local bash against a
fake home directory to check their quoting, logging and exit-status handling.
"""
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "launch" / "tpu_vm.py"
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
import pathlib, sys
args = sys.argv[1:]
workdir = pathlib.Path([a for a in args if a.startswith("--workdir=")][0][len("--workdir="):])
workdir.mkdir(parents=True, exist_ok=True)
(workdir / "argv.txt").write_text("\\n".join(args))
print("training", args)
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
