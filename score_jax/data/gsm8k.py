"""GSM8K (Cobbe et al. 2021, grade-school math word problems), from the official JSONL files.

manual_dir holds `train.jsonl` (7,473 problems) and `test.jsonl` (1,319) from openai/
grade-school-math (grade_school_math/data/): one object per line with `question` and
`answer`, the answer a worked solution whose last line is `#### <final answer>`.

Records: id ("<split>/<line number>", e.g. "test/1"; GSM8K has no ids of its own), prompt
(the question), answer (the text after the last `####`, e.g. "18", scored by rewards.math),
response (the official solution, verbatim: calculator annotations `<<...>>` and the `####`
line included). A record without question or answer, or whose answer has no `#### ` line,
fails the build naming the file and line (every official record has both).

(TFDS's own catalog `gsm8k` downloads the same files; this builder is named `gsm8k_manual`
so that the two never share a directory under one data_dir.)
"""

import os
import re

import tensorflow_datasets as tfds
from etils import epath

from score_jax.data import manual

SPLITS = ("train", "test")
SIZES = {"train": "7,473", "test": "1,319"}  # problems in the official files
_FINAL_RE = re.compile(r"^####[ \t]*(.+?)[ \t]*$", re.MULTILINE)


def final_answer(solution: str) -> str | None:
    """The final answer on the last `#### <answer>` line of a GSM8K solution, or None."""
    found = _FINAL_RE.findall(solution)
    return found[-1] if found else None


class Gsm8k(manual.ManualBuilder):
    """TFDS builder `gsm8k_manual`: GSM8K from manual_dir/{train,test}.jsonl; splits train,
    test."""

    name = "gsm8k_manual"
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The official GSM8K train and test files."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def _find_files(self, manual_dir: str) -> dict[str, str]:
        files = {split: os.path.join(manual_dir, f"{split}.jsonl") for split in SPLITS}
        missing = [os.path.basename(p) for p in files.values() if not os.path.isfile(p)]
        if missing:
            raise manual.missing_files_error(
                "GSM8K", manual_dir, "train.jsonl and test.jsonl (the official GSM8K files)",
                missing)
        return files

    def _read_manual(self, files: dict[str, str]) -> dict[str, list[dict[str, str]]]:
        splits = {}
        for split, path in files.items():
            splits[split] = []
            for number, problem in manual.read_jsonl(path):
                where = f"{path} line {number}"
                solution = manual.field(problem, "answer", where)
                answer = final_answer(solution)
                if answer is None:
                    raise ValueError(f"{where} has no '#### <answer>' line in its answer; fix "
                                     "the record or use the official GSM8K files.")
                splits[split].append({
                    "id": f"{split}/{number}",
                    "prompt": manual.field(problem, "question", where),
                    "answer": answer,
                    "response": solution,
                })
        return splits

    def _empty_manual_split(self, split: str, files: dict[str, str], splits) -> str:
        del splits
        return (f"{files[split]} has no records, so split {split!r} would be empty; put the "
                f"complete official GSM8K {split}.jsonl ({SIZES[split]} problems) there.")
