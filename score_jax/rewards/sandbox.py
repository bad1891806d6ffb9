"""Run untrusted Python programs in a bubblewrap sandbox, one at a time per warm sandbox.

A `Sandbox` is one `bwrap` process whose command is a small trusted supervisor (the "zygote":
score_jax/rewards/supervisor.py, its source text run with the sandbox's Python). The zygote is
the sandbox's pid 1, so programs can neither kill nor stop it. For each program it forks a fresh
child that sets its resource limits, runs the program and then its test code, and proves it
reached the end of the tests by writing a random nonce to a pipe. After every program, whatever
happened, the zygote kills every other process in the sandbox and wipes /tmp and /dev/shm, so
programs are isolated from each other although the sandbox is reused.

What a program gets (bwrap isolation):
  * namespaces: user, pid, net (loopback only), ipc, uts, cgroup; no nested user namespaces; no
    capabilities; a new session (no terminal injection).
  * an unprivileged uid, inside and outside: when the trainer runs as root, bwrap is started as
    SANDBOX_UID, because the kernel does not apply RLIMIT_NPROC to processes that are root in
    the initial namespace (a fork bomb would then be unbounded).
  * files: a read-only view of /, with private size-capped tmpfs on /tmp and /dev/shm, an empty
    /run, a minimal read-only /dev, a /proc showing only the sandbox's own processes, and the
    trainer's home hidden (unless the sandbox's Python lives there).
  * a fresh environment (PATH, HOME=/tmp, LANG only).
  * seccomp: SysV IPC, POSIX message queues, memfd, ptrace, process_vm_*, keyrings, bpf,
    perf_event_open, userfaultfd, io_uring, unshare, setns and clone(CLONE_NEWUSER) fail (memory
    that escapes rlimits, and kernel attack surface no test program needs).
  * per-program rlimits: CPU time, address space, file size, open files, processes (threads
    count too), no core files; a wall-clock deadline; output captured and capped.

The nonce is never in the program's argv, environment, files or inherited descriptors; it lives
only in the harness's memory until the tests end. A program written to search this harness's
own memory (its Python frames) could still forge a pass; nothing short of running the tests in
another process could stop that, and they must share the program's process.

bwrap older than 0.7 (Ubuntu 22.04 has 0.6) lacks --size: /tmp is then read-only rather than
uncapped. `isolation="rlimits"` (explicit opt-in, warned about) runs the zygote without bwrap:
same rlimits, unprivileged uid and process sweep, but the program sees the host's files, network
and processes, can kill its supervisor, and its orphans can escape the sweep. Use it only where
bwrap cannot run.

This module is the host side: it builds bwrap's command line, starts, feeds and recycles warm
sandboxes, and turns the supervisor's replies into Outcomes. The code that runs inside the
sandbox (the zygote and each program's harness) is score_jax/rewards/supervisor.py; the
seccomp filter is built by score_jax/rewards/seccomp.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings

from score_jax.rewards import seccomp
from score_jax.rewards import supervisor

SANDBOX_UID = 65534  # "nobody": used only when the trainer runs as root
ISOLATIONS = ("bwrap", "rlimits")
STATUSES = ("passed", "failed", "timeout", "crashed", "sandbox-error")
# Extra wall time the host grants the zygote (cleanup) before it kills the whole sandbox.
SUPERVISOR_GRACE_S = 3.0
SANDBOX_STARTUP_TIMEOUT_S = 30.0
_BWRAP_LOCATIONS = ("/usr/bin/bwrap", "/usr/local/bin/bwrap")  # if not on PATH
_PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")
_HIDDEN_DIRS = ("/tmp", "/run")
# Shipped as text to `python -c` in the sandbox: its uid may not be able to read the file.
_SUPERVISOR_SOURCE = pathlib.Path(supervisor.__file__).read_text(encoding="utf-8")

# Defined next to the code that enforces it (the supervisor must be self-contained); configure
# sandboxes through this name.
Limits = supervisor.Limits


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What happened to one program. `status` is one of STATUSES:
    passed: the test code ran to its end (the nonce came back);
    failed: the program or tests raised (assertion, any exception, sys.exit) before the end;
    timeout: the wall-clock or CPU-time limit was hit;
    crashed: the program's process ended without passing or raising (os._exit, a signal such
      as SIGSEGV, killing its supervisor);
    sandbox-error: the sandbox itself could not run the program."""
    status: str
    detail: str = ""
    output: str = ""
    elapsed_s: float = 0.0


class SandboxUnavailable(RuntimeError):
    """bwrap is missing or cannot create namespaces here."""


def bwrap_path() -> str:
    """Path of the bwrap binary; raises SandboxUnavailable, saying how to install it, if none."""
    path = shutil.which("bwrap") or next(
        (p for p in _BWRAP_LOCATIONS if os.access(p, os.X_OK)), None)
    if path is None:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) is not installed, so code rewards cannot be sandboxed; install it "
            "with `sudo apt-get install bubblewrap` (or pass isolation='rlimits' to accept a much "
            "weaker sandbox)")
    return path


def _sandbox_identity() -> tuple[int, int] | None:
    """(uid, gid) to start sandboxes as, or None to keep ours (we are not root)."""
    return (SANDBOX_UID, SANDBOX_UID) if os.geteuid() == 0 else None


def _reachable_by_others(path: str) -> bool:
    """True if a uid that owns nothing can execute `path` (every directory above is o+x)."""
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(path)
        while parent != "/":
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                return False
            parent = os.path.dirname(parent)
    except OSError:
        return False
    return True


def sandbox_python() -> str:
    """The interpreter programs run with: ours, unless the sandbox uid cannot reach it or it
    lives in a directory the sandbox hides (then the system python3)."""
    candidates = (os.path.realpath(sys.executable),) + _PYTHON_CANDIDATES
    for path in candidates:
        hidden = any(path.startswith(d + "/") for d in _HIDDEN_DIRS)
        if not hidden and (_sandbox_identity() is None or _reachable_by_others(path)):
            return path
    raise SandboxUnavailable(
        f"no Python the sandbox uid {SANDBOX_UID} can execute (tried {', '.join(candidates)}); "
        "install the system python3 (apt-get install python3)")


@functools.lru_cache(maxsize=None)
def bwrap_features(path: str) -> frozenset[str]:
    """The long options the bwrap at `path` accepts (from `bwrap --help`)."""
    text = subprocess.run([path, "--help"], capture_output=True, text=True, check=False)
    return frozenset(re.findall(r"(?m)^\s*(--[a-z0-9-]+)", text.stdout + text.stderr))


_warned_old_bwrap = False


def _bwrap_argv(limits: Limits, python: str, seccomp_fd: int | None, info_fd: int) -> list[str]:
    """bwrap's command line. Options newer than Ubuntu 22.04's bwrap 0.6 are used when
    present: without --size (bwrap < 0.7), /tmp and /dev/shm are read-only, since an uncapped
    tmpfs could fill RAM; without --disable-userns (< 0.8), seccomp alone stops nested user
    namespaces."""
    global _warned_old_bwrap
    path = bwrap_path()
    features = bwrap_features(path)
    argv = [path, "--unshare-all", "--unshare-user",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
            "--die-with-parent", "--as-pid-1", "--new-session", "--info-fd", str(info_fd),
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    if "--disable-userns" in features:
        argv.append("--disable-userns")
    for tmp in ("/tmp", "/dev/shm"):
        if "--size" in features:
            argv += ["--size", str(limits.tmp_bytes), "--tmpfs", tmp]
        else:
            argv += ["--tmpfs", tmp, "--remount-ro", tmp]
    if "--size" not in features and not _warned_old_bwrap:
        _warned_old_bwrap = True
        warnings.warn(f"{path} is older than bubblewrap 0.7 (no --size): sandboxed programs get "
                      "a read-only /tmp; install bubblewrap >= 0.7 for a writable, size-capped "
                      "one", RuntimeWarning, stacklevel=3)
    argv += ["--remount-ro", "/dev", "--tmpfs", "/run", "--remount-ro", "/run"]
    home = os.path.realpath(os.path.expanduser("~"))
    if home not in ("/", "/tmp") and os.path.isdir(home) and not python.startswith(home + "/"):
        argv += ["--tmpfs", home, "--remount-ro", home]
    argv += ["--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/tmp",
             "--setenv", "LANG", "C.UTF-8", "--chdir", "/tmp"]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv + ["--"]


class Sandbox:
    """One warm sandbox that runs programs one at a time (not thread-safe: one per thread).

    Starts lazily, restarts itself after a program breaks it or after
    `limits.programs_per_sandbox` programs, and kills everything it started on `close()`.
    """

    def __init__(self, limits: Limits = Limits(), isolation: str = "bwrap") -> None:
        if isolation not in ISOLATIONS:
            raise ValueError(f"unknown isolation {isolation!r}; use one of {ISOLATIONS}")
        if isolation == "bwrap":
            bwrap_path()  # fail now, with install instructions, not per program
        else:
            warnings.warn(
                "isolation='rlimits': untrusted programs run WITHOUT namespaces; they can read "
                "host files, use the network and see host processes. Install bubblewrap.",
                RuntimeWarning, stacklevel=2)
        self.limits = limits
        self.isolation = isolation
        self._proc: subprocess.Popen | None = None
        self._to_zygote = self._from_zygote = -1
        self._init_pidfd: int | None = None  # the sandbox's pid 1, held so its pid cannot be reused
        self._runs = 0
        self._started_once = False

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, program: str, tests: str, timeout_s: float) -> Outcome:
        """Runs `program`, then `tests` in the same namespace; never raises for what they do."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        start = time.monotonic()
        if self._proc is None or self._runs >= self.limits.programs_per_sandbox:
            self.close()
            error = self._start()
            if error and not self._started_once:  # a setup problem: say so before any work
                raise SandboxUnavailable(
                    f"{error}. If bwrap reports a permission problem, allow unprivileged user "
                    "namespaces (Debian: sysctl kernel.unprivileged_userns_clone=1; Ubuntu >= "
                    "23.10: sysctl kernel.apparmor_restrict_unprivileged_userns=0)")
            if error:
                return Outcome("sandbox-error", error, elapsed_s=time.monotonic() - start)
            self._started_once = True
        self._runs += 1
        request = {"program": program, "tests": tests, "timeout_s": float(timeout_s)}
        try:
            supervisor.write_frame(self._to_zygote, json.dumps(request).encode())
        except OSError as e:
            self.close()
            return Outcome("sandbox-error", f"sandbox supervisor gone: {e}",
                           elapsed_s=time.monotonic() - start)
        try:
            reply = supervisor.read_frame(self._from_zygote,
                                          time.monotonic() + timeout_s + SUPERVISOR_GRACE_S)
        except TimeoutError:  # the supervisor hangs (a program stopped it): kill everything
            self.close()
            return Outcome("timeout", "the sandbox stopped responding",
                           elapsed_s=time.monotonic() - start)
        if reply is None:  # the supervisor died: only a program can have killed it
            self.close()
            return Outcome("crashed", "the program killed its sandbox's supervisor",
                           elapsed_s=time.monotonic() - start)
        elapsed = time.monotonic() - start
        result = json.loads(reply)
        if not result.get("clean", False):
            self.close()
        return Outcome(result["status"], result.get("detail", ""), result.get("output", ""),
                       elapsed)

    def _start(self) -> str:
        """Starts bwrap + zygote and waits until it is ready; returns '' or an error message."""
        python = sandbox_python()
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        info_r, info_w = os.pipe()
        config = {"limits": dataclasses.asdict(self.limits), "isolation": self.isolation,
                  "req_fd": req_r, "resp_fd": resp_w}
        zygote = [python, "-I", "-S", "-B", "-c", _SUPERVISOR_SOURCE, json.dumps(config)]
        pass_fds = [req_r, resp_w]
        seccomp_r = None
        if self.isolation == "bwrap":
            bpf = seccomp.bpf_program()
            if bpf is not None:
                seccomp_r, seccomp_w = os.pipe()
                os.write(seccomp_w, bpf)
                os.close(seccomp_w)
                pass_fds.append(seccomp_r)
            pass_fds.append(info_w)
            argv = _bwrap_argv(self.limits, python, seccomp_r, info_w) + zygote
        else:
            argv = zygote
        identity = _sandbox_identity()
        kwargs = {"user": identity[0], "group": identity[1], "extra_groups": []} if identity else {}
        try:
            self._proc = subprocess.Popen(
                argv, env={}, pass_fds=pass_fds, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                cwd="/", **kwargs)
        except OSError as e:
            for fd in (req_r, req_w, resp_r, resp_w, info_r, info_w):
                os.close(fd)
            return f"could not start the sandbox: {e}"
        finally:
            if seccomp_r is not None:
                os.close(seccomp_r)
        for fd in (req_r, resp_w, info_w):
            os.close(fd)
        self._to_zygote, self._from_zygote = req_w, resp_r
        try:
            ready = supervisor.read_frame(resp_r, time.monotonic() + SANDBOX_STARTUP_TIMEOUT_S)
        except TimeoutError:
            ready = None
        if self.isolation == "bwrap":
            self._init_pidfd = _open_init_pidfd(info_r, self._proc.pid)
        os.close(info_r)
        if ready != b"ready":
            stderr = self._stderr_tail()
            self.close()
            return f"the sandbox did not start: {stderr or 'no message'}"
        return ""

    def _stderr_tail(self) -> str:
        if self._proc is None or self._proc.stderr is None:
            return ""
        fd = self._proc.stderr.fileno()
        os.set_blocking(fd, False)
        try:
            return (os.read(fd, 4096) or b"").decode(errors="replace").strip()
        except OSError:
            return ""

    def close(self) -> None:
        """Kills the sandbox and everything in it; returns once they are gone."""
        if self._proc is None:
            return
        for fd in (self._to_zygote, self._from_zygote):
            if fd >= 0:
                os.close(fd)
        self._to_zygote = self._from_zygote = -1
        if self.isolation == "rlimits":
            _kill_tree(self._proc.pid)
        elif self._init_pidfd is not None:
            # Kill the sandbox's pid 1 first: that ends its pid namespace, and bwrap, still
            # alive, reaps it (killing bwrap first would leave a zombie to the host's init).
            try:
                signal.pidfd_send_signal(self._init_pidfd, signal.SIGKILL)
                select.select([self._init_pidfd], [], [], 10.0)
            except ProcessLookupError:  # already gone
                pass
            os.close(self._init_pidfd)
            self._init_pidfd = None
        try:
            self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            supervisor.signal_quietly(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._proc.stderr.close()
        self._proc, self._runs = None, 0


def _open_init_pidfd(info_fd: int, bwrap_pid: int) -> int | None:
    """A pidfd on the sandbox's pid 1, whose host pid bwrap writes as JSON to --info-fd; None
    if unreadable or if that pid is no longer bwrap's child (it died and the pid was reused)."""
    data = b""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and select.select([info_fd], [], [], 0.5)[0]:
        chunk = os.read(info_fd, 4096)
        if not chunk:
            break
        data += chunk
        try:
            pid = int(json.loads(data)["child-pid"])
        except (ValueError, KeyError):
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        if supervisor.parent_pid(pid) == bwrap_pid:
            return pidfd
        os.close(pidfd)
        return None
    return None


def _kill_tree(root: int) -> None:
    """Stops, then kills, `root` and all its descendants (rlimits mode: no pid namespace)."""
    seen: set[int] = set()
    for _ in range(100):
        tree = {root} | supervisor.descendants(root)
        if tree <= seen:
            break
        for pid in tree - seen:
            supervisor.signal_quietly(pid, signal.SIGSTOP)
        seen |= tree
    for pid in seen:
        supervisor.signal_quietly(pid, signal.SIGKILL)
