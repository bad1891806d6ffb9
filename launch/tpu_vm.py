"""Run a score_jax config on a Cloud TPU VM (one host) or a pod slice (all hosts) with gcloud.

    python launch/tpu_vm.py --name=score-1 --zone=us-west4-a \
        --config=configs/sft.py --workdir=runs/sft '--config.run_name=my run' --dry-run

Steps, always run in this order (pick a subset with --steps):
  create  gcloud compute tpus tpu-vm create (on-demand, --spot or --preemptible); with
          --queued, a queued resource (gcloud compute tpus queued-resources create) and then
          queued-resources describe every --poll-interval seconds until it is ACTIVE.
  copy    ships the repo to every host: a `git archive` tarball of --ref (committed files
          only) sent with tpu-vm scp, or, with --repo-url, a `git clone` on each host.
  setup   python3.11 venv ~/score_jax_venv with requirements.txt plus jax[tpu] at the same
          jax version (PyPI carries the matching libtpu; the libtpu find-links page is kept
          as a fallback for versions that predate that).
  stop    sends SIGTERM to a running job of this name (it saves a checkpoint and exits), and
          SIGKILL after 120 s; nothing when no job runs. Not a default step: the loop runs it
          before every rerun.
  run     starts `python -m score_jax.main --config=... --workdir=... [--config.k=v ...]`
          in ~/score_jax as a background job immune to hangups (like nohup), so it outlives
          the ssh session; it logs to ~/score_jax_logs/NAME.log and leaves its exit status
          in NAME.exit. Refuses to start while a job of the same name is running.
  wait    follows that log until the job ends and exits with the job's status. The job
          does not depend on this ssh session: if it drops, re-attach with --steps=wait.
  fetch   copies the run directory to --local-dir (scp from worker 0, or `gcloud storage
          cp` for a gs:// workdir) plus the log.
  delete  deletes the TPU VM (with --queued: the queued resource and its TPU); only with
          --delete-after or when named in --steps.
Default: create,copy,setup,run,wait,fetch (+delete with --delete-after). Stop after `run`
to leave the job running: --steps=create,copy,setup,run.

--until-done reruns the job until <workdir>/summary.json exists (eval.json for configs/eval.py;
--done-file names another), at most --max-attempts attempts with --retry-wait seconds between.
After the wait step it looks for that file (`gcloud storage ls` for a gs:// workdir, else
`test -f` over ssh on worker 0); when it is missing it stops at once if the job exited 2 (a
config, data or workdir error) or 3 (non-finite training): a rerun would only repeat them.
Otherwise (exit 0 after a SIGTERM-triggered save, a crash, a lost worker, a dropped ssh) it
describes the TPU VM (the queued resource with --queued):
  READY / ACTIVE                  rerun: stop, run, wait (from copy or setup when those failed)
  gone (NOT_FOUND)                recreate: create, copy, setup, run, wait
  PREEMPTED, TERMINATED /
  SUSPENDED, FAILED               delete it first, then recreate
  CREATING, REPAIRING, ... /
  WAITING_FOR_RESOURCES, ...      describe again every --poll-interval s (--provision-timeout)
  anything else (STOPPED, ...)    stop with an error
A recreated VM starts with an empty disk, so recreating needs a gs:// workdir: --until-done
with --spot, --preemptible or --queued refuses any other. fetch and delete run once the run is
done. With --dry-run, --simulate=OUTCOME,... scripts what each attempt ends in (done, saved,
lost, preempted, deleted, error; the last one repeats) and prints the commands the loop would
run, waits as `sleep N`.

On a multi-host slice (accelerators with more than 8 cores/chips, e.g. v5litepod-16,
v4-16) every remote command runs on all hosts (--worker=all), because JAX needs one process
per host (run adds --config.distributed=True unless given); the workdir must then be gs://
since each host sees only its own disk. gcloud
asks for `ssh-add ~/.ssh/google_compute_engine` before --worker=all commands. The TPU VM's
service account needs write access to a gs:// workdir.

setup apt-installs bubblewrap (the code-reward sandbox) and python3.11, which the Ubuntu 22.04
runtime images carry; on another image pass --python=<an interpreter it has>.

A relative --workdir is relative to the remote home directory. --dry-run prints every
command (shell-quoted, one per line) and runs nothing. Pure standard library.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = ("create", "copy", "setup", "stop", "run", "wait", "fetch", "delete")
DEFAULT_STEPS = ("create", "copy", "setup", "run", "wait", "fetch")
# What --until-done repeats: all of an attempt, or a rerun from one of these steps on.
ATTEMPT_STEPS = ("delete", "create", "copy", "setup", "stop", "run", "wait")
CREATE_STEPS = ("create", "copy", "setup", "run", "wait")
STOP_GRACE_S = 120  # the stop step's SIGTERM-to-SIGKILL grace (the job saves a checkpoint)
# Exit statuses of score_jax.main that a rerun would only repeat (see score_jax/main.py).
FINAL_JOB_CODES = {2: "a config, data or workdir error",
                   3: "training stopped on non-finite gradients"}
# What a describe says, per kind of resource: ready (rerun), dead (delete, recreate), gone
# (recreate), pending (look again later). UNKNOWN also stands for a describe that failed.
NODE_STATES = {"READY": "ready", "PREEMPTED": "dead", "TERMINATED": "dead", "NOT_FOUND": "gone",
               **dict.fromkeys(("CREATING", "STARTING", "RESTARTING", "REPAIRING", "REIMAGING",
                                "DELETING", "UNKNOWN"), "pending")}
QUEUED_STATES = {"ACTIVE": "ready", "SUSPENDED": "dead", "FAILED": "dead", "NOT_FOUND": "gone",
                 **dict.fromkeys(("CREATING", "ACCEPTED", "PROVISIONING", "WAITING_FOR_RESOURCES",
                                  "SUSPENDING", "DELETING", "UNKNOWN"), "pending")}
# Remote layout, relative to the remote home directory (ssh commands start there).
REMOTE_REPO = "score_jax"
REMOTE_VENV = "score_jax_venv"
REMOTE_LOGS = "score_jax_logs"
LIBTPU_FIND_LINKS = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
# TPU software version (runtime image) per accelerator family, from the Cloud TPU docs.
RUNTIME_BY_FAMILY = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Every family fits at most 8 cores (v2-v5p) or chips (v5e, v6e) on one host.
MAX_SINGLE_HOST = 8
# --simulate: how a dry-run attempt ends, as (wait's exit status, done file there, TPU VM
# state, queued resource state) -- the answers the dry runner gives the loop's probes.
OUTCOMES = {
    "done": (0, True, "READY", "ACTIVE"),           # finished: the done file exists
    "saved": (0, False, "READY", "ACTIVE"),         # SIGTERM, saved, exited 0; the TPU is fine
    "lost": (1, False, "READY", "ACTIVE"),          # a crash or a lost worker on a live TPU
    "preempted": (255, False, "PREEMPTED", "SUSPENDED"),  # ssh dropped: the TPU was preempted
    "deleted": (255, False, "NOT_FOUND", "NOT_FOUND"),    # ssh dropped: the TPU is gone
    "error": (2, False, "READY", "ACTIVE"),         # a config error: a rerun would repeat it
}
NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
OVERRIDE_RE = re.compile(r"--config\.[A-Za-z_][\w.]*=.*", re.DOTALL)


class Command(NamedTuple):
    """One command of the plan: the step it belongs to and its argv (no shell locally).

    probe names what the command's result tells: "" nothing (it runs for its effect), "job"
    the job's exit status (wait), "done" whether the done file exists (exit 0), "state" the
    TPU's state, "active" the same while create waits for a queued resource (stdout read)."""

    step: str
    argv: list
    probe: str = ""


class Result(NamedTuple):
    """What a runner reports for one command: exit status and, for probes, its output."""

    code: int
    output: str = ""


class LaunchError(Exception):
    """A problem the user can fix; the message says what to do."""


def default_jax_version() -> str:
    """The jax pin in requirements.txt, so the TPU install matches what tests ran with."""
    path = REPO_ROOT / "requirements.txt"
    if path.exists():
        match = re.search(r"^jax==(\S+)", path.read_text(), re.MULTILINE)
        if match:
            return match.group(1)
    return ""


def parse_accelerator(accelerator: str) -> tuple:
    """'v5litepod-16' -> ('v5litepod', 16). Raises LaunchError on another shape."""
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator)
    if not match:
        raise LaunchError(
            f"--accelerator={accelerator!r} is not of the form FAMILY-SIZE "
            "(e.g. v5litepod-8, v4-16, v6e-8).")
    return match.group(1), int(match.group(2))


def build_parser() -> argparse.ArgumentParser:
    """All flags; extra `--config.KEY=VALUE` arguments are collected separately."""
    p = argparse.ArgumentParser(
        description="Run a score_jax config on a Cloud TPU VM or pod slice with gcloud. "
        "Extra --config.KEY=VALUE arguments are passed through to score_jax.main.",
        allow_abbrev=False)
    p.add_argument("--name", required=True, help="TPU VM name (lowercase, digits, '-').")
    p.add_argument("--zone", required=True, help="e.g. us-west4-a (v5e), us-central2-b (v4).")
    p.add_argument("--project", help="GCP project; default: gcloud's configured project.")
    p.add_argument("--accelerator", default="v5litepod-8", help="TPU type (default v5litepod-8).")
    p.add_argument("--version", help="TPU software version; default chosen by accelerator "
                   "family (v2-alpha-tpuv5-lite for v5e).")
    capacity = p.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="Spot capacity (preemptible).")
    capacity.add_argument("--preemptible", action="store_true", help="Legacy preemptible VM.")
    p.add_argument("--queued", action="store_true", help="Create through a queued resource "
                   "(waits in Cloud TPU's queue until capacity is free; with --spot, a spot one).")
    p.add_argument("--config", help="Config file for score_jax.main, relative to the repo "
                   "(e.g. configs/sft.py or configs/sft.py:arg). Needed by the run step.")
    p.add_argument("--workdir", help="Run directory: gs://bucket/path, an absolute path, or a "
                   "path relative to the remote home. Needed by run and fetch.")
    p.add_argument("--repo-url", help="git clone this URL on the hosts instead of shipping the "
                   "local repo as a tarball.")
    p.add_argument("--ref", default="HEAD", help="git ref to ship or check out (default HEAD).")
    p.add_argument("--python", default="python3.11", help="Remote interpreter for the venv "
                   "(apt-installed when it is python3.X).")
    p.add_argument("--jax-version", default=default_jax_version(),
                   help="jax[tpu] version (default: the jax pin in requirements.txt).")
    p.add_argument("--local-dir", help="Where fetch puts the run (default tpu_runs/NAME).")
    p.add_argument("--steps", help="Comma-separated subset of " + ",".join(STEPS) + ".")
    p.add_argument("--delete-after", action="store_true", help="Delete the TPU VM at the end.")
    p.add_argument("--dry-run", action="store_true", help="Print the commands; run nothing.")
    loop = p.add_argument_group("rerun until done (--until-done)")
    loop.add_argument("--until-done", action="store_true", help="Rerun after a preemption, a "
                      "crash or a lost worker (recreating a deleted or preempted TPU) until the "
                      "workdir holds the done file.")
    loop.add_argument("--done-file", help="The file a finished run writes in its workdir "
                      "(default summary.json; eval.json for configs/eval.py).")
    loop.add_argument("--max-attempts", type=int, default=5, help="Runs of the job at most, the "
                      "first included (default 5).")
    loop.add_argument("--retry-wait", type=int, default=120, help="Seconds between attempts "
                      "(default 120).")
    loop.add_argument("--poll-interval", type=int, default=60, help="Seconds between describes "
                      "of a TPU or queued resource that is not ready yet (default 60).")
    loop.add_argument("--provision-timeout", type=int, default=86400, help="Give up on a TPU or "
                      "queued resource still not ready after this many seconds (default 86400).")
    loop.add_argument("--simulate", help="With --dry-run: comma-separated outcomes of the "
                      "attempts (" + ", ".join(OUTCOMES) + "; the last repeats; default done).")
    return p


def parse_args(argv: list) -> tuple:
    """Returns (args, steps, overrides); exits with a usage error on bad input."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = []
    for arg in extra:
        if not OVERRIDE_RE.fullmatch(arg):
            parser.error(f"unrecognized argument {arg!r}: only --config.KEY=VALUE overrides "
                         "(with '=') are passed through to score_jax.main.")
        overrides.append(arg)
    try:
        steps = select_steps(args)
        validate(args, steps, overrides)
    except LaunchError as e:
        parser.error(str(e))
    return args, steps, overrides


def select_steps(args) -> list:
    """The steps to run, in canonical order."""
    if args.steps:
        chosen = {s.strip() for s in args.steps.split(",") if s.strip()}
        unknown = sorted(chosen - set(STEPS))
        if unknown:
            raise LaunchError(f"unknown step(s) {unknown} in --steps; choose from "
                              + ",".join(STEPS) + ".")
    else:
        chosen = set(DEFAULT_STEPS)
    if args.delete_after:
        chosen.add("delete")
    return [s for s in STEPS if s in chosen]


def validate(args, steps: list, overrides: list) -> None:
    """Raises LaunchError before any command runs if the flags cannot work together."""
    if not NAME_RE.fullmatch(args.name):
        raise LaunchError(f"--name={args.name!r} must be 1-63 lowercase letters, digits or "
                          "'-', starting with a letter and not ending with '-'.")
    family, _ = parse_accelerator(args.accelerator)
    if "create" in steps and not args.version and family not in RUNTIME_BY_FAMILY:
        raise LaunchError(f"no default --version for accelerator family {family!r}; pass "
                          "--version (see `gcloud compute tpus tpu-vm versions list`).")
    if "run" in steps and not args.config:
        raise LaunchError("--config is required for the run step (e.g. --config=configs/sft.py).")
    if ("run" in steps or "fetch" in steps) and not args.workdir:
        raise LaunchError("--workdir is required for the run and fetch steps "
                          "(e.g. --workdir=gs://my-bucket/runs/sft).")
    if overrides and "run" not in steps:
        raise LaunchError("--config.KEY=VALUE overrides only apply to the run step; add run "
                          "to --steps or drop them.")
    if "setup" in steps and not re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", args.jax_version):
        raise LaunchError(f"--jax-version={args.jax_version!r} is not a version (and no jax "
                          "pin was found in requirements.txt); pass e.g. --jax-version=0.10.2.")
    if args.workdir and is_multi_host(args) and not args.workdir.startswith("gs://"):
        raise LaunchError(f"--accelerator={args.accelerator} spans several hosts, each with its "
                          "own disk, so checkpoints would be split: use a gs:// --workdir.")
    if args.queued and args.preemptible:
        raise LaunchError("--queued takes --spot (or neither), not --preemptible.")
    if args.until_done:
        validate_loop(args, steps)
    elif args.simulate:
        raise LaunchError("--simulate only applies to --until-done with --dry-run.")


def validate_loop(args, steps: list) -> None:
    """The --until-done flags: what the loop reruns, where it looks, how long it tries."""
    if "wait" not in steps:
        raise LaunchError("--until-done learns how each attempt ended from the wait step: keep "
                          "wait in --steps.")
    if not args.config or not args.workdir:
        raise LaunchError("--until-done reruns the job: pass --config and --workdir.")
    if (args.spot or args.preemptible or args.queued) and not args.workdir.startswith("gs://"):
        raise LaunchError("--until-done recreates a preempted TPU VM, which starts with an empty "
                          "disk, so the run would start over each time: use a gs:// --workdir.")
    if args.max_attempts < 1 or min(args.retry_wait, args.poll_interval,
                                    args.provision_timeout) < 0:
        raise LaunchError("--max-attempts must be at least 1 and --retry-wait, --poll-interval "
                          "and --provision-timeout at least 0.")
    if args.simulate is not None:
        if not args.dry_run:
            raise LaunchError("--simulate only applies to --until-done with --dry-run.")
        unknown = [o for o in args.simulate.split(",") if o not in OUTCOMES]
        if unknown:
            raise LaunchError(f"unknown outcome(s) {unknown} in --simulate; choose from "
                              + ", ".join(OUTCOMES) + ".")


def is_multi_host(args) -> bool:
    """True for pod slices larger than one host (more than 8 cores/chips)."""
    return parse_accelerator(args.accelerator)[1] > MAX_SINGLE_HOST


def remote_workdir(workdir: str) -> str:
    """The workdir as a remote shell word; relative paths are anchored at "$HOME"."""
    if workdir.startswith("gs://") or workdir.startswith("/"):
        return shlex.quote(workdir)
    relative = workdir[2:] if workdir.startswith("~/") else workdir
    return '"$HOME"/' + shlex.quote(relative)


def done_file(args) -> str:
    """The file a finished run leaves in its workdir: eval.json for the eval job, else
    summary.json (see score_jax/jobs), unless --done-file names one."""
    if args.done_file:
        return args.done_file
    config_file = (args.config or "").split(":", 1)[0]
    return "eval.json" if os.path.basename(config_file) == "eval.py" else "summary.json"


def scp_path(workdir: str) -> str:
    """The workdir as scp sees it (relative paths are relative to the remote home)."""
    return workdir[2:] if workdir.startswith("~/") else workdir


class Planner:
    """Turns parsed flags into the gcloud/git commands of each step."""

    def __init__(self, args, overrides: list):
        self.args = args
        self.overrides = overrides
        self.all_workers = ["--worker=all"] if is_multi_host(args) else []
        self.log = f"{REMOTE_LOGS}/{args.name}.log"
        self.pid = f"{REMOTE_LOGS}/{args.name}.pid"
        self.exit = f"{REMOTE_LOGS}/{args.name}.exit"

    def gcloud(self, verb: str, positionals: list, flags: list = (),
               group: str = "tpu-vm") -> list:
        """`gcloud compute tpus GROUP VERB POSITIONALS --zone [--project] FLAGS`, GROUP
        tpu-vm or queued-resources."""
        project = [f"--project={self.args.project}"] if self.args.project else []
        return ["gcloud", "compute", "tpus", group, verb, *positionals,
                f"--zone={self.args.zone}", *project, *flags]

    def ssh(self, remote_command: str) -> list:
        """One remote shell command, on every host of the slice."""
        return self.gcloud("ssh", [self.args.name],
                           [*self.all_workers, f"--command={remote_command}"])

    def plan(self, steps: list) -> list:
        """All commands of the given steps, in order (a step method returns argv lists, or
        Commands for the probes)."""
        return [item if isinstance(item, Command) else Command(step, item)
                for step in steps for item in getattr(self, step)()]

    def create(self) -> list:
        a = self.args
        version = a.version or RUNTIME_BY_FAMILY[parse_accelerator(a.accelerator)[0]]
        capacity = ["--spot"] if a.spot else ["--preemptible"] if a.preemptible else []
        if a.queued:
            request = self.gcloud("create", [a.name], [
                f"--node-id={a.name}", f"--accelerator-type={a.accelerator}",
                f"--runtime-version={version}", *capacity], group="queued-resources")
            return [request, Command("create", self.describe_argv(), probe="active")]
        return [self.gcloud("create", [a.name], [f"--accelerator-type={a.accelerator}",
                                                 f"--version={version}", *capacity])]

    def describe_argv(self) -> list:
        """Prints the TPU VM's state (READY, PREEMPTED, ...) or the queued resource's (ACTIVE,
        SUSPENDED, ...); fails with NOT_FOUND when there is none."""
        if self.args.queued:
            return self.gcloud("describe", [self.args.name], ["--format=value(state.state)"],
                               group="queued-resources")
        return self.gcloud("describe", [self.args.name], ["--format=value(state)"])

    def describe(self) -> list:
        return [Command("describe", self.describe_argv(), probe="state")]

    def check(self) -> list:
        """Exits 0 when the run is done: its done file exists in the workdir."""
        a = self.args
        name = done_file(a)
        if a.workdir.startswith("gs://"):
            argv = ["gcloud", "storage", "ls", a.workdir.rstrip("/") + "/" + name]
        else:
            target = remote_workdir(a.workdir.rstrip("/")) + "/" + shlex.quote(name)
            argv = self.gcloud("ssh", [a.name], ["--worker=0", f"--command=test -f {target}"])
        return [Command("check", argv, probe="done")]

    def stop(self) -> list:
        # SIGTERM to the job's python process (a child of the recorded subshell, so a pid
        # reused after a reboot matches nothing): it saves and exits 0. Whatever still runs
        # after the grace period (a process stuck waiting for a lost peer) is killed.
        mine = '-P "$job" -f score_jax.main'
        stop = (f'job="$(cat {self.pid} 2>/dev/null)"; if [ -n "$job" ] && pgrep {mine}'
                f' >/dev/null; then echo "stopping the score_jax job {self.args.name}'
                f' (SIGTERM: it saves a checkpoint)" >&2; pkill -TERM {mine};'
                f' for _ in $(seq {STOP_GRACE_S}); do pgrep {mine} >/dev/null || break;'
                f' sleep 1; done; pkill -KILL {mine}; fi; true')
        return [self.ssh(stop)]

    def copy(self) -> list:
        a = self.args
        if a.repo_url:
            clone = (f"rm -rf {REMOTE_REPO} && git clone {shlex.quote(a.repo_url)} {REMOTE_REPO}"
                     f" && git -C {REMOTE_REPO} checkout {shlex.quote(a.ref)}")
            return [self.ssh(clone)]
        tarball = os.path.join(tempfile.gettempdir(), f"score_jax-{a.name}.tar.gz")
        unpack = (f"rm -rf {REMOTE_REPO} && mkdir -p {REMOTE_REPO}"
                  f" && tar -xzf {REMOTE_REPO}.tar.gz -C {REMOTE_REPO}")
        return [
            ["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz",
             f"--output={tarball}", a.ref],
            self.gcloud("scp", [tarball, f"{a.name}:{REMOTE_REPO}.tar.gz"], self.all_workers),
            self.ssh(unpack),
        ]

    def setup(self) -> list:
        a = self.args
        apt = "sudo apt-get -o DPkg::Lock::Timeout=600"  # boot-time upgrades hold the lock
        packages = ["bubblewrap"]  # the sandbox that code rewards run model-written code in
        if re.fullmatch(r"python3\.\d+", a.python):
            packages += [a.python, f"{a.python}-venv"]
        lines = [f"{apt} update -qq", f"{apt} install -y -qq " + " ".join(packages)]
        pip = f"{REMOTE_VENV}/bin/pip"
        lines += [
            f"{shlex.quote(a.python)} -m venv {REMOTE_VENV}",
            f"{pip} install -q --upgrade pip",
            f'{pip} install -q -r {REMOTE_REPO}/requirements.txt "jax[tpu]=={a.jax_version}"'
            f" -f {LIBTPU_FIND_LINKS}",
            f'{REMOTE_VENV}/bin/python -c "import jax; print(jax.process_index(),'
            ' jax.local_device_count(), jax.device_count())"',
        ]
        return [self.ssh(" && ".join(lines))]

    def run(self) -> list:
        a = self.args
        overrides = list(self.overrides)
        if self.all_workers and not any(o.startswith("--config.distributed=") for o in overrides):
            overrides.append("--config.distributed=True")  # one JAX process per host
        train = " ".join([f"../{REMOTE_VENV}/bin/python -u -m score_jax.main",
                          shlex.quote(f"--config={a.config}"),
                          "--workdir=" + remote_workdir(a.workdir),
                          *map(shlex.quote, overrides)])
        # The subshell ignores SIGHUP (what nohup does) so the job outlives this ssh session,
        # and records the job's exit status for the wait step.
        job = (f'(trap "" HUP; cd {REMOTE_REPO} && {train}; echo $? > ../{self.exit})'
               f" > {self.log} 2>&1 < /dev/null & echo $! > {self.pid}")
        # Running: the recorded subshell still has its python child (a pid reused after a
        # reboot does not count, nor a subshell that is just writing the exit status).
        start = (f"mkdir -p {REMOTE_LOGS}"
                 f' && if [ -f {self.pid} ] && pgrep -P "$(cat {self.pid})" -f score_jax.main'
                 " >/dev/null;"
                 f' then echo "a score_jax job named {a.name} is still running" >&2; exit 1; fi'
                 f" && rm -f {self.exit} && {{ {job}; }}")
        return [self.ssh(start)]

    def wait(self) -> list:
        follow = (f'test -f {self.pid} || {{ echo "no job started: run the run step" >&2;'
                  f' exit 1; }}; tail -n 50 -f --pid="$(cat {self.pid})" {self.log};'
                  f' test -f {self.exit} || {{ echo "the job died without an exit status'
                  f' (killed or out of memory?)" >&2; exit 1; }}; exit "$(cat {self.exit})"')
        return [Command("wait", self.ssh(follow), probe="job")]

    def fetch(self) -> list:
        a = self.args
        local = a.local_dir or os.path.join("tpu_runs", a.name)
        if a.workdir.startswith("gs://"):
            pull = ["gcloud", "storage", "cp", "--recursive", a.workdir, local]
        else:
            pull = self.gcloud("scp", [f"{a.name}:{scp_path(a.workdir)}", local], ["--recurse"])
        return [["mkdir", "-p", local], pull,
                self.gcloud("scp", [f"{a.name}:{self.log}", local])]

    def delete(self) -> list:
        if self.args.queued:  # --force deletes its TPU too
            return [self.gcloud("delete", [self.args.name], ["--force", "--quiet"],
                                group="queued-resources")]
        return [self.gcloud("delete", [self.args.name], ["--quiet"])]


class Shell:
    """Runs commands for real: echoes each one to stderr; captures the output of probes."""

    def run(self, command: Command) -> Result:
        print("+ " + shlex.join(command.argv), file=sys.stderr, flush=True)
        capture = command.probe in ("done", "state", "active")
        try:
            done = subprocess.run(command.argv, check=False, text=True, capture_output=capture)
        except FileNotFoundError:
            return Result(127, f"{command.argv[0]} is not installed or not on PATH")
        output = (done.stdout or "") + ("" if done.returncode == 0 else done.stderr or "")
        return Result(done.returncode, output)

    def sleep(self, seconds: int, why: str) -> None:
        print(f"waiting {seconds} s: {why}", file=sys.stderr, flush=True)
        time.sleep(seconds)


class DryRun:
    """Prints each command (and each wait as `sleep N`) instead of running it; answers the
    probes as --simulate scripts: attempt i (counted by wait steps) ends as outcomes[i], the
    last outcome repeating. Every other command succeeds."""

    def __init__(self, outcomes: list, queued: bool = False):
        self.outcomes = outcomes
        self.queued = queued
        self.attempt = -1

    def run(self, command: Command) -> Result:
        print(shlex.join(command.argv), flush=True)
        if command.probe == "active":
            return Result(0, "ACTIVE\n")
        if command.probe == "job":
            self.attempt += 1
        if not command.probe:
            return Result(0)
        code, done, node, queued = OUTCOMES[self.outcomes[min(max(self.attempt, 0),
                                                              len(self.outcomes) - 1)]]
        if command.probe == "job":
            return Result(code)
        if command.probe == "done":
            return Result(0 if done else 1)
        state = queued if self.queued else node
        if state == "NOT_FOUND":
            return Result(1, "ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: the resource "
                          "was not found\n")
        return Result(0, state + "\n")

    def sleep(self, seconds: int, why: str) -> None:
        print(f"sleep {seconds}", flush=True)


def state_of(result: Result) -> str:
    """The state word a describe printed; NOT_FOUND when there is no such resource, UNKNOWN
    when the describe failed otherwise (auth, network) or printed nothing."""
    if result.code == 0:
        words = result.output.split()
        return words[0].upper() if words else "UNKNOWN"
    text = result.output
    return "NOT_FOUND" if "NOT_FOUND" in text or "was not found" in text else "UNKNOWN"


def classify(state: str, queued: bool) -> str:
    """ready, dead, gone, pending, or other (a state the loop does not handle)."""
    return (QUEUED_STATES if queued else NODE_STATES).get(state, "other")


class Observation(NamedTuple):
    """How an attempt ended, filled in as the loop probes: the step whose command ended it
    ("wait" when the job ran to its end, whatever its status) and that command's exit status;
    then whether the done file exists and what the TPU's state is (None: not probed yet)."""

    step: str
    code: int
    done: Optional[bool] = None
    state: Optional[str] = None


class Decision(NamedTuple):
    """What the loop does next. action: check (probe the done file), describe (probe the
    TPU), poll (describe again after --poll-interval), done, fail (exit with code), or a new
    attempt that runs steps: rerun, recreate, replace (delete, then recreate)."""

    action: str
    reason: str
    steps: tuple = ()
    code: int = 0


def decide(obs: Observation, queued: bool = False, durable: bool = True,
           done_name: str = "summary.json") -> Decision:
    """The loop's next move after an attempt: pure, so tests can walk every case. durable is
    whether the workdir outlives the TPU VM (gs://)."""
    if obs.step == "wait" and obs.done is None:
        return Decision("check", f"the job ended with exit status {obs.code}: is {done_name} "
                        "there?")
    if obs.done:
        return Decision("done", f"{done_name} exists: the run is done")
    if obs.step == "wait" and obs.code in FINAL_JOB_CODES:
        return Decision("fail", f"the job exited with status {obs.code} "
                        f"({FINAL_JOB_CODES[obs.code]}), which a rerun would repeat; see its "
                        "log (--steps=fetch)", code=obs.code)
    if obs.step != "wait":
        ended = f"step {obs.step} failed with exit status {obs.code}"
    elif obs.code == 0:
        ended = f"the job stopped on SIGTERM (after saving a checkpoint) without {done_name}"
    else:
        ended = (f"the job (or its ssh session) ended with exit status {obs.code} without "
                 f"{done_name}")
    if obs.state is None:
        return Decision("describe", f"{ended}: is the TPU still there?")
    what = "queued resource" if queued else "TPU VM"
    kind = classify(obs.state, queued)
    if kind == "ready":
        start = {"create": "copy", "copy": "copy", "setup": "setup"}.get(obs.step, "stop")
        steps = ATTEMPT_STEPS[ATTEMPT_STEPS.index(start):]
        return Decision("rerun", f"{ended}; the {what} is {obs.state}: rerun", steps)
    if kind in ("gone", "dead") and not durable:
        return Decision("fail", f"{ended}; the {what} is {obs.state}, and the workdir on its disk "
                        "is lost with it: a run that survives that needs a gs:// --workdir", code=1)
    if kind == "gone":
        return Decision("recreate", f"{ended}; the {what} is gone: recreate it", CREATE_STEPS)
    if kind == "dead":
        return Decision("replace", f"{ended}; the {what} is {obs.state}: delete and recreate it",
                        ("delete", *CREATE_STEPS))
    if kind == "pending":
        return Decision("poll", f"the {what} is {obs.state}: look again")
    return Decision("fail", f"{ended}; the {what} is {obs.state}, which --until-done does not "
                    "handle (start or delete it, then rerun)", code=1)


def run_steps(planner: "Planner", steps: list, runner) -> tuple:
    """Runs the commands of steps in order until one fails. Returns (step, code): the step
    of the last command run and its exit status (0 when all succeeded)."""
    step, code = (steps[-1] if steps else ""), 0
    for command in planner.plan(steps):
        step = command.step
        if command.probe == "active":
            code = wait_until_active(planner, command, runner)
        else:
            code = runner.run(command).code
            if code != 0:
                why = ("is not installed or not on PATH" if code == 127 else
                       f"failed (exit status {code})")
                print(f"error: step '{step}' {why}: {shlex.join(command.argv)}", file=sys.stderr)
        if code != 0:
            break
    return step, code


def wait_until_active(planner: "Planner", command: Command, runner) -> int:
    """Describes a new queued resource until it is ACTIVE (0), FAILED or gone (1), or
    --provision-timeout passes (1)."""
    args, waited = planner.args, 0
    while True:
        state = state_of(runner.run(command))
        kind = classify(state, queued=True)
        if kind == "ready":
            return 0
        if kind != "pending":
            print(f"error: the queued resource {args.name} is {state}: see `gcloud compute tpus "
                  f"queued-resources describe {args.name} --zone={args.zone}`", file=sys.stderr)
            return 1
        if waited >= args.provision_timeout:
            print(f"error: the queued resource {args.name} is still {state} after {waited} s "
                  "(--provision-timeout)", file=sys.stderr)
            return 1
        runner.sleep(args.poll_interval, f"the queued resource {args.name} is {state}")
        waited += args.poll_interval


def execute(planner: "Planner", steps: list, runner) -> int:
    """Runs the steps once; stops at the first failure with a hint. Returns an exit code."""
    step, code = run_steps(planner, steps, runner)
    if code != 0:
        print_failure_hint(step, planner.args)
    return code


def until_done(planner: "Planner", steps: list, runner) -> int:
    """--until-done: the selected steps up to wait, then as decide() says until the run is
    done (then fetch/delete as selected), a failure it cannot fix, or --max-attempts."""
    args = planner.args
    attempt_steps = [s for s in steps if s not in ("fetch", "delete")]
    after = [s for s in steps if s in ("fetch", "delete")]
    durable, name = args.workdir.startswith("gs://"), done_file(args)
    for attempt in range(1, args.max_attempts + 1):
        step, code = run_steps(planner, attempt_steps, runner)
        obs, waited = Observation(step, code), 0
        while True:
            decision = decide(obs, args.queued, durable, name)
            if decision.action == "check":
                obs = obs._replace(done=runner.run(planner.check()[0]).code == 0)
            elif decision.action == "describe":
                obs = obs._replace(state=state_of(runner.run(planner.describe()[0])))
            elif decision.action == "poll" and waited < args.provision_timeout:
                runner.sleep(args.poll_interval, decision.reason)
                obs, waited = obs._replace(state=None), waited + args.poll_interval
            elif decision.action == "poll":
                decision = Decision("fail", f"the TPU is still {obs.state} after {waited} s "
                                    "(--provision-timeout)", code=1)
                break
            else:
                break
        if decision.action == "fail":
            print(f"error: attempt {attempt} of {args.max_attempts}: {decision.reason}",
                  file=sys.stderr)
            print_failure_hint("", args)
            return decision.code
        print(f"attempt {attempt} of {args.max_attempts}: {decision.reason}", file=sys.stderr,
              flush=True)
        if decision.action == "done":
            return execute(planner, after, runner) if after else 0
        if attempt < args.max_attempts:
            runner.sleep(args.retry_wait, f"before attempt {attempt + 1} of {args.max_attempts}")
        attempt_steps = list(decision.steps)
    print(f"error: {name} is still missing after {args.max_attempts} attempts (--max-attempts); "
          "rerun with --until-done to go on from the last checkpoint", file=sys.stderr)
    print_failure_hint("", args)
    return 1


def print_failure_hint(step: str, args) -> None:
    """Tells the user what is still running (and costing money) after a failure."""
    if step == "wait":
        print("The job may still be running on the TPU VM; re-attach with --steps=wait "
              "(add fetch,delete as needed).", file=sys.stderr)
    if step != "delete":
        delete = Planner(args, []).delete()[0]
        print(f"The TPU VM {args.name!r} is not deleted (if it exists). Delete it with:\n  "
              + shlex.join(delete), file=sys.stderr)


def main(argv=None) -> int:
    args, steps, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    planner = Planner(args, overrides)
    if args.dry_run:
        runner = DryRun((args.simulate or "done").split(","), args.queued)
    elif shutil.which("gcloud") is None:
        print("error: gcloud is not on PATH: install the Google Cloud SDK "
              "(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`.",
              file=sys.stderr)
        return 2
    else:
        runner = Shell()
    code = (until_done if args.until_done else execute)(planner, steps, runner)
    if args.dry_run:
        if code:
            print(f"dry run: a real run would exit with status {code} here", file=sys.stderr)
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
