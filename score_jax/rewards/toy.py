"""Toy-task reward: the arithmetic task's solutions end with the line `Answer: <integer>`.

The task itself (problems, step-by-step solutions) and the answer-line format
(`ANSWER_PATTERN`) live in score_jax/data/toy.py; this module only scores against them.
"""
from score_jax.rewards import math as math_reward_lib


def final_answer(completion: str) -> str | None:
    """The integer on the last `Answer: <integer>` line, canonical (`007` -> "7"), or None."""
    from score_jax.data import toy as toy_data  # see toy_reward
    answer = math_reward_lib.extract_answer(completion, pattern=toy_data.ANSWER_PATTERN)
    return None if answer is None else str(int(answer))


def toy_reward(completion: str, reference: str) -> float:
    """1.0 if the last `Answer: <integer>` line of `completion` states the integer `reference`
    (compared by value, so `Answer: 007` matches "7"), else 0.0.

    Raises ValueError if `reference` is not an integer (a data bug, not a wrong answer).
    """
    try:
        expected = int(reference.strip())
    except ValueError:
        raise ValueError(f"toy reference answer {reference!r} is not an integer; pass the "
                         "record's `answer` field (e.g. '-42')") from None
    # Imported here, not at the top: score_jax.data.toy pulls in tensorflow_datasets (~1 s,
    # ~45 MB), which importing the reward registry (e.g. every math-verify worker) should not pay.
    from score_jax.data import toy as toy_data
    answer = math_reward_lib.extract_answer(completion, pattern=toy_data.ANSWER_PATTERN)
    return 1.0 if answer is not None and int(answer) == expected else 0.0


def toy_rewards(completions: list[str], references: list[str]) -> list[float]:
    """`toy_reward` over pairs (cheap: no worker processes)."""
    if len(completions) != len(references):
        raise ValueError(f"got {len(completions)} completions but {len(references)} references; "
                         "pass one reference per completion")
    return [toy_reward(c, r) for c, r in zip(completions, references)]
