"""Run a score_jax config on a SLURM GPU cluster: writes a batch script and, with --submit,
sbatch's it.

    python launch/slurm.py --name=sft --nodes=2 --gpus-per-node=8 --partition=gpu \
        --time=24:00:00 --config=configs/sft.py --workdir=/shared/runs/sft \
        --config.total_steps=1000 --dry-run

The script, run by SLURM on the job's first node:
  - cds to --repo-dir (default: this checkout; it and the venv must be on a filesystem every
    node sees, and so must a non-gs:// workdir), so a relative --workdir is relative to it;
  - builds the venv (--venv, default ~/score_jax_cuda_venv) with --python and
    requirements-cuda.txt (requirements.txt with jax[cuda12] at the same jax version) when it
    is missing or was built from another requirements-cuda.txt; on a cluster whose compute
    nodes have no internet, build it once on a login node with the same commands;
  - runs `srun ... python -m score_jax.main --config=... --workdir=... --config.distributed=True
    [--config.k=v ...]`: --procs=per-gpu (default) starts one process per GPU, and JAX gives
    each process the GPU of its SLURM_LOCALID; --procs=per-node starts one per node and sets
    JAX_LOCAL_DEVICE_IDS to all of the node's GPUs (JAX would otherwise give it GPU 0 only).
    JAX reads the coordinator, process count and process id from SLURM's variables.
    --kill-on-bad-exit ends every process when one fails, so no process waits on a lost peer;
  - reruns until <workdir>/summary.json exists (eval.json for configs/eval.py; --done-file
    names another): the job exiting 2 (a config, data or workdir error) or 3 (non-finite
    training) ends it, since a rerun would repeat them. Exit 0 without the file means the
    processes saved on SIGTERM: `#SBATCH --signal=TERM@120` sends that 120 s (--signal-time)
    before the time limit, and the script then requeues the job (`scontrol requeue`, at most
    --max-requeues times, counted by SLURM_RESTART_COUNT), which resumes from that checkpoint
    in a new allocation. Any other failure (a crashed or lost process) is rerun in the same
    allocation after --retry-wait s, up to --max-attempts runs, then requeued. `#SBATCH
    --requeue` lets SLURM requeue the job itself after a node failure or a preemption; when
    the script itself gets SIGTERM (preemption, scancel) it waits for the processes to save and
    leaves the requeueing to SLURM.
The log is <log-dir>/NAME-JOBID.out (default log dir: runs/slurm in the repo), appended to
across requeues.

Without --submit or --dry-run the script is written (--script, default runs/slurm/NAME.sbatch)
and the sbatch command printed; --dry-run prints the script and writes nothing. Pure
standard library.
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = "requirements-cuda.txt"
NAME_RE = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,63}")
OVERRIDE_RE = re.compile(r"--config\.[A-Za-z_][\w.]*=.*", re.DOTALL)
ENV_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)
# Exit statuses of score_jax.main that a rerun would only repeat (see score_jax/main.py).
FINAL_JOB_CODES = (2, 3)


def build_parser() -> argparse.ArgumentParser:
    """All flags; extra `--config.KEY=VALUE` arguments are collected separately."""
    p = argparse.ArgumentParser(
        description="Write (and with --submit, sbatch) a SLURM batch script that runs a "
        "score_jax config on GPU nodes. Extra --config.KEY=VALUE arguments are passed through "
        "to score_jax.main.", allow_abbrev=False)
    p.add_argument("--name", default="score_jax", help="SLURM job name (default score_jax).")
    p.add_argument("--config", required=True, help="Config file for score_jax.main, relative "
                   "to the repo (e.g. configs/sft.py or configs/sft.py:arg).")
    p.add_argument("--workdir", required=True, help="Run directory on a filesystem every node "
                   "sees (absolute, relative to --repo-dir, or gs://).")
    p.add_argument("--nodes", type=int, default=1, help="Nodes (default 1).")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8).")
    p.add_argument("--gpu-type", help="GPU type in the gres request (--gres=gpu:TYPE:N).")
    p.add_argument("--procs", choices=("per-gpu", "per-node"), default="per-gpu",
                   help="One JAX process per GPU (default) or one per node owning all its GPUs.")
    p.add_argument("--cpus-per-task", type=int, help="CPUs per process.")
    p.add_argument("--partition", help="SLURM partition.")
    p.add_argument("--account", help="SLURM account.")
    p.add_argument("--time", help="Time limit (e.g. 24:00:00); default: the partition's.")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="Another #SBATCH option, e.g. --sbatch=--exclusive (repeatable).")
    p.add_argument("--repo-dir", default=str(REPO_ROOT), help="This checkout as the nodes see "
                   "it (default: this checkout).")
    p.add_argument("--venv", default="~/score_jax_cuda_venv",
                   help="The CUDA venv (default ~/score_jax_cuda_venv).")
    p.add_argument("--python", default="python3.11", help="Interpreter that builds the venv.")
    p.add_argument("--prelude", action="append", default=[], metavar="LINE",
                   help="A shell line run first, e.g. 'module load python/3.11' (repeatable).")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="An environment variable for every process (repeatable).")
    p.add_argument("--done-file", help="The file a finished run writes in its workdir "
                   "(default summary.json; eval.json for configs/eval.py).")
    p.add_argument("--max-attempts", type=int, default=3, help="Runs per allocation before a "
                   "requeue (default 3).")
    p.add_argument("--max-requeues", type=int, default=10, help="Requeues the script asks for "
                   "at most (default 10).")
    p.add_argument("--retry-wait", type=int, default=60, help="Seconds before a rerun in the "
                   "same allocation (default 60).")
    p.add_argument("--signal-time", type=int, default=120, help="SIGTERM this many seconds "
                   "before the time limit, for the final save (default 120).")
    p.add_argument("--log-dir", help="Where SLURM writes the log (default runs/slurm in the repo).")
    p.add_argument("--script", help="Where to write the batch script (default "
                   "runs/slurm/NAME.sbatch in the repo).")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--submit", action="store_true", help="Write the script and sbatch it.")
    action.add_argument("--dry-run", action="store_true", help="Print the script; write nothing.")
    return p


def parse_args(argv: list) -> tuple:
    """Returns (args, overrides); exits with a usage error on bad input."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = []
    for arg in extra:
        if not OVERRIDE_RE.fullmatch(arg):
            parser.error(f"unrecognized argument {arg!r}: only --config.KEY=VALUE overrides "
                         "(with '=') are passed through to score_jax.main.")
        overrides.append(arg)
    if not NAME_RE.fullmatch(args.name):
        parser.error(f"--name={args.name!r} must be 1-64 letters, digits, '-', '_' or '.'.")
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus-per-node must be at least 1.")
    if args.max_attempts < 1 or min(args.max_requeues, args.retry_wait, args.signal_time) < 0:
        parser.error("--max-attempts must be at least 1 and --max-requeues, --retry-wait and "
                     "--signal-time at least 0.")
    for env in args.env:
        if not ENV_RE.fullmatch(env):
            parser.error(f"--env={env!r} is not KEY=VALUE.")
    for option in args.sbatch:
        if not option.startswith("-") or "\n" in option:
            parser.error(f"--sbatch={option!r} is not one sbatch option (e.g. --exclusive).")
    return args, overrides


def done_file(args) -> str:
    """eval.json for the eval job, else summary.json (see score_jax/jobs), or --done-file."""
    if args.done_file:
        return args.done_file
    config_file = args.config.split(":", 1)[0]
    return "eval.json" if os.path.basename(config_file) == "eval.py" else "summary.json"


def shell_path(path: str) -> str:
    """A path as a shell word; a leading ~/ becomes "$HOME"/."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def sbatch_options(args) -> list:
    """The #SBATCH options, in the script's order."""
    tasks = args.gpus_per_node if args.procs == "per-gpu" else 1
    gres = f"gpu:{args.gpu_type}:{args.gpus_per_node}" if args.gpu_type else \
        f"gpu:{args.gpus_per_node}"
    log_dir = args.log_dir or os.path.join(args.repo_dir, "runs", "slurm")
    options = [f"--job-name={args.name}", f"--nodes={args.nodes}",
               f"--ntasks-per-node={tasks}", f"--gres={gres}"]
    if args.cpus_per_task:
        options.append(f"--cpus-per-task={args.cpus_per_task}")
    for flag in ("partition", "account", "time"):
        if getattr(args, flag):
            options.append(f"--{flag}={getattr(args, flag)}")
    options += [f"--output={os.path.join(log_dir, '%x-%j.out')}", "--open-mode=append",
                "--requeue", f"--signal=TERM@{args.signal_time}", *args.sbatch]
    return options


def srun_argv(args, overrides: list) -> list:
    """srun and the training command (the venv's python is "$VENV"/bin/python)."""
    tasks = args.gpus_per_node if args.procs == "per-gpu" else 1
    overrides = list(overrides)
    if not any(o.startswith("--config.distributed=") for o in overrides):
        overrides.append("--config.distributed=True")
    return ["srun", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks}",
            "--kill-on-bad-exit=1", '"$VENV"/bin/python', "-u", "-m", "score_jax.main",
            shlex.quote(f"--config={args.config}"), shlex.quote(f"--workdir={args.workdir}"),
            *map(shlex.quote, overrides)]


def render(args, overrides: list) -> str:
    """The batch script."""
    name = done_file(args)
    target = args.workdir.rstrip("/") + "/" + name
    if args.workdir.startswith("gs://"):
        check = f"gcloud storage ls {shlex.quote(target)} >/dev/null 2>&1"
    else:
        check = f"test -f {shlex.quote(target)}"
    procs = args.nodes * (args.gpus_per_node if args.procs == "per-gpu" else 1)
    how = "one per GPU" if args.procs == "per-gpu" else "one per node"
    env = [f"export {k}={shlex.quote(v)}" for k, v in (ENV_RE.fullmatch(e).groups()
                                                       for e in args.env)]
    if args.procs == "per-node":
        devices = ",".join(map(str, range(args.gpus_per_node)))
        env.append(f"export JAX_LOCAL_DEVICE_IDS={devices}  # all the node's GPUs, one process")
    words = srun_argv(args, overrides)
    at = words.index('"$VENV"/bin/python')
    srun = " \\\n    ".join([" ".join(words[:at]), " ".join(words[at:at + 6]), *words[at + 6:]])
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in sbatch_options(args)),
             f"# Written by launch/slurm.py: score_jax.main in {procs} processes ({how}), rerun "
             f"until {target} exists.",
             "set -uo pipefail",
             f"cd {shlex.quote(args.repo_dir)} || exit 2",
             *args.prelude,
             "export PYTHONUNBUFFERED=1",
             *env,
             f"VENV={shell_path(args.venv)}",
             "",
             f"# The venv, built when missing or built from another {REQUIREMENTS}.",
             f'if ! cmp -s {REQUIREMENTS} "$VENV"/{REQUIREMENTS}; then',
             f'  echo "score_jax: building $VENV from {REQUIREMENTS}" >&2',
             f'  {{ {shlex.quote(args.python)} -m venv "$VENV" && "$VENV"/bin/pip install -q '
             '--upgrade pip \\',
             f'    && "$VENV"/bin/pip install -q -r {REQUIREMENTS} \\',
             f'    && cp {REQUIREMENTS} "$VENV"/{REQUIREMENTS}; }} \\',
             '    || { echo "score_jax: building the venv failed" >&2; exit 2; }',
             "fi",
             "",
             f"run_done() {{ {check}; }}",
             "if run_done; then",
             f'  echo "score_jax: {target} exists: the run is done" >&2',
             "  exit 0",
             "fi",
             "",
             "# A preemption's or scancel's SIGTERM reaches the processes too: wait while",
             "# they save.",
             "stopping=0",
             "trap 'stopping=1; echo \"score_jax: SIGTERM: waiting for the processes to save\" "
             ">&2' TERM",
             "restarts=${SLURM_RESTART_COUNT:-0}",
             "attempt=1",
             "while :; do",
             f'  echo "score_jax: attempt $attempt of {args.max_attempts} in this allocation, '
             f'requeued $restarts times" >&2',
             f"  {srun} &",
             "  job=$!",
             '  while kill -0 "$job" 2>/dev/null; do wait "$job"; done',
             '  wait "$job"; code=$?  # srun\'s exit status (bash keeps it)',
             "  if run_done; then",
             f'    echo "score_jax: {target} exists: the run is done" >&2',
             "    exit 0",
             "  fi",
             "  case $code in",
             "    " + "|".join(map(str, FINAL_JOB_CODES)) + ')',
             '      echo "score_jax: exit status $code (2: a config, data or workdir error; '
             '3: non-finite training): not rerun" >&2',
             '      exit "$code";;',
             "  esac",
             '  if [ "$stopping" = 1 ]; then',
             '    echo "score_jax: stopped by SIGTERM (exit status $code); SLURM requeues a '
             'preempted job, else sbatch this script again to resume" >&2',
             '    exit "$code"',
             "  fi",
             f'  if [ "$code" = 0 ] || [ "$attempt" -ge {args.max_attempts} ]; then',
             "    # Exit 0 without the done file: the processes saved on the time limit's SIGTERM",
             "    # (--signal); or this allocation failed too often. Go on in a new allocation.",
             f'    if [ "$restarts" -ge {args.max_requeues} ]; then',
             f'      echo "score_jax: exit status $code after {args.max_requeues} requeues '
             '(--max-requeues): giving up" >&2',
             "      exit 1",
             "    fi",
             '    echo "score_jax: exit status $code without the done file: requeueing job '
             '$SLURM_JOB_ID" >&2',
             '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
             '    echo "score_jax: scontrol requeue failed: sbatch this script again to resume" '
             '>&2',
             "    exit 1",
             "  fi",
             '  echo "score_jax: exit status $code (a crashed or lost process): rerunning in '
             f'{args.retry_wait} s" >&2',
             f"  sleep {args.retry_wait}",
             "  attempt=$((attempt + 1))",
             "done",
             ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    script = render(args, overrides)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    default = os.path.join(args.repo_dir, "runs", "slurm", f"{args.name}.sbatch")
    path = Path(args.script or default)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    # SLURM does not create the log's directory: the job would fail without a word.
    Path(args.log_dir or os.path.join(args.repo_dir, "runs", "slurm")).mkdir(parents=True,
                                                                             exist_ok=True)
    submit = ["sbatch", str(path)]
    if not args.submit:
        print(f"wrote {path}; submit it with: {shlex.join(submit)}")
        return 0
    if shutil.which("sbatch") is None:
        print(f"error: sbatch is not on PATH (run this on a SLURM login node); the script is "
              f"{path}", file=sys.stderr)
        return 2
    print("+ " + shlex.join(submit), file=sys.stderr, flush=True)
    return subprocess.run(submit, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
