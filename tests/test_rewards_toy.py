"""Toy reward and the reward registry."""
import inspect
import re
import subprocess
import sys

import pytest

from score_jax import rewards
from score_jax.data import toy as toy_data
from score_jax.rewards import code
from score_jax.rewards import math as math_reward_lib
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


def test_answer_format_is_defined_once_in_the_reward():
    assert re.compile(toy.ANSWER_PATTERN).groupindex == {"answer": 1}
    assert "ANSWER_PATTERN" in inspect.getsource(toy.extract_answer)
    assert "extract_answer" in inspect.getsource(toy.toy_reward)
    assert "answer_text" in inspect.getsource(toy_data.solve)  # the task writes the reward's format
    sources = inspect.getsource(toy) + inspect.getsource(toy_data)
    assert sources.count("^Answer:") == 1, "the answer-line regex is written out more than once"
    assert not hasattr(toy_data, "check_answer") and not hasattr(toy_data, "ANSWER_PATTERN")


def test_answer_lines():
    check = toy.toy_reward
    assert check("steps\nAnswer: -42", "-42")
    assert check("Answer: 1\nAnswer: 7\n", "7")  # The last answer line counts.
    assert check("Answer: 007", "7")
    assert not check("Answer: 1\nAnswer: 7", "1")
    assert not check("the answer is 7", "7")
    assert not check("Answer: 7.5", "7")
    assert toy.extract_answer("x\nAnswer:  12 \n") == "12"
    assert toy.final_answer("Answer: 007\n") == "7" and toy.final_answer("Answer: 4.5") is None
    assert toy.toy_reward(toy.answer_text("-42"), "-42") == 1.0


def test_the_reward_registry_imports_without_tensorflow_datasets():
    code_ = "import sys, score_jax.rewards; print('tensorflow_datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code_], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert out.strip() == "False"


def test_non_integer_reference_is_a_data_error():
    with pytest.raises(ValueError, match="not an integer"):
        toy.toy_reward("Answer: 1", "one")


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
    assert isinstance(rewards.REWARDS, dict)
    assert set(rewards.REWARDS) == {"math", "toy", "code"}
    for reward in rewards.REWARDS.values():
        assert isinstance(reward, rewards.Reward)
        for fn in (reward.score, reward.score_batch):
            required = [p for p in inspect.signature(fn).parameters.values()
                        if p.default is inspect.Parameter.empty]
            assert len(required) == 2, fn
    assert rewards.REWARDS["toy"].score("Answer: 3", "3") == 1.0
    assert rewards.REWARDS["math"].score("The final answer is $3$. I hope it is correct.", "3") == 1.0
    assert rewards.REWARDS["toy"].score_batch(["Answer: 3"], ["4"]) == [0.0]


@pytest.mark.parametrize("name", ["toy", "math"])
def test_registry_answer_text_is_scored_as_its_final_answer(name):
    reward = rewards.REWARDS[name]
    for answer in ("3", "-42"):
        completion = reward.answer_text(answer)
        assert reward.final_answer(completion) == answer
        assert reward.score(completion, answer) == 1.0
    assert reward.final_answer("no answer here") is None


def test_registry_code_has_no_final_answer():
    assert rewards.REWARDS["code"].final_answer is None and rewards.REWARDS["code"].answer_text is None


def test_registry_code_entry_takes_test_code_as_reference():
    completion = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    assert rewards.REWARDS["code"].score(completion, "assert add(2, 3) == 5") == 1.0
    assert rewards.REWARDS["code"].score_batch([completion, completion],
                                               ["assert add(2, 3) == 5", "assert add(2, 3) == 6"]) \
        == [1.0, 0.0]


def test_registry_entries_are_the_submodules_functions():
    assert rewards.REWARDS["math"].score is math_reward_lib.math_reward
    assert rewards.REWARDS["code"].score_batch is code.completion_rewards
    assert rewards.REWARDS["toy"].score is toy.toy_reward
