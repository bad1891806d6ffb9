"""MBPP (Austin et al. 2021, 974 Python problems), from the original release's mbpp.jsonl.

manual_dir holds `mbpp.jsonl` from google-research/google-research (mbpp/mbpp.jsonl): one
object per line with task_id, text, code, test_list, test_setup_code, challenge_test_list.

Splits by task id, as the release's README and TFDS/Hugging Face define them: prompt (1-10,
the few-shot pool; 2, 3, 4 are the examples of prompts.MBPP_PROMPT), test (11-510),
validation (511-600), train (601 and up; 974 is the last).

Records: id (the task id, e.g. "11"), prompt (the task text), tests (the asserts of
test_list, one per line: what prompts.MBPP_PROMPT shows the model), answer (the test code
rewards.code runs after the program: `code.mbpp_test_code(test_list, test_setup_code)`),
response (the reference program). Code has \\n line endings (the release uses \\r\\n). The
challenge tests are not used, as in the standard evaluation. A record without one of the
fields above (challenge_test_list aside), with a field of the wrong type, or with a task id
below 1 or seen twice, fails the build naming the file and line; so does a line cut off or
not UTF-8. A file without a task of some split (cut short) fails naming the file and split.
"""

import os

import tensorflow_datasets as tfds
from etils import epath

from score_jax import prompts
from score_jax.data import manual
from score_jax.rewards import code

FILE = "mbpp.jsonl"
NUM_TASKS = 974  # in the original release, ids 1-974
# Split -> (first task id, last task id), both included.
SPLIT_IDS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600),
             "train": (601, float("inf"))}


def split_of(task_id: int) -> str:
    """The split holding MBPP task `task_id` (>= 1)."""
    return next(s for s, (lo, hi) in SPLIT_IDS.items() if lo <= task_id <= hi)


class Mbpp(manual.ManualBuilder):
    """TFDS builder `mbpp`: MBPP from manual_dir/mbpp.jsonl; splits prompt, test, validation,
    train."""

    name = "mbpp"
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The original MBPP release with its task-id splits."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    TEXT_FIELDS = manual.CORE_FIELDS + ("tests",)

    def _find_files(self, manual_dir: str) -> str:
        path = os.path.join(manual_dir, FILE)
        if not os.path.isfile(path):
            raise manual.missing_files_error(
                "MBPP", manual_dir, f"{FILE} (the original release, mbpp/mbpp.jsonl)", [FILE])
        return path

    def _read_manual(self, path: str) -> dict[str, list[dict[str, str]]]:
        splits = {split: [] for split in SPLIT_IDS}
        for number, task in manual.read_jsonl(path):
            where = f"{path} line {number}"
            task_id = manual.field(task, "task_id", where, int)
            if task_id < 1:
                raise ValueError(f"{where} has task_id {task_id}; MBPP task ids start at 1, "
                                 "use the original mbpp.jsonl.")
            test_list = manual.field(task, "test_list", where, list)
            for test in test_list:
                if not isinstance(test, str):
                    raise ValueError(f"{where} field 'test_list' holds a {type(test).__name__}, "
                                     "not only strings; fix or replace the file.")
            setup = prompts.normalize_newlines(manual.field(task, "test_setup_code", where))
            splits[split_of(task_id)].append({
                "id": str(task_id),
                "prompt": manual.field(task, "text", where),
                "tests": "\n".join(test_list),
                "answer": code.mbpp_test_code(test_list, setup),
                "response": prompts.normalize_newlines(manual.field(task, "code", where)),
            })
        return splits

    def _empty_manual_split(self, split: str, path: str, splits) -> str:
        ids = [int(r["id"]) for records in splits.values() for r in records]
        if not ids:
            return (f"{path} has no records; replace it with the complete {FILE} "
                    "(google-research/google-research, mbpp/mbpp.jsonl).")
        lo, hi = SPLIT_IDS[split]
        span = f"{lo}-{hi}" if hi != float("inf") else f"{lo} and up"
        tasks = f"{len(ids)} task" + "s" * (len(ids) != 1)
        return (f"{path} has no tasks of split {split!r} (task ids {span}), so the file looks cut "
                f"short ({tasks}, the last task_id {max(ids)}; the original has {NUM_TASKS}): "
                f"replace it with the complete {FILE}.")
