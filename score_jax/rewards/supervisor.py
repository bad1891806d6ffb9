"""The sandbox's supervisor (the "zygote"): the trusted code that runs *inside* a sandbox.

score_jax/rewards/sandbox.py (the host side) starts this module as the sandbox's pid 1: it
passes this file's source text to the sandbox's Python (`python -I -S -B -c <source> <config>`)
rather than a path, because the sandbox's uid may not be able to read files under the trainer's
directories and the trainer's home is hidden. So this module imports only the standard library
(Python >= 3.9) and nothing from score_jax.

What it owns:
  * the serve loop (`_zygote_main`): one request frame in, one forked program, one reply frame
    out, until the host closes the pipe or a program leaves the sandbox unclean;
  * the per-program child (`_child`): new session, rlimits, fresh environment, then the program
    and its test code in one namespace, and the nonce written to the marker pipe only if the
    tests ran to their end;
  * classifying what happened (`_classify`), and the cleanup after every program: killing every
    process it left (`_sweep`) and wiping /tmp and /dev/shm (`_wipe`);
  * what the host and supervisor share: `Limits`, the length-prefixed frames on their pipes
    (`write_frame`, `read_frame`) and the /proc helpers (`parent_pid`, `descendants`,
    `signal_quietly`).
"""
from __future__ import annotations  # the sandbox's Python may be older than ours (>= 3.9)

import ctypes
import dataclasses
import fcntl
import json
import math
import os
import select
import signal
import struct
import sys
import time

_NONCE_FD = 3  # in a program's process: the marker pipe (write end)
_MARKER_BYTES = 1 << 16  # kept from the marker pipe
_BASE_EXCEPTION = BaseException  # programs may rebind builtins.BaseException
_PRELOADED = ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string",
              "typing", "hashlib", "random", "statistics", "fractions", "decimal", "operator",
              "copy", "datetime", "json", "array")


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


# ==================================================== shared with the host: frames and /proc

def write_frame(fd: int, payload: bytes) -> None:
    """Writes `payload` as one frame: its length (4 bytes, big-endian), then its bytes."""
    data = struct.pack(">I", len(payload)) + payload
    while data:
        data = data[os.write(fd, data):]


def read_frame(fd: int, deadline: float | None) -> bytes | None:
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


def parent_pid(pid: int) -> int | None:
    """The parent of `pid`, from /proc; None if `pid` is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    return int(stat_line[stat_line.rindex(b")") + 2:].split()[1])


def descendants(root: int) -> set[int]:
    """Pids whose parent chain reaches `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        ppid = parent_pid(int(name))
        if ppid is not None:
            children.setdefault(ppid, []).append(int(name))
    found, frontier = set(), [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def signal_quietly(pid: int, sig: int) -> None:
    """Sends `sig` to `pid`; a pid that is gone or not ours is not an error."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ====================================================================== inside the sandbox

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
    write_frame(resp_fd, b"ready")
    while True:
        request = read_frame(req_fd, None)
        if request is None:
            return
        reply = _run_one(json.loads(request), limits, in_bwrap)
        write_frame(resp_fd, json.dumps(reply).encode())
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
        signal_quietly(pid, signal.SIGKILL)
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
        victims = (_all_pids() - {1, me}) if in_bwrap else descendants(me)
        _reap()
        if not victims:
            return True
        for pid in victims:
            signal_quietly(pid, signal.SIGKILL)
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


if __name__ == "__main__":
    _zygote_main(json.loads(sys.argv[1]))
