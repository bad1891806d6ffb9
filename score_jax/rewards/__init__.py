"""Rewards: binary oracle checks of a completion against a reference, picked by task name.

REWARDS maps a task's reward name to its `Reward`: `score` (completion, reference) -> 0.0 or
1.0; `score_batch`, the batch form, which the learner should prefer (code runs its sandboxes in
parallel, math its checks); and, for tasks with a final answer to vote on, `final_answer` and
its inverse `answer_text`. Completions and references are str (the sampler decodes its tokens);
each function raises TypeError on anything else (None, bytes, a number), naming the argument,
rather than scoring it.

    math  reference = the answer (or a solution with \\boxed{answer}); see rewards/math.py
    toy   reference = the integer answer string, e.g. "-42"; see rewards/toy.py
    code  reference = test code (MBPP asserts, or HumanEval `check` + `check(entry_point)`);
          the program is the completion's [BEGIN]...[DONE] text (MBPP prompts) or its last
          ```python block; see rewards/code.py
"""
import dataclasses
from collections.abc import Callable

from score_jax.rewards import code
from score_jax.rewards import math
from score_jax.rewards import toy


@dataclasses.dataclass(frozen=True)
class Reward:
    """One task's reward functions."""

    score: Callable[[str, str], float]  # (completion, reference) -> 0.0 or 1.0
    score_batch: Callable[[list[str], list[str]], list[float]]  # (completions, references)
    # (completion) -> its canonical final answer, or None, for majority voting; None: no answer
    # to vote on (code).
    final_answer: Callable[[str], str | None] | None
    answer_text: Callable[[str], str] | None  # (answer) -> a completion `score` reads as it


REWARDS: dict[str, Reward] = {
    "toy": Reward(score=toy.toy_reward, score_batch=toy.toy_rewards, final_answer=toy.final_answer,
                  answer_text=toy.answer_text),
    "math": Reward(score=math.math_reward, score_batch=math.math_rewards, final_answer=math.final_answer,
                   answer_text=math.answer_text),
    "code": Reward(score=code.completion_reward, score_batch=code.completion_rewards, final_answer=None,
                   answer_text=None),
}
