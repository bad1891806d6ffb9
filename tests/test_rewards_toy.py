"""Toy reward and the reward registry."""
import inspect
import re

import pytest

from score_jax import rewards
from score_jax.data import toy as toy_data
from score_jax.rewards import toy


@pytest.mark.parametrize("completion, reference, expected", [
    ("7+5=12, write 2 carry 1\nAnswer: 432", "432", 1.0),
    ("3-45=...\nAnswer: -42", "-42", 1.0),
    ("Answer: -42", "42", 0.0),
    ("Answer: 007", "7", 1.0),
    ("Answer: 5\nNo wait.\nAnswer: 6", "6", 1.0),
    ("Answer: 5\nNo wait.\nAnswer: 6", "5", 0.0),
    ("Answer: 6\nthen some trailing text", "6", 1.0),
    ("Answer: 4.5", "4", 0.0),
    ("Answer: 12 apples", "12", 0.0),
    ("The answer is 12", "12", 0.0),
    ("", "0", 0.0),
    ("Answer: 12", " 12\n", 1.0),
])
def test_toy_reward(completion, reference, expected):
    assert toy.toy_reward(completion, reference) == expected


def test_answer_pattern_is_defined_once_in_the_toy_task():
    assert re.compile(toy_data.ANSWER_PATTERN).groupindex == {"answer": 1}
    assert "toy_data.ANSWER_PATTERN" in inspect.getsource(toy.toy_reward)
    assert "ANSWER_PATTERN" in inspect.getsource(toy_data)  # the task's checker uses it too
    sources = inspect.getsource(toy) + inspect.getsource(toy_data)
    assert sources.count("^Answer:") == 1, "the answer-line regex is written out more than once"


def test_non_integer_reference_is_a_data_error():
    with pytest.raises(ValueError, match="not an integer"):
        toy.toy_reward("Answer: 1", "one")


def test_toy_reward_agrees_with_the_toy_task_checker():
    # The two share ANSWER_PATTERN but not the code around it (last match, stripping, integer
    # comparison, errors); test_toy_reward above is the independent check of the pattern.
    cases = ["Answer: 432", "x\nAnswer: -42", "Answer: 007", "Answer: 4.5", "Answer:12",
             "Answer: 1\nAnswer: 2", "Answer: 3 \n", "no answer", "Answer: +3"]
    for completion in cases:
        for reference in ("432", "-42", "7", "4", "12", "2", "3", "1"):
            assert toy.toy_reward(completion, reference) == float(
                toy_data.check_answer(completion, reference)), (completion, reference)


def test_toy_reward_scores_the_toy_tasks_own_solutions():
    # What the data writes is what the reward reads: every solution style (carries, borrows,
    # negative results, multiplication) scores 1.0 against its answer and 0.0 against another.
    for op, a, b in [("+", 78, 54), ("-", 12, 345), ("-", 345, 12), ("*", 987, 9), ("-", 5, 5)]:
        _, response, answer = toy_data.solve(op, a, b)
        assert toy.toy_reward(response, answer) == 1.0, (op, a, b)
        assert toy.toy_reward(response, str(int(answer) + 1)) == 0.0, (op, a, b)


def test_toy_batch():
    assert toy.toy_rewards(["Answer: 1", "Answer: 2"], ["1", "1"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="one reference per completion"):
        toy.toy_rewards(["Answer: 1"], [])


def test_registry_is_a_plain_dict_with_one_signature():
    assert isinstance(rewards.REWARDS, dict) and isinstance(rewards.BATCH_REWARDS, dict)
    assert set(rewards.REWARDS) == set(rewards.BATCH_REWARDS) == {"math", "toy", "code"}
    for fn in list(rewards.REWARDS.values()) + list(rewards.BATCH_REWARDS.values()):
        required = [p for p in inspect.signature(fn).parameters.values()
                    if p.default is inspect.Parameter.empty]
        assert len(required) == 2, fn
    assert rewards.REWARDS["toy"]("Answer: 3", "3") == 1.0
    assert rewards.REWARDS["math"]("The final answer is $3$. I hope it is correct.", "3") == 1.0
    assert rewards.BATCH_REWARDS["toy"](["Answer: 3"], ["4"]) == [0.0]


def test_registry_code_entry_takes_test_code_as_reference():
    completion = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    assert rewards.REWARDS["code"](completion, "assert add(2, 3) == 5") == 1.0
    assert rewards.BATCH_REWARDS["code"]([completion, completion],
                                         ["assert add(2, 3) == 5", "assert add(2, 3) == 6"]) \
        == [1.0, 0.0]


def test_public_api_reexports():
    assert rewards.math_reward is rewards.math.math_reward
    assert rewards.code_reward is rewards.code.code_reward
    assert rewards.code_rewards is rewards.code.code_rewards
    assert rewards.toy_reward is toy.toy_reward
