"""Rewards: binary oracle checks of a completion against a reference, picked by task name.

Every entry of REWARDS has the signature (completion: str, reference: str) -> float (0.0 or
1.0); BATCH_REWARDS holds the batch forms, (completions, references) -> list[float], which the
learner should prefer (code runs its sandboxes in parallel, math its checks).

    math  reference = the answer (or a solution with \\boxed{answer}); see rewards/math.py
    toy   reference = the integer answer string, e.g. "-42"; see rewards/toy.py
    code  reference = test code (MBPP asserts, or HumanEval `check` + `check(entry_point)`);
          the program is the completion's [BEGIN]...[DONE] text (MBPP prompts) or its last
          ```python block; see rewards/code.py
"""
from score_jax.rewards import code
from score_jax.rewards import math
from score_jax.rewards import toy

REWARDS = {
    "math": math.math_reward,
    "toy": toy.toy_reward,
    "code": code.completion_reward,
}

BATCH_REWARDS = {
    "math": math.math_rewards,
    "toy": toy.toy_rewards,
    "code": code.completion_rewards,
}



def _math_answer(completion: str) -> str | None:
    answer = math.extract_answer(completion)
    return None if answer is None else math.normalize_answer(answer)


# Final-answer extraction for majority voting, (completion) -> canonical answer str or None,
# and the inverse, (answer) -> a completion that the task's reward scores as that answer.
# Code has no final answer to vote on.
ANSWERS = {"toy": toy.final_answer, "math": _math_answer}
ANSWER_TEXT = {
    "toy": lambda a: f"Answer: {a}",
    "math": lambda a: f"Final Answer: The final answer is ${a}$. I hope it is correct.",
}

# The public API, re-exported.
math_reward = math.math_reward
toy_reward = toy.toy_reward
code_reward = code.code_reward
code_rewards = code.code_rewards
