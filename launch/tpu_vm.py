"""Run a score_jax config on a Cloud TPU VM (one host) or a pod slice (all hosts) with gcloud.

    python launch/tpu_vm.py --name=score-1 --zone=us-west4-a \
        --config=configs/sft.py --workdir=runs/sft '--config.run_name=my run' --dry-run

Steps, always run in this order (pick a subset with --steps):
  create  gcloud compute tpus tpu-vm create (on-demand, --spot or --preemptible).
  copy    ships the repo to every host: a `git archive` tarball of --ref (committed files
          only) sent with tpu-vm scp, or, with --repo-url, a `git clone` on each host.
  setup   python3.11 venv ~/score_jax_venv with requirements.txt plus jax[tpu] at the same
          jax version (PyPI carries the matching libtpu; the libtpu find-links page is kept
          as a fallback for versions that predate that).
  run     starts `python -m score_jax.main --config=... --workdir=... [--config.k=v ...]`
          in ~/score_jax as a background job immune to hangups (like nohup), so it outlives
          the ssh session; it logs to ~/score_jax_logs/NAME.log and leaves its exit status
          in NAME.exit. Refuses to start while a job of the same name is running.
  wait    follows that log until the job ends and exits with the job's status. The job
          does not depend on this ssh session: if it drops, re-attach with --steps=wait.
  fetch   copies the run directory to --local-dir (scp from worker 0, or `gcloud storage
          cp` for a gs:// workdir) plus the log.
  delete  deletes the TPU VM; only with --delete-after or when named in --steps.
Default: create,copy,setup,run,wait,fetch (+delete with --delete-after). Stop after `run`
to leave the job running: --steps=create,copy,setup,run.

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
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS = ("create", "copy", "setup", "run", "wait", "fetch", "delete")
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
NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
OVERRIDE_RE = re.compile(r"--config\.[A-Za-z_][\w.]*=.*", re.DOTALL)


class Command(NamedTuple):
    """One command of the plan: the step it belongs to and its argv (no shell locally)."""

    step: str
    argv: list


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
        chosen = set(STEPS) - {"delete"}
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


def is_multi_host(args) -> bool:
    """True for pod slices larger than one host (more than 8 cores/chips)."""
    return parse_accelerator(args.accelerator)[1] > MAX_SINGLE_HOST


def remote_workdir(workdir: str) -> str:
    """The workdir as a remote shell word; relative paths are anchored at "$HOME"."""
    if workdir.startswith("gs://") or workdir.startswith("/"):
        return shlex.quote(workdir)
    relative = workdir[2:] if workdir.startswith("~/") else workdir
    return '"$HOME"/' + shlex.quote(relative)


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

    def gcloud(self, verb: str, positionals: list, flags: list = ()) -> list:
        """`gcloud compute tpus tpu-vm VERB POSITIONALS --zone [--project] FLAGS`."""
        project = [f"--project={self.args.project}"] if self.args.project else []
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *positionals,
                f"--zone={self.args.zone}", *project, *flags]

    def ssh(self, remote_command: str) -> list:
        """One remote shell command, on every host of the slice."""
        return self.gcloud("ssh", [self.args.name],
                           [*self.all_workers, f"--command={remote_command}"])

    def plan(self, steps: list) -> list:
        """All commands of the given steps, in order."""
        return [Command(step, argv) for step in steps for argv in getattr(self, step)()]

    def create(self) -> list:
        a = self.args
        version = a.version or RUNTIME_BY_FAMILY[parse_accelerator(a.accelerator)[0]]
        capacity = ["--spot"] if a.spot else ["--preemptible"] if a.preemptible else []
        return [self.gcloud("create", [a.name], [f"--accelerator-type={a.accelerator}",
                                                 f"--version={version}", *capacity])]

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
        start = (f"mkdir -p {REMOTE_LOGS}"
                 f' && if [ -f {self.pid} ] && kill -0 "$(cat {self.pid})" 2>/dev/null;'
                 f' then echo "a score_jax job named {a.name} is still running" >&2; exit 1; fi'
                 f" && rm -f {self.exit} && {{ {job}; }}")
        return [self.ssh(start)]

    def wait(self) -> list:
        follow = (f'test -f {self.pid} || {{ echo "no job started: run the run step" >&2;'
                  f' exit 1; }}; tail -n 50 -f --pid="$(cat {self.pid})" {self.log};'
                  f' test -f {self.exit} || {{ echo "the job died without an exit status'
                  f' (killed or out of memory?)" >&2; exit 1; }}; exit "$(cat {self.exit})"')
        return [self.ssh(follow)]

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
        return [self.gcloud("delete", [self.args.name], ["--quiet"])]


def execute(commands: list, args) -> int:
    """Runs commands in order; stops at the first failure with a hint. Returns an exit code."""
    if shutil.which("gcloud") is None:
        print("error: gcloud is not on PATH: install the Google Cloud SDK "
              "(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`.",
              file=sys.stderr)
        return 2
    for command in commands:
        print("+ " + shlex.join(command.argv), file=sys.stderr, flush=True)
        try:
            code = subprocess.run(command.argv, check=False).returncode
        except FileNotFoundError:
            code, why = 127, f"{command.argv[0]} is not installed or not on PATH"
        else:
            why = f"exit status {code}"
        if code != 0:
            print(f"error: step '{command.step}' failed ({why}): {shlex.join(command.argv)}",
                  file=sys.stderr)
            print_failure_hint(command.step, args)
            return code
    return 0


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
    commands = Planner(args, overrides).plan(steps)
    if args.dry_run:
        for command in commands:
            print(shlex.join(command.argv))
        return 0
    return execute(commands, args)


if __name__ == "__main__":
    sys.exit(main())
