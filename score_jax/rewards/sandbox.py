"""Run untrusted Python programs in a bubblewrap sandbox, one at a time per warm sandbox.

A `Sandbox` is one `bwrap` process whose command is a small trusted supervisor (the "zygote",
`_zygote_main` below: this file's own source, run with the sandbox's Python). The zygote is the
sandbox's pid 1, so programs can neither kill nor stop it. For each program it forks a fresh
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

This module imports only the standard library (Python >= 3.9): the sandbox runs it as a script.
"""
from __future__ import annotations  # the sandbox's Python may be older than ours (>= 3.9)

import ctypes
import dataclasses
import fcntl
import functools
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import warnings

SANDBOX_UID = 65534  # "nobody": used only when the trainer runs as root
ISOLATIONS = ("bwrap", "rlimits")
STATUSES = ("passed", "failed", "timeout", "crashed", "sandbox-error")
# Extra wall time the host grants the zygote (cleanup) before it kills the whole sandbox.
SUPERVISOR_GRACE_S = 3.0
SANDBOX_STARTUP_TIMEOUT_S = 30.0
_BWRAP_LOCATIONS = ("/usr/bin/bwrap", "/usr/local/bin/bwrap")  # if not on PATH
_PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")
_HIDDEN_DIRS = ("/tmp", "/run")
_NONCE_FD = 3  # in a program's process: the marker pipe (write end)
_MARKER_BYTES = 1 << 16  # kept from the marker pipe


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-program resource limits. Memory and processes multiply: a program can hold at most
    about max_processes * memory_bytes + 2 * tmp_bytes of RAM."""
    memory_bytes: int = 1 << 30  # RLIMIT_AS of each process
    max_processes: int = 16  # RLIMIT_NPROC: processes and threads a program may start
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 16 << 10  # stdout+stderr kept; the rest is read and dropped
    tmp_bytes: int = 64 << 20  # size of the private /tmp, and of /dev/shm
    programs_per_sandbox: int = 500  # recycle a warm sandbox after this many programs

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{field.name} must be a positive integer, got {value!r}")


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


# ================================================================================ host side

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


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """Classic-BPF seccomp program for this CPU, or None on CPUs other than x86_64 / aarch64.

    Denies (EPERM) _DENIED_SYSCALLS and clone() with CLONE_NEWUSER, so no nested user
    namespace can be made even where bwrap lacks --disable-userns; clone3() gets ENOSYS (its
    flags sit in memory a filter cannot read; libc then falls back to clone()). Other ABIs
    (i386 on x86_64: killed; x32: denied) cannot sidestep the filter.
    """
    machine = machine or platform.machine()
    arch = {"x86_64": 0, "amd64": 0, "aarch64": 1, "arm64": 1}.get(machine.lower())
    if arch is None:
        return None
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ/JGE/JSET|K, RET
    allow, kill = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ERRNO | errno
    clone, clone3 = (56, 220)[arch], 435
    denied = sorted({numbers[arch] for numbers in _DENIED_SYSCALLS.values()})
    # (code, true target label or None, k); labels are resolved to jump offsets below.
    body = [(ld, None, 4), (jeq, "check_nr", (0xC000003E, 0xC00000B7)[arch]), (ret, None, kill),
            ("check_nr", None, None), (ld, None, 0)]
    if arch == 0:
        body.append((jge, "deny", 0x40000000))  # x32 syscall numbers
    body += [(jeq, "deny", nr) for nr in denied]
    body += [(jeq, "enosys", clone3), (jeq, "check_clone", clone), (ret, None, allow),
             ("check_clone", None, None), (ld, None, 16),  # low word of args[0]: clone flags
             (jset, "deny", 0x10000000), (ret, None, allow),  # CLONE_NEWUSER
             ("deny", None, None), (ret, None, eperm), ("enosys", None, None), (ret, None, enosys)]
    labels, program = {}, []
    for code, target, k in body:
        if isinstance(code, str):
            labels[code] = len(program)
        else:
            program.append((code, target, k))
    out = []
    for i, (code, target, k) in enumerate(program):
        jt = labels[target] - i - 1 if target else 0
        out.append(struct.pack("HBBI", code, jt, 0, k))
    return b"".join(out)


_DENIED_SYSCALLS = {  # name: (x86_64, aarch64)
    "shmget": (29, 194), "shmat": (30, 196), "shmctl": (31, 195), "semget": (64, 190),
    "msgget": (68, 186), "mq_open": (240, 180), "memfd_create": (319, 279),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "unshare": (272, 97),
    "setns": (308, 268),
}


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
            _write_frame(self._to_zygote, json.dumps(request).encode())
        except OSError as e:
            self.close()
            return Outcome("sandbox-error", f"sandbox supervisor gone: {e}",
                           elapsed_s=time.monotonic() - start)
        try:
            reply = _read_frame(self._from_zygote,
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
        zygote = [python, "-I", "-S", "-B", "-c", _ZYGOTE_SOURCE, json.dumps(config)]
        pass_fds = [req_r, resp_w]
        seccomp_r = None
        if self.isolation == "bwrap":
            bpf = seccomp_filter()
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
            ready = _read_frame(resp_r, time.monotonic() + SANDBOX_STARTUP_TIMEOUT_S)
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
            _signal_quietly(self._proc.pid, signal.SIGKILL)
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
        if _parent_pid(pid) == bwrap_pid:
            return pidfd
        os.close(pidfd)
        return None
    return None


def _signal_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_tree(root: int) -> None:
    """Stops, then kills, `root` and all its descendants (rlimits mode: no pid namespace)."""
    seen: set[int] = set()
    for _ in range(100):
        tree = {root} | _descendants(root)
        if tree <= seen:
            break
        for pid in tree - seen:
            _signal_quietly(pid, signal.SIGSTOP)
        seen |= tree
    for pid in seen:
        _signal_quietly(pid, signal.SIGKILL)


# =========================================================================== shared helpers

def _write_frame(fd: int, payload: bytes) -> None:
    data = struct.pack(">I", len(payload)) + payload
    while data:
        data = data[os.write(fd, data):]


def _read_frame(fd: int, deadline: float | None) -> bytes | None:
    """One length-prefixed frame, or None on EOF; TimeoutError once `deadline` (monotonic)
    passes."""
    header = _read_exact(fd, 4, deadline)
    if header is None:
        return None
    return _read_exact(fd, struct.unpack(">I", header)[0], deadline)


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    data = b""
    while len(data) < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError("no reply from the sandbox before the deadline")
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    return int(stat_line[stat_line.rindex(b")") + 2:].split()[1])


def _descendants(root: int) -> set[int]:
    """Pids whose parent chain reaches `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        ppid = _parent_pid(int(name))
        if ppid is not None:
            children.setdefault(ppid, []).append(int(name))
    found, frontier = set(), [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


# ====================================================================== inside the sandbox

_BASE_EXCEPTION = BaseException  # programs may rebind builtins.BaseException
_PRELOADED = ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string",
              "typing", "hashlib", "random", "statistics", "fractions", "decimal", "operator",
              "copy", "datetime", "json", "array")


def _zygote_main(config: dict) -> None:
    """Serves programs: one request frame in, one fork, one reply frame out, repeat until EOF."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: programs cannot ptrace or read our memory
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of programs come back to us
    if sys.version_info < (3, 9):
        sys.exit(f"the sandbox's Python {sys.version.split()[0]} is too old: need >= 3.9")
    for name in _PRELOADED:  # children start with these imported (fork is copy-on-write)
        try:
            __import__(name)
        except ImportError:
            pass
    limits = Limits(**config["limits"])
    req_fd, resp_fd = config["req_fd"], config["resp_fd"]
    in_bwrap = config["isolation"] == "bwrap"
    _write_frame(resp_fd, b"ready")
    while True:
        request = _read_frame(req_fd, None)
        if request is None:
            return
        reply = _run_one(json.loads(request), limits, in_bwrap)
        _write_frame(resp_fd, json.dumps(reply).encode())
        if not reply["clean"]:
            return


def _run_one(request: dict, limits: Limits, in_bwrap: bool) -> dict:
    """Forks one program, waits for it within its deadline, classifies, then cleans up."""
    timeout_s = request["timeout_s"]
    workdir = "/tmp" if in_bwrap else _fresh_workdir()
    nonce = os.urandom(16).hex()
    out_r, out_w = os.pipe()
    mark_r, mark_w = os.pipe()
    try:  # fewer wake-ups when a program floods its output
        fcntl.fcntl(out_r, fcntl.F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(out_r)
            os.close(mark_r)
            _child(request, nonce, out_w, mark_w, limits, workdir, in_bwrap)
        finally:
            os._exit(70)
    os.close(out_w)
    os.close(mark_w)
    pidfd = os.pidfd_open(pid)
    output, marker = bytearray(), bytearray()
    streams = {out_r: (output, limits.output_bytes), mark_r: (marker, _MARKER_BYTES)}
    deadline = start + timeout_s
    exited = False
    while not exited:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready = select.select(list(streams) + [pidfd], [], [], remaining)[0]
        for fd in ready:
            if fd == pidfd:
                exited = True
            elif not _read_into(fd, *streams[fd]):
                del streams[fd]
    timed_out = not exited
    if timed_out:
        _signal_quietly(pid, signal.SIGKILL)
    _, wait_status, rusage = os.wait4(pid, 0)
    os.close(pidfd)
    clean = _sweep(in_bwrap)
    for fd, (buffer, cap) in streams.items():  # the writers are dead: read what is left
        os.set_blocking(fd, False)
        try:
            while _read_into(fd, buffer, cap):
                pass
        except BlockingIOError:  # a writer survived the sweep (then clean is False)
            pass
    os.close(out_r)
    os.close(mark_r)
    clean = _wipe(workdir, keep_root=in_bwrap) and clean
    if in_bwrap:
        clean = _wipe("/dev/shm", keep_root=True) and clean
    cpu_s = rusage.ru_utime + rusage.ru_stime
    status, detail = _classify(timed_out, wait_status, cpu_s, timeout_s, bytes(marker), nonce)
    return {"status": status, "detail": detail, "clean": clean,
            "output": output[:limits.output_bytes].decode(errors="replace")}


def _read_into(fd: int, buffer: bytearray, cap: int) -> bool:
    """Appends one read of `fd` to `buffer`, dropping what goes beyond `cap` bytes; False at
    EOF."""
    chunk = os.read(fd, 1 << 20)
    if len(buffer) < cap:
        buffer += chunk[:cap - len(buffer)]
    return bool(chunk)


def _classify(timed_out: bool, wait_status: int, cpu_s: float, timeout_s: float,
              marker: bytes, nonce: str) -> tuple[str, str]:
    lines = marker.decode(errors="replace").splitlines()
    if not lines or lines[0] != "started":  # the child died before the program ran
        return "sandbox-error", "the sandboxed process could not set itself up"
    if timed_out:
        return "timeout", f"still running after {timeout_s:g}s wall time"
    if f"passed {nonce}" in lines:
        return "passed", ""
    cpu_limit = math.ceil(timeout_s)
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_s >= cpu_limit):
            return "timeout", f"used {cpu_s:.1f}s of CPU time"
    failures = [line[len("failed "):] for line in lines if line.startswith("failed ")]
    if failures:
        return "failed", failures[0]
    if os.WIFSIGNALED(wait_status):
        return "crashed", f"killed by {signal.Signals(os.WTERMSIG(wait_status)).name}"
    return "crashed", f"exited with status {os.waitstatus_to_exitcode(wait_status)} before the " \
                      "tests finished"


def _child(request: dict, nonce: str, out_w: int, mark_w: int, limits: Limits, workdir: str,
           in_bwrap: bool) -> None:
    """In the forked child: confine this process, run program + tests, report. Never returns."""
    import builtins
    import resource

    os.setsid()
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE 1: a normal process (own /proc)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    os.dup2(mark_w, _NONCE_FD)
    os.closerange(_NONCE_FD + 1, 1 << 16)  # our request/reply pipes and everything else
    cpu = math.ceil(request["timeout_s"])
    nproc = limits.max_processes + (2 if in_bwrap else _count_uid_processes())
    for rlimit, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                          (resource.RLIMIT_AS, limits.memory_bytes),
                          (resource.RLIMIT_FSIZE, limits.file_size_bytes),
                          (resource.RLIMIT_NOFILE, limits.open_files),
                          (resource.RLIMIT_NPROC, nproc),
                          (resource.RLIMIT_CORE, 0)):
        value = value if isinstance(value, tuple) else (value, value)
        resource.setrlimit(rlimit, value)
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir,
                       "LANG": "C.UTF-8"})
    sys.argv = ["program"]
    os.write(_NONCE_FD, b"started\n")
    write, exit_now = os.write, os._exit  # taken before a program can patch them
    namespace = {"__name__": "__program__", "__builtins__": builtins}
    try:
        exec(compile(request["program"], "<program>", "exec"), namespace)
        exec(compile(request["tests"], "<tests>", "exec"), namespace)
    except _BASE_EXCEPTION as e:  # noqa: BLE001 - any exception, SystemExit included, fails
        what = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        _flush_quietly()
        write(_NONCE_FD, f"\nfailed {what}\n".encode())
        exit_now(1)
    _flush_quietly()
    write(_NONCE_FD, f"\npassed {nonce}\n".encode())
    exit_now(0)


def _flush_quietly() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except _BASE_EXCEPTION:  # noqa: BLE001 - the program may have replaced or closed them
            pass


def _count_uid_processes() -> int:
    uid = os.getuid()
    count = 0
    for name in os.listdir("/proc"):
        try:
            count += name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
        except OSError:
            pass
    return count


def _sweep(in_bwrap: bool) -> bool:
    """Kills every process a program left behind (in bwrap: every process in the sandbox but
    init and us) and reaps them; False if some survive (then the sandbox is recycled)."""
    me = os.getpid()
    for _ in range(500):
        victims = (_all_pids() - {1, me}) if in_bwrap else _descendants(me)
        _reap()
        if not victims:
            return True
        for pid in victims:
            _signal_quietly(pid, signal.SIGKILL)
        _reap()
        time.sleep(0.001)
    return False


def _all_pids() -> set[int]:
    return {int(name) for name in os.listdir("/proc") if name.isdigit()}


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _fresh_workdir() -> str:
    import tempfile
    return tempfile.mkdtemp(prefix="score_sandbox_")


def _wipe(path: str, keep_root: bool) -> bool:
    """Removes everything under `path` (and `path` itself unless keep_root); True if done."""
    def remove(target: str) -> None:
        if os.path.isdir(target) and not os.path.islink(target):
            os.chmod(target, 0o700)
            for name in os.listdir(target):
                remove(os.path.join(target, name))
            os.rmdir(target)
        else:
            os.unlink(target)

    try:
        if keep_root:
            os.chmod(path, 0o1777)  # a program may have locked us out
            for name in os.listdir(path):
                remove(os.path.join(path, name))
        elif os.path.lexists(path):
            remove(path)
    except OSError:
        return False
    return True


_ZYGOTE_SOURCE = open(__file__, encoding="utf-8").read() if __name__ != "__main__" else ""

if __name__ == "__main__":
    _zygote_main(json.loads(sys.argv[1]))
