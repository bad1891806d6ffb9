"""Hostile programs on the real sandbox: each scores 0.0 with the right reason, and the host is
unharmed (canary files unchanged, no process left behind, the caller healthy, time bounded).
Hostile math answers (end of file): numbers too big to evaluate score 0.0 at once, well before
the math check's timeout.

Safety first: the `isolation` fixture proves, with harmless probes, what this suite relies on
(unprivileged uid, own pid namespace, read-only root, RLIMIT_NPROC enforced, shown by a *bounded*
fork loop). If any of that fails, every test here fails before running a hostile program, so a
sandbox bug cannot take the machine down. Needs bubblewrap: fails, never skips, without it.
"""
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time

import pytest

from score_jax.rewards import code
from score_jax.rewards import math as math_reward_lib
from score_jax.rewards import sandbox
from score_jax.rewards import supervisor

TIMEOUT_S = 3.0
# 512 MiB per process keeps a fork-and-allocate program under max_processes * 512 MiB = 8 GiB.
LIMITS = sandbox.Limits(memory_bytes=512 << 20)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET_VAR = "SCORE_HOSTILE_TEST_SECRET"

# The test code's message: a program whose outcome detail shows it kept running after its
# attack (which then had no effect) and reached the test code.
NEVER = "the test code must never pass here"
TESTS = f"assert False, {NEVER!r}\n"
# name: (program, expected status, expected text in the outcome's detail). @NAME@ placeholders
# are filled in per run. Attacks that would "succeed" assert so, so their detail shows failure.
HOSTILE = {
    "fork_bomb": ("import os\nwhile True:\n    os.fork()\n", "failed", "BlockingIOError"),
    "memory_bomb": ("x = bytearray(8 << 30)\n", "failed", "MemoryError"),
    "memory_growth": ("a = []\nwhile True:\n    a.append(bytearray(64 << 20))\n", "failed",
                      "MemoryError"),
    "infinite_loop": ("while True:\n    pass\n", "timeout", ""),
    "sleep_past_limit": ("import time\ntime.sleep(3600)\n", "timeout", ""),
    "ignore_sigterm": ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                       "while True:\n    time.sleep(0.01)\n", "timeout", ""),
    "cpu_threads": ("import threading\ndef spin():\n    while True:\n        pass\n"
                    "for _ in range(4):\n    threading.Thread(target=spin).start()\nspin()\n",
                    "timeout", ""),
    "deep_recursion": ("def f(n):\n    return f(n + 1) + 1\nf(0)\n", "failed", "RecursionError"),
    "deep_c_recursion": ("import sys, json\nsys.setrecursionlimit(10**7)\nx = []\n"
                         "for _ in range(300000):\n    x = [x]\njson.dumps(x)\n", "crashed",
                         "SIGSEGV"),
    "write_files_outside": (
        "import os\nhits = []\n"
        "for path in ['@TMP_CANARY@', '@REPO_CANARY@']:\n"
        "    try:\n        open(path, 'w').write('pwned')\n        hits.append(path)\n"
        "    except OSError:\n        pass\n"
        "for d in ['@TMP_DIR@', '@REPO_DIR@', '@REPO@']:\n"
        "    try:\n        open(os.path.join(d, 'new_file'), 'w').write('x')\n"
        "        hits.append(d)\n    except OSError:\n        pass\n"
        "open('/tmp/@ESCAPE@', 'w').write('only in the sandbox tmpfs')\n"
        "assert hits, 'wrote nothing outside'\n", "failed", "wrote nothing outside"),
    "delete_files_outside": (
        "import os, shutil\ndone = []\n"
        "for act in (lambda: os.remove('@TMP_CANARY@'), lambda: os.remove('@REPO_CANARY@'),\n"
        "            lambda: os.rename('@REPO_CANARY@', '@REPO_CANARY@.moved'),\n"
        "            lambda: os.chmod('@REPO_CANARY@', 0),\n"
        "            lambda: os.truncate('@REPO_CANARY@', 0),\n"
        "            lambda: shutil.rmtree('@REPO_DIR@'), lambda: shutil.rmtree('@TMP_DIR@')):\n"
        "    try:\n        act()\n        done.append(act)\n    except OSError:\n        pass\n"
        "assert done, 'deleted nothing outside'\n", "failed", "deleted nothing outside"),
    "read_trainer_env": (
        "import os\nfound = '@SECRET@' in repr(dict(os.environ))\n"
        "for pid in os.listdir('/proc'):\n    try:\n"
        "        found = found or b'@SECRET@' in open(f'/proc/{pid}/environ', 'rb').read()\n"
        "    except OSError:\n        pass\nassert found, 'no secret'\n", "failed", "no secret"),
    "read_proc": (
        "import os\nseen = []\nfor pid in filter(str.isdigit, os.listdir('/proc')):\n    try:\n"
        "        seen.append(open(f'/proc/{pid}/cmdline', 'rb').read())\n"
        "    except OSError:\n        pass\n"
        "assert len(seen) > 3 or any(b'pytest' in c for c in seen), 'host not visible'\n",
        "failed", "host not visible"),
    "socket_to_host": ("import socket\n"
                       "socket.create_connection(('127.0.0.1', @PORT@), timeout=1)\n",
                       "failed", "[Errno"),
    "socket_to_internet": ("import socket\nsocket.create_connection(('8.8.8.8', 53), timeout=1)\n",
                           "failed", "[Errno"),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                    "os.kill(1, signal.SIGTERM)\n", "failed", NEVER),
    "kill_everything": ("import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\n"
                        "except ProcessLookupError:\n    pass\n", "failed", NEVER),
    "stop_supervisor": ("import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n", "failed",
                        NEVER),
    "os_exit_before_tests": ("import os\nos._exit(0)\n", "crashed", "status 0"),
    "sys_exit_before_tests": ("import sys\nsys.exit(0)\n", "failed", "SystemExit"),
    "print_passed": ("print('passed')\nprint('All tests passed')\nimport os\nos._exit(0)\n",
                     "crashed", "status 0"),
    "forge_marker": (
        "import os, re, sys\nblobs = [open('/proc/self/cmdline', 'rb').read(),\n"
        "         open('/proc/self/environ', 'rb').read(), repr(os.environ).encode(),\n"
        "         repr(sys.argv).encode()]\n"
        "for fd in range(64):\n    try:\n        os.set_blocking(fd, False)\n"
        "        blobs.append(os.read(fd, 1 << 16))\n    except OSError:\n        pass\n"
        "for root, _, files in os.walk('/tmp'):\n    for name in files:\n"
        "        blobs.append(open(os.path.join(root, name), 'rb').read())\n"
        "guesses = set(re.findall(rb'[0-9a-f]{32}', b''.join(blobs))) | {b'0' * 32}\n"
        "for fd in range(64):\n    for guess in guesses:\n        try:\n"
        "            os.write(fd, b'\\npassed ' + guess + b'\\n')\n"
        "        except OSError:\n            pass\nos._exit(0)\n", "crashed", "status 0"),
    "tamper_builtins": (
        "import builtins, os, sys\n"
        "builtins.AssertionError = type('AssertionError', (Exception,), {})\n"
        "builtins.BaseException = object\nbuiltins.print = lambda *a, **k: None\n"
        "sys.excepthook = lambda *a: os._exit(0)\nsys.exit = lambda *a: os._exit(0)\n"
        "os.write = lambda *a: 0\nos._exit = lambda *a: None\n", "failed", NEVER),
    "stdout_flood_1gb": ("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n"
                         "    sys.stdout.write(chunk)\n", "failed", NEVER),
    "spawn_shell": (
        "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'id; echo pwned > @REPO_CANARY@; "
        "rm -rf @REPO_DIR@ @TMP_DIR@; (sleep 600 &)'])\n", "failed", NEVER),
    "outliving_thread": ("import threading, time\ndef forever():\n    while True:\n"
                         "        time.sleep(0.01)\nthreading.Thread(target=forever).start()\n",
                         "failed", NEVER),
    "outliving_child": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n"
                        "    if os.fork() == 0:\n        while True:\n"
                        "            time.sleep(0.05)\n"
                        "    os._exit(0)\ntime.sleep(0.2)\n", "failed", NEVER),
    "ctypes_segfault": ("import ctypes\nctypes.string_at(0)\n", "crashed", "SIGSEGV"),
    "sysv_shared_memory": ("import ctypes\nlibc = ctypes.CDLL(None)\n"
                           "assert libc.shmget(0, 1 << 30, 0o1600) >= 0\n", "failed",
                           "AssertionError"),
    "fill_tmp": ("for i in range(100):\n    with open(f'/tmp/fill{i}', 'wb') as f:\n"
                 "        f.write(b'x' * (8 << 20))\n", "failed", "No space left"),
    "read_supervisor_memory": (
        "import ctypes\nlibc = ctypes.CDLL(None)\nattached = libc.ptrace(16, 1, 0, 0) == 0\n"
        "open('/proc/1/mem', 'rb')\n", "failed", "Permission denied"),
    "nested_user_namespace": (
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        "assert libc.unshare(0x10000000) == 0 or libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0) "
        "== 0, 'no user namespace'\n", "failed", "no user namespace"),
    "become_root": ("import os\nos.setuid(0)\n", "failed", "[Errno"),
}


# ---------------------------------------------------------------------------------- fixtures

def sandbox_processes() -> list[str]:
    """Live (non-zombie) processes that belong to sandboxes: run as the sandbox uid (when we are
    root), or descended from us and running bwrap or the zygote."""
    me, found = os.getpid(), []
    mine = supervisor.descendants(me)
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = open(f"/proc/{name}/status").read()
            cmdline = open(f"/proc/{name}/cmdline", "rb").read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["State"].strip().startswith("Z"):
            continue
        uid = int(fields["Uid"].split()[0])
        if (os.geteuid() == 0 and uid == sandbox.SANDBOX_UID) or (
                int(name) in mine and (b"bwrap" in cmdline or b"_zygote_main" in cmdline)):
            found.append(f"{name} uid={uid} {cmdline[:80]!r}")
    return found


def wait_for_no_sandbox_processes(timeout_s: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(scope="module")
def isolation():
    """Proves the sandbox's safety properties with harmless probes, before anything hostile."""
    probe = ("import os, time\nfacts = {'uid': os.getuid(), 'root_writable': "
             "os.access('/', os.W_OK), 'pids': len([p for p in os.listdir('/proc') "
             "if p.isdigit()])}\nforked = 0\nfor _ in range(64):  # bounded: at most 64\n"
             "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
             "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    forked += 1\n"
             "facts['forked'] = forked\nprint(repr(facts))\n")
    [outcome] = code.run_programs([probe], ["pass"], 10.0, limits=LIMITS)
    problems = []
    if outcome.status != "passed":
        problems.append(f"probe did not run: {outcome}")
    else:
        facts = eval(outcome.output)  # noqa: S307 - our own probe's repr
        if facts["uid"] == 0:
            problems.append("programs run as uid 0")
        if facts["root_writable"]:
            problems.append("/ is writable")
        if facts["pids"] != 2:
            problems.append(f"{facts['pids']} processes visible: no private pid namespace")
        if facts["forked"] > LIMITS.max_processes:
            problems.append(f"RLIMIT_NPROC not enforced: forked {facts['forked']}")
    if wait_for_no_sandbox_processes():
        problems.append("the probe's sleeping children outlived it")
    return problems


def require_isolation(problems):
    if problems:
        pytest.fail("sandbox isolation is broken, hostile programs not run: " + "; ".join(problems))


@pytest.fixture(scope="module")
def canaries():
    """World-writable canary files in a host tmp dir and in the repo: only the sandbox, not
    file permissions, protects them."""
    tmp_dir = tempfile.mkdtemp(prefix="score_canary_")
    repo_dir = os.path.join(REPO, f".rewards_canary_{secrets.token_hex(4)}")
    os.mkdir(repo_dir)
    paths = {}
    for key, directory in (("TMP", tmp_dir), ("REPO", repo_dir)):
        os.chmod(directory, 0o777)
        path = os.path.join(directory, "canary.txt")
        with open(path, "w") as f:
            f.write(f"canary {key}\n")
        os.chmod(path, 0o666)
        paths[f"{key}_DIR"], paths[f"{key}_CANARY"] = directory, path
    yield paths
    shutil.rmtree(tmp_dir, ignore_errors=True)
    shutil.rmtree(repo_dir, ignore_errors=True)


def snapshot(directories) -> dict:
    state = {}
    for directory in directories:
        for root, dirs, files in os.walk(directory):
            for name in dirs + files:
                path = os.path.join(root, name)
                st = os.lstat(path)
                content = open(path, "rb").read() if os.path.isfile(path) else b""
                state[path] = (st.st_mode, st.st_mtime_ns, content)
    return state


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def hostile_run(isolation, canaries):
    require_isolation(isolation)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    secret = secrets.token_hex(16)
    os.environ[SECRET_VAR] = secret
    values = dict(canaries, PORT=str(listener.getsockname()[1]), SECRET=secret,
                  REPO=REPO,
                  ESCAPE=f"score_escape_{secrets.token_hex(4)}")
    programs = []
    for program, _, _ in HOSTILE.values():
        for key, value in values.items():
            program = program.replace(f"@{key}@", value)
        programs.append(program)
    before = snapshot([canaries["TMP_DIR"], canaries["REPO_DIR"]])
    fds, threads = open_fds(), threading.active_count()
    workers = code.default_workers(LIMITS)
    start = time.monotonic()
    try:
        outcomes = code.run_programs(programs, [TESTS] * len(programs), TIMEOUT_S,
                                     max_workers=workers, limits=LIMITS)
    finally:
        del os.environ[SECRET_VAR]
    wall = time.monotonic() - start
    try:
        connection = listener.accept()
    except BlockingIOError:
        connection = None
    listener.close()
    return {"outcomes": dict(zip(HOSTILE, outcomes)), "wall": wall, "workers": workers,
            "before": before, "after": snapshot([canaries["TMP_DIR"], canaries["REPO_DIR"]]),
            "fds": (fds, open_fds()), "threads": (threads, threading.active_count()),
            "connection": connection, "escape": os.path.join("/tmp", values["ESCAPE"]),
            "left_behind": wait_for_no_sandbox_processes()}


# ------------------------------------------------------------------------------------- tests

def test_isolation_holds(isolation):
    require_isolation(isolation)


def test_there_are_at_least_twenty_hostile_programs():
    assert len(HOSTILE) >= 20


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_scores_zero_with_the_right_reason(hostile_run, name):
    outcome = hostile_run["outcomes"][name]
    _, status, detail = HOSTILE[name]
    assert outcome.status == status, outcome
    assert detail in outcome.detail, outcome
    assert len(outcome.output) <= LIMITS.output_bytes


def test_no_file_outside_the_sandbox_changed(hostile_run):
    assert hostile_run["after"] == hostile_run["before"]
    assert not os.path.exists(hostile_run["escape"])  # written to the sandbox's own /tmp only
    assert not os.path.exists(os.path.join(REPO, "new_file"))


def test_no_process_left_behind(hostile_run):
    assert hostile_run["left_behind"] == []


def test_no_connection_reached_the_host(hostile_run):
    assert hostile_run["connection"] is None


def test_the_calling_process_stays_healthy(hostile_run):
    assert hostile_run["fds"][1] <= hostile_run["fds"][0]  # no leaked pipes or pidfds
    assert hostile_run["threads"][1] == hostile_run["threads"][0]
    assert code.code_reward("def f():\n    return 1\n", "assert f() == 1", 5.0) == (1.0, "passed")


def test_the_batch_finished_within_its_time_limits(hostile_run):
    outcomes = list(hostile_run["outcomes"].values())
    for name, outcome in hostile_run["outcomes"].items():
        assert outcome.elapsed_s < TIMEOUT_S + 1.0, (name, outcome)
    # Perfect packing of the per-program times on the workers, plus startup and slack.
    bound = sum(o.elapsed_s for o in outcomes) / hostile_run["workers"] + TIMEOUT_S + 3.0
    assert hostile_run["wall"] < bound


def test_a_batch_of_hanging_programs_ends_at_its_time_limit(isolation):
    require_isolation(isolation)
    hanging = ["while True:\n    pass\n", "import time\ntime.sleep(600)\n",
               "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
               "time.sleep(600)\n",
               "import os, time\nfor _ in range(8):\n    if os.fork() == 0:\n        break\n"
               "time.sleep(600)\n"]
    start = time.monotonic()
    results = code.code_rewards(hanging, [TESTS] * 4, 2.0, max_workers=4, limits=LIMITS)
    assert results == [(0.0, "timeout")] * 4
    assert time.monotonic() - start < 2.0 + 2.5
    assert wait_for_no_sandbox_processes() == []


# ---------------------------------------------------------------------- hostile math answers

# A check that is not done after this long went near its timeout (math.CHECK_TIMEOUT_S, 5 s):
# these take about 0.05 s each because the worker refuses to evaluate them exactly.
MATH_FAST_S = 1.0
# (answer, reference): exact values with billions of digits or more, or a walk that never ends.
HOSTILE_MATH = [
    ("10^{10^{10}}", "1"),
    ("10^{10^{10}}", "10^{10^{10}}+1"),
    ("10^{-10^{10}}", "0"),
    ("\\frac{1}{10^{10^{10}}}", "0.0"),
    ("2^{2^{2^{100}}}", "1"),
    ("9^{9^{9}}", "9^{387420489}"),
    ("(10^{10})!", "2"),
    ("\\binom{10^{10}}{5\\cdot 10^9}", "1"),
    ("e^{10^{10^{10}}}", "1"),
    ("\\sqrt{10^{10^{10}}}", "10^{5\\cdot 10^{9}}"),
    ("1.5\\times 10^{10^{10}}", "1.5"),
    ("\\sin(10^{10^{10}})", "0"),
    ("1^{10^{10^{10}}}", "1"),
    ("\\prod_{k=1}^{10^{6}} k", "1"),
    ("\\sum_{k=1}^{10^{10}} k", "1"),
    ("(x+1)^{10^{10}}", "x"),
    ("(10^{-20}, 10^{10^{10}})", "(10^{-20}, 1)"),
]
# Big but bounded exact values still compare exactly, as fast.
BIG_EQUAL_MATH = [
    ("2006!", "2005!\\cdot 2006"),
    ("2^{2^{10}}", "2^{1024}"),
    ("0^{10^{10}}", "0"),
    ("\\frac{1}{3^{2007}}", "3^{-2007}"),
]


@pytest.fixture(scope="module")
def math_workers():
    """Starts the math workers, so a check's time is the check's."""
    assert math_reward_lib.answers_match("0.5", "\\frac{1}{2}")


def timed_math_reward(answer: str, reference: str) -> tuple[float, float]:
    start = time.monotonic()
    score = math_reward_lib.math_reward(math_reward_lib.answer_text(answer), reference)
    return score, time.monotonic() - start


@pytest.mark.parametrize("answer, reference", HOSTILE_MATH)
def test_hostile_math_answer_scores_zero_fast(math_workers, caplog, answer, reference):
    score, seconds = timed_math_reward(answer, reference)
    assert score == 0.0
    assert seconds < MATH_FAST_S
    assert "timed out" not in caplog.text  # refused, not killed at the timeout


@pytest.mark.parametrize("answer, reference", BIG_EQUAL_MATH)
def test_big_exact_math_answer_still_matches_fast(math_workers, answer, reference):
    score, seconds = timed_math_reward(answer, reference)
    assert score == 1.0
    assert seconds < MATH_FAST_S


def test_hostile_math_batch_is_fast_and_the_workers_stay_healthy(math_workers):
    answers = [math_reward_lib.answer_text(a) for a, _ in HOSTILE_MATH]
    start = time.monotonic()
    assert math_reward_lib.math_rewards(answers, [r for _, r in HOSTILE_MATH]) == \
        [0.0] * len(HOSTILE_MATH)
    assert time.monotonic() - start < MATH_FAST_S * len(HOSTILE_MATH) / 2
    assert math_reward_lib.math_reward(math_reward_lib.answer_text("0.25"), "\\frac14") == 1.0
