"""Prompt text: the toy task's correction instruction and the task prompts of the paper.

The toy chat template (used with tokenizers trained by `score_jax.data.toy`) is
`score_jax.chat.TOY`, which defines its markers:

    <user>{prompt}<eot><model>{response}<eot>

`<user>`, `<model>` and `<eot>` are single user-defined pieces of the toy tokenizer, so a
rendered turn never merges with the text around it.

The task prompts of the paper (MATH, MBPP, HumanEval; GSM8K uses the MATH ones) follow
the toy constants; `render` fills a template from a dataset record.
"""

import string
from collections.abc import Mapping
from typing import Any

# SCoRe's instruction p for attempt 2. It is fixed and says nothing about whether attempt 1
# was right, so it leaks no answer.
TOY_CORRECTION = (
    "There might be an error in the solution above. Please correct the error, if any, and "
    "rewrite the solution. End with the line Answer: <integer>."
)


# A Self-Refine-style instruction (review, then fix) for the prompting baseline on the toy task:
# the base model never saw it in training.
TOY_SELF_REFINE = (
    "Review the solution above line by line and check each step. If a step is wrong, fix it "
    "and rewrite the solution. End with the line Answer: <integer>."
)


# ----------------------------------------------------------------------------- task prompts
#
# Turn-1 templates are `str.format` strings whose fields name a record's text fields
# (`{prompt}`, `{tests}`); fill them with `render`. Correction instructions are fixed texts
# (SCoRe's instruction p), the same for every problem of a task.

# The toy task's turn 1 is the problem itself.
TOY_PROMPT = "{prompt}"

# SCoRe (Kumar et al. 2024, appendix) MATH zero-shot instruction and correction instruction p,
# verbatim. The "Problem:"/"Solution:" labels around the problem are ours: the paper gives the
# instruction only, and it refers to "the Solution of the final Problem".
MATH_INSTRUCTION = (
    "You are a math expert. When you respond, respond only with the Solution of the final "
    "Problem, thinking step by step. At the end of the Solution, when you give your final "
    'answer, write it in the form "Final Answer: The final answer is $answer$. I hope it is '
    'correct."'
)
MATH_PROMPT = MATH_INSTRUCTION + "\n\nProblem:\n{prompt}\n\nSolution:"
MATH_CORRECTION = (
    "There might be an error in the solution above because of lack of understanding of the "
    "question. Please correct the error, if any, and rewrite the solution. Only output the "
    "final solution! At the end of the Solution, when you give your final answer, write it in "
    'the form "Final Answer: The final answer is $answer$. I hope it is correct."'
)

# SCoRe's correction instruction p for code (MBPP, HumanEval), verbatim.
CODE_CORRECTION = (
    "There might be an error in the code above because of lack of understanding of the "
    "question. Please correct the error, if any, and rewrite the solution. Only output the "
    "final correct Python program!"
)

# MBPP tasks 2, 3 and 4, the three-shot examples of Austin et al. 2021, verbatim from the
# original release (google-research/google-research, mbpp/mbpp.jsonl; the README there names
# these tasks and the prompt format below). `code` keeps the release's \r\n line endings.
MBPP_EXAMPLES = (
    dict(
        task_id=2,
        text="Write a function to find the similar elements from the given two tuple lists.",
        code="def similar_elements(test_tup1, test_tup2):\r\n"
             "  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
             "  return (res) ",
        test_list=(
            "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
            "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
            "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
        ),
    ),
    dict(
        task_id=3,
        text="Write a python function to identify non-prime numbers.",
        code="import math\r\n"
             "def is_not_prime(n):\r\n"
             "    result = False\r\n"
             "    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
             "        if n % i == 0:\r\n"
             "            result = True\r\n"
             "    return result",
        test_list=(
            "assert is_not_prime(2) == False",
            "assert is_not_prime(10) == True",
            "assert is_not_prime(35) == True",
        ),
    ),
    dict(
        task_id=4,
        text="Write a function to find the largest integers from a given list of numbers using "
             "heap queue algorithm.",
        code="import heapq as hq\r\n"
             "def heap_queue_largest(nums,n):\r\n"
             "  largest_nums = hq.nlargest(n, nums)\r\n"
             "  return largest_nums",
        test_list=(
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)"
            "==[85, 75, 65, 58, 35]",
        ),
    ),
)

# One MBPP problem in the format of Austin et al. 2021: the model writes its program after
# `[BEGIN]` and ends it with `[DONE]` (rewards.code.extract_program cuts there). `{tests}` is
# the record's asserts, one per line.
MBPP_TASK = (
    "You are an expert Python programmer, and here is your task: {prompt} Your code should pass "
    "these tests:\n\n{tests}\n[BEGIN]\n"
)


def normalize_newlines(text: str) -> str:
    """`text` with \\r\\n and \\r line endings as \\n (MBPP's code uses \\r\\n)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _mbpp_shot(example: dict) -> str:
    task = MBPP_TASK.format(prompt=example["text"], tests="\n".join(example["test_list"]))
    return task + normalize_newlines(example["code"]) + "\n[DONE]"


# The three solved examples, separated by blank lines, as the 3-shot prompt shows them (code
# with \n line endings, like the `response` of score_jax.data.mbpp records).
MBPP_3SHOT = "\n\n".join(_mbpp_shot(example) for example in MBPP_EXAMPLES)
# MBPP turn 1: the three examples, a blank line, then the problem, open after `[BEGIN]`.
MBPP_PROMPT = MBPP_3SHOT.replace("{", "{{").replace("}", "}}") + "\n\n" + MBPP_TASK

# HumanEval turn 1, zero-shot. The paper does not print it; ours asks for the whole function,
# because the code reward runs the completion's program on its own (not appended to the prompt).
HUMANEVAL_PROMPT = (
    "Complete the following Python function. Write the whole function, with its signature and "
    "any imports it needs, as one program in a ```python code block.\n\n```python\n{prompt}```"
)


def render(template: str, record: Mapping[str, Any], index: int | None = None) -> str:
    """`template` with each `{field}` replaced by that text field of `record`.

    Values may be str or utf-8 bytes (TFDS data sources return bytes). Raises ValueError
    naming the field (and the record's `index` in its source, if given) if the template uses
    one the record does not have or that is not text.
    """
    where = "the record" if index is None else f"record {index}"
    values = {}
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"Template field {{{name}}} is not a plain field name; write "
                             "templates with {record_field} fields only.")
        if name not in record:
            raise ValueError(f"Template field {{{name}}} is not in {where} (it has "
                             f"{sorted(record)}); use the template that matches this dataset.")
        values[name] = _text(record[name], name, where)
    return template.format(**values)


def _text(value: Any, name: str, where: str = "the record") -> str:
    if not isinstance(value, (str, bytes)) and hasattr(value, "item"):
        value = value.item()  # a numpy scalar, as some data sources return
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise ValueError(f"Field {name!r} of {where} is {type(value).__name__}, not text; render "
                     "templates from text fields only.")
