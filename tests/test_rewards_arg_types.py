"""Reward functions reject a completion or reference that is not a str (None, bytes, a number)
with one TypeError naming the function, the argument, the type it got and str; a str (what
the sampler always decodes) still scores as before. The checks come first: no sandbox
starts for a bad argument."""
import re

import pytest

from score_jax import rewards
from score_jax.rewards import code
from score_jax.rewards import math as math_reward_lib
from score_jax.rewards import toy

NOT_STR = [None, 4, 0.5, b"Answer: 4", ["4"]]
TYPE_NAMES = {None: "NoneType", 4: "int", 0.5: "float", b"Answer: 4": "bytes"}


def message(function: str, argument: str, value) -> str:
    """The expected TypeError text, as a regex."""
    got = TYPE_NAMES.get(value, type(value).__name__) if not isinstance(value, list) else "list"
    return re.escape(f"{function}() argument {argument!r} must be str, not {got}")


# (function, its name in the message, argument position -> argument name, good arguments)
SINGLE = [
    (math_reward_lib.math_reward, "math_reward", ["completion", "reference"], ["$4$", "4"]),
    (math_reward_lib.answers_match, "answers_match", ["pred", "gold"], ["4", "4"]),
    (math_reward_lib.extract_answer, "extract_answer", ["completion"], ["$4$"]),
    (toy.toy_reward, "toy_reward", ["completion", "reference"], ["Answer: 4", "4"]),
    (toy.extract_answer, "extract_answer", ["completion"], ["Answer: 4"]),
    (code.code_reward, "code_reward", ["program", "test_code"], ["x = 1", "assert x", 5.0]),
    (code.completion_reward, "completion_reward", ["completion", "reference"],
     ["x = 1", "assert x"]),
    (code.extract_program, "extract_program", ["completion"], ["x = 1"]),
]


@pytest.mark.parametrize("value", NOT_STR, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("function, name, arguments, good", SINGLE, ids=[s[1] for s in SINGLE])
def test_a_non_str_argument_raises_one_clear_type_error(function, name, arguments, good, value):
    for position, argument in enumerate(arguments):
        args = list(good)
        args[position] = value
        with pytest.raises(TypeError, match="^" + message(name, argument, value) + "$"):
            function(*args)


def test_code_reward_of_none_or_bytes_no_longer_scores_or_fails_in_json():
    with pytest.raises(TypeError, match=message("code_reward", "program", None)):
        code.code_reward(None, "assert True", 5.0)
    with pytest.raises(TypeError, match=message("code_reward", "program", b"Answer: 4")):
        code.code_reward(b"Answer: 4", "assert True", 5.0)
    with pytest.raises(TypeError, match=message("completion_reward", "completion", None)):
        code.completion_reward(None, "assert True")


BATCH = [
    (math_reward_lib.math_rewards, "math_rewards", ["completions", "references"]),
    (toy.toy_rewards, "toy_rewards", ["completions", "references"]),
    (code.code_rewards, "run_programs", ["programs", "tests"]),
    (code.run_programs, "run_programs", ["programs", "tests"]),
    (code.completion_rewards, "completion_rewards", ["completions", "references"]),
]


@pytest.mark.parametrize("function, name, arguments", BATCH, ids=[b[0].__name__ for b in BATCH])
def test_a_batch_with_a_non_str_element_names_its_index(function, name, arguments):
    extra = [5.0] if function in (code.code_rewards, code.run_programs) else []
    for position, argument in enumerate(arguments):
        args = [["1", "2", "3"], ["1", "2", "3"]]
        args[position] = ["1", b"2", "3"]
        with pytest.raises(TypeError, match=re.escape(
                f"{name}() argument {argument!r} must be a list of str, but {argument}[1] "
                "is bytes")):
            function(*args, *extra)
        args[position] = "123"  # a str where a list of them belongs
        with pytest.raises(TypeError, match=re.escape(
                f"{name}() argument {argument!r} must be a list of str, not str")):
            function(*args, *extra)


def test_the_registry_still_scores_str_and_rejects_others():
    for task, completion in (("toy", "Answer: 4"), ("math", math_reward_lib.answer_text("4"))):
        reward = rewards.REWARDS[task]
        assert reward.score(completion, "4") == 1.0
        assert reward.score_batch([completion, completion], ["4", "5"]) == [1.0, 0.0]
        with pytest.raises(TypeError, match="must be str, not bytes"):
            reward.score(completion.encode(), "4")
        with pytest.raises(TypeError, match=r"completions\[0\] is NoneType"):
            reward.score_batch([None], ["4"])
    with pytest.raises(TypeError, match="must be str, not NoneType"):
        rewards.REWARDS["code"].score(None, "assert True")
