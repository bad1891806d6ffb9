"""Code reward: run a program and its test code in the sandbox; 1.0 iff the tests ran to the end.

Test code is MBPP-style asserts (`mbpp_test_code`) or HumanEval-style `check` plus its call
(`humaneval_test_code`). It runs after the program, in the same namespace. A pass means the
test code reached its end with every assertion true; that is proven by a nonce the program
cannot read from its argv, environment, files or descriptors (see score_jax/rewards/sandbox.py),
so exiting early with status 0, printing "passed" or killing the harness all score 0.

Reasons (the second element of each result) are sandbox.STATUSES: passed / failed / timeout /
crashed / sandbox-error.
"""
import os
import re
import threading

from score_jax.rewards import math as math_reward_lib
from score_jax.rewards import sandbox

# Wall-clock limit per program for the registry entry (`completion_reward`); batch callers pass
# their own.
DEFAULT_TIMEOUT_S = 10.0

# MBPP's delimiters of a solution (Austin et al. 2021), as in its 3-shot prompt.
_BEGIN, _DONE = "[BEGIN]", "[DONE]"
_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(completion: str) -> str:
    """The program in a model completion: its last ```python fenced block, else all of it,
    after cutting it to MBPP's `[BEGIN]`/`[DONE]` delimiters where it has them.

    MBPP's 3-shot prompt ends with `[BEGIN]` and closes each example solution with `[DONE]`
    (see score_jax/prompts.py), so the text before the first `[DONE]` is the answer (what
    follows is the model continuing the few-shot pattern), taken after the last `[BEGIN]`
    before it.
    """
    math_reward_lib.require_str(completion, "completion", "extract_program")
    done = completion.find(_DONE)
    if done >= 0:
        completion = completion[:done]
    begin = completion.rfind(_BEGIN)
    if begin >= 0:
        completion = completion[begin + len(_BEGIN):].removeprefix("\n")
    blocks = _FENCE_RE.findall(completion)
    return blocks[-1] if blocks else completion


def humaneval_test_code(test: str, entry_point: str) -> str:
    """HumanEval test code: the problem's `check` function and its call on the entry point."""
    return f"{test}\n\ncheck({entry_point})\n"


def mbpp_test_code(test_list: list[str], test_setup_code: str = "",
                   test_imports: list[str] = ()) -> str:
    """MBPP test code: imports, setup code, then one assert per line."""
    return "\n".join([*test_imports, test_setup_code, *test_list, ""])


def code_reward(program: str, test_code: str, timeout_s: float,
                limits: sandbox.Limits = sandbox.Limits(),
                isolation: str = "bwrap") -> tuple[float, str]:
    """(1.0, "passed") if `test_code` runs to its end after `program`, else (0.0, reason).

    Starts a fresh sandbox (about 0.1-0.3 s); batch many programs with `code_rewards`.
    Raises TypeError if `program` or `test_code` is not a str.
    """
    math_reward_lib.require_str(program, "program", "code_reward")
    math_reward_lib.require_str(test_code, "test_code", "code_reward")
    return code_rewards([program], [test_code], timeout_s, 1, limits, isolation)[0]


def code_rewards(programs: list[str], tests: list[str], timeout_s: float,
                 max_workers: int | None = None, limits: sandbox.Limits = sandbox.Limits(),
                 isolation: str = "bwrap") -> list[tuple[float, str]]:
    """`code_reward` for each (program, test code) pair, run in parallel on warm sandboxes.

    `max_workers` defaults to `default_workers`. Each program still runs alone in a fresh
    process with nothing left over from the previous one (see sandbox.Sandbox).
    """
    outcomes = run_programs(programs, tests, timeout_s, max_workers, limits, isolation)
    return [(1.0 if o.status == "passed" else 0.0, o.status) for o in outcomes]


def run_programs(programs: list[str], tests: list[str], timeout_s: float,
                 max_workers: int | None = None, limits: sandbox.Limits = sandbox.Limits(),
                 isolation: str = "bwrap") -> list[sandbox.Outcome]:
    """Like `code_rewards`, but returns the full outcomes (detail, captured output, time).
    Raises TypeError unless `programs` and `tests` are lists of str."""
    math_reward_lib.require_str_list(programs, "programs", "run_programs")
    math_reward_lib.require_str_list(tests, "tests", "run_programs")
    if len(programs) != len(tests):
        raise ValueError(f"got {len(programs)} programs but {len(tests)} test codes; pass one "
                         "test code per program")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if not programs:
        return []
    workers = default_workers(limits) if max_workers is None else max_workers
    workers = max(1, min(workers, len(programs)))
    sandboxes = [sandbox.Sandbox(limits, isolation) for _ in range(workers)]  # raises early
    outcomes: list[sandbox.Outcome | None] = [None] * len(programs)
    indices = iter(range(len(programs)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(box: sandbox.Sandbox) -> None:
        try:
            with box:
                while True:
                    with lock:
                        i = next(indices, None)
                    if i is None:
                        return
                    outcomes[i] = box.run(programs[i], tests[i], timeout_s)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(box,), daemon=True) for box in sandboxes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return outcomes


def default_workers(limits: sandbox.Limits = sandbox.Limits()) -> int:
    """Parallel sandboxes for this machine: one per usable CPU, fewer if RAM could not hold
    two programs' worth of address space (`limits.memory_bytes`) per sandbox."""
    cpus = len(os.sched_getaffinity(0))
    with open("/proc/meminfo") as f:
        mem_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    by_memory = (mem_kib << 10) // (2 * limits.memory_bytes)
    return max(1, min(cpus, by_memory))


def completion_reward(completion: str, reference: str) -> float:
    """Registry form: 1.0 if the program in `completion` passes the test code `reference`
    within DEFAULT_TIMEOUT_S, else 0.0."""
    math_reward_lib.require_str(completion, "completion", "completion_reward")
    math_reward_lib.require_str(reference, "reference", "completion_reward")
    return code_reward(extract_program(completion), reference, DEFAULT_TIMEOUT_S)[0]


def completion_rewards(completions: list[str], references: list[str]) -> list[float]:
    """Batch registry form of `completion_reward` (parallel warm sandboxes)."""
    math_reward_lib.require_str_list(completions, "completions", "completion_rewards")
    math_reward_lib.require_str_list(references, "references", "completion_rewards")
    programs = [extract_program(c) for c in completions]
    return [r for r, _ in code_rewards(programs, references, DEFAULT_TIMEOUT_S)]
