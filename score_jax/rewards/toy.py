"""Toy-task reward, and the one definition of the toy answer format.

The arithmetic task's solutions (score_jax/data/toy.py writes them with `answer_text`) end with
the line `Answer: <integer>`; `ANSWER_PATTERN` reads it back. This module imports nothing heavy
(no tensorflow_datasets), so importing the reward registry stays cheap, e.g. in every
math-verify worker.
"""
from score_jax.rewards import math as math_reward_lib

# The answer line: a whole line `Answer: <integer>` (e.g. `Answer: -42`); the last one counts.
ANSWER_PATTERN = r"(?m)^Answer:[ \t]*(?P<answer>-?\d+)[ \t]*$"


def answer_text(answer: str) -> str:
    """The answer line stating `answer`: a completion that `toy_reward` scores as that answer."""
    return f"Answer: {answer}"


def extract_answer(completion: str) -> str | None:
    """Returns the integer (as written) on the last `Answer: <integer>` line, or None. Raises
    TypeError (from math.extract_answer) if `completion` is not a str."""
    return math_reward_lib.extract_answer(completion, pattern=ANSWER_PATTERN)


def final_answer(completion: str) -> str | None:
    """The integer on the last `Answer: <integer>` line, canonical (`007` -> "7"), or None."""
    answer = extract_answer(completion)
    return None if answer is None else str(int(answer))


def toy_reward(completion: str, reference: str) -> float:
    """1.0 if the last `Answer: <integer>` line of `completion` states the integer `reference`
    (compared by value, so `Answer: 007` matches "7"), else 0.0.

    Raises ValueError if `reference` is not an integer (a data bug, not a wrong answer), and
    TypeError if either argument is not a str.
    """
    math_reward_lib.require_str(completion, "completion", "toy_reward")
    math_reward_lib.require_str(reference, "reference", "toy_reward")
    try:
        expected = int(reference.strip())
    except ValueError:
        raise ValueError(f"toy reference answer {reference!r} is not an integer; pass the "
                         "record's `answer` field (e.g. '-42')") from None
    answer = extract_answer(completion)
    return 1.0 if answer is not None and int(answer) == expected else 0.0


def toy_rewards(completions: list[str], references: list[str]) -> list[float]:
    """`toy_reward` over pairs (cheap: no worker processes)."""
    math_reward_lib.require_str_list(completions, "completions", "toy_rewards")
    math_reward_lib.require_str_list(references, "references", "toy_rewards")
    if len(completions) != len(references):
        raise ValueError(f"got {len(completions)} completions but {len(references)} references; "
                         "pass one reference per completion")
    return [toy_reward(c, r) for c, r in zip(completions, references)]
