"""What the task builders share: text-record TFDS builders, manual directories, file checks.

Every task dataset (math, mbpp, humaneval, gsm8k) is a `TextBuilder`: its records are flat
dicts of texts with at least the core fields

    id        a string unique within its split (e.g. "test/precalculus/807.json", "11")
    prompt    the problem as the dataset states it (templates in score_jax/prompts.py wrap it)
    answer    the reward's reference (score_jax/rewards: a final answer, or test code)
    response  a reference solution text ("" if the dataset has none)

plus task-specific text fields. A build reads and checks every record of every split before
it writes any, and writes array_record files in a deterministic order, with nothing
downloaded. Builders of data the user provides are `ManualBuilder`s: they read
`manual_dir` (default `<data_dir>/downloads/manual/<name>`), and fail before any work, with
one message naming the files expected there, when those files are missing. An existing build
is reused as it is; delete its directory to rebuild from changed files.

Bad data fails the build, before anything is written, with a ValueError naming the file (and
line) and what to do: missing files (`MissingFilesError`, also a FileNotFoundError), a file
that is not UTF-8 or not JSON (`read_jsonl`, `read_json`), a record without a field
(`field`), and a file or split with no records (`EmptySplitError`; TFDS itself would stop at
the empty split with an AssertionError that names no file).
"""

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds

from score_jax.data import toy

CORE_FIELDS = ("id", "prompt", "answer", "response")


class TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose splits are lists of text records with fields `TEXT_FIELDS`.

    Subclasses set `name`, `VERSION`, `code_path`, `TEXT_FIELDS` (CORE_FIELDS first) and
    implement `_read_splits`.
    """

    TEXT_FIELDS: tuple[str, ...] = CORE_FIELDS

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _read_splits(self) -> dict[str, list[dict[str, str]]]:
        """Every split's records, read and checked; raises before anything is written."""
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` wants metadata files in a package dir.
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict(
                {field: tfds.features.Text() for field in self.TEXT_FIELDS}),
            supervised_keys=None,
        )

    def _empty_split_message(self, split: str, splits: dict[str, list[dict[str, str]]]) -> str:
        """Why split `split` of `splits` came out empty and what to do (subclasses name their
        files)."""
        del splits
        return (f"The {self.name} dataset's split {split!r} has no records; rebuild it from "
                "complete data.")

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        splits = self._read_splits()
        for split, records in splits.items():
            seen = set()
            for record in records:
                if set(record) != set(self.TEXT_FIELDS):
                    raise AssertionError(f"{self.name} record {record.get('id')!r} has fields "
                                         f"{sorted(record)}, not {sorted(self.TEXT_FIELDS)}.")
                if record["id"] in seen:
                    raise ValueError(f"{self.name} split {split!r} has two records with id "
                                     f"{record['id']!r}; remove the duplicate from the data.")
                seen.add(record["id"])
        for split, records in splits.items():
            if not records:  # TFDS would fail writing it, with an error that names no file
                raise EmptySplitError(self._empty_split_message(split, splits))
        return {split: self._generate_examples(records) for split, records in splits.items()}

    def _generate_examples(self, records: list[dict[str, str]]) -> Iterator[tuple[str, dict]]:
        for record in records:
            yield record["id"], record

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        with toy.sorted_feature_maps():  # Same bytes in every process (see there).
            super()._download_and_prepare(dl_manager, download_config)


class ManualBuilder(TextBuilder, skip_registration=True):
    """A `TextBuilder` whose data are files the user puts in `manual_dir`.

    Subclasses implement `_find_files(manual_dir)`: the paths it needs, or a FileNotFoundError
    naming what is expected there (use `missing_files_error`).
    """

    def __init__(self, *, manual_dir: str | os.PathLike | None = None, **kwargs):
        super().__init__(**kwargs)
        self._manual_dir = os.path.expanduser(os.fspath(manual_dir)) if manual_dir else None

    @property
    def manual_dir(self) -> str:
        """Where this builder reads its files: the `manual_dir` given, else
        `<data_dir root>/downloads/manual/<name>`."""
        if self._manual_dir:
            return self._manual_dir
        return os.path.join(os.fspath(self.data_dir_root), "downloads", "manual", self.name)

    def _find_files(self, manual_dir: str) -> Any:
        raise NotImplementedError

    def download_and_prepare(self, *args, **kwargs) -> None:
        """Builds from `manual_dir` unless already built; fails first if files are missing."""
        if not self.data_path.exists():  # TFDS's own test for reusing a build
            self._find_files(self.manual_dir)
        super().download_and_prepare(*args, **kwargs)

    def _read_splits(self) -> dict[str, list[dict[str, str]]]:
        return self._read_manual(self._find_files(self.manual_dir))

    def _read_manual(self, files: Any) -> dict[str, list[dict[str, str]]]:
        raise NotImplementedError

    def _empty_split_message(self, split: str, splits: dict[str, list[dict[str, str]]]) -> str:
        return self._empty_manual_split(split, self._find_files(self.manual_dir), splits)

    def _empty_manual_split(self, split: str, files: Any,
                            splits: dict[str, list[dict[str, str]]]) -> str:
        """Why split `split` of the data read from `files` (what `_find_files` returned) is
        empty and what to do; subclasses name the file it comes from."""
        del files, splits
        return (f"The {self.name} dataset's split {split!r} has no records; put complete "
                f"files in manual_dir {self.manual_dir}.")


class MissingFilesError(FileNotFoundError, ValueError):
    """Manual files are absent. A ValueError too, so that main.py reports it in one line (and
    a FileNotFoundError, as callers caught before)."""


class EmptySplitError(ValueError):
    """A split has no records: its file is empty or cut short."""


def missing_files_error(dataset: str, manual_dir: str, expected: str,
                        missing: list[str]) -> MissingFilesError:
    """The one error for absent manual files: what is expected, where, and what is missing."""
    if os.path.isdir(manual_dir):
        state = " (which is empty)" if not os.listdir(manual_dir) else ""
    elif os.path.exists(manual_dir):
        state = " (which is a file, not a directory)"
    else:
        state = " (which does not exist)"
    return MissingFilesError(
        f"The {dataset} dataset is built from files you provide: put {expected} in manual_dir "
        f"{manual_dir}{state}, or set data.manual_dir (manual_dir= in Python) to where they "
        f"are; missing: {', '.join(missing)}.")


def decode_utf8(raw: bytes, path: str, first_line: int = 1) -> str:
    """`raw` (the bytes of `path` from line `first_line` on) as text; a ValueError naming the
    file, line and column of the first byte that is not UTF-8. A UTF-8 byte order mark at the
    start of the file is dropped."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        # Characters before it on its line (all UTF-8: the first bad byte is at e.start).
        column = len(raw[raw.rfind(b"\n", 0, e.start) + 1:e.start].decode("utf-8")) + 1
        raise ValueError(f"{path} line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                         f"{column}); re-save the file as UTF-8.") from None
    return text[1:] if first_line == 1 and text.startswith("\ufeff") else text


def _json_error(e: json.JSONDecodeError) -> str:
    """json's complaint without its offsets (they count from the text parsed, not the file)."""
    return f"{e.msg} at column {e.colno}"


def read_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of the JSON Lines file `path`.

    Lines end at \\n (\\r\\n too), as editors number them; a line that is not UTF-8 or not
    a JSON object fails naming the file and line.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = decode_utf8(raw, path, number)
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                cut = ("; the file looks cut off in the middle of that record: replace it with a "
                       "complete copy." if not raw.endswith(b"\n") else "; fix or replace the file.")
                raise ValueError(f"{path} line {number} is not valid JSON ({_json_error(e)}){cut}") from None
            if not isinstance(value, dict):
                raise ValueError(f"{path} line {number} is a JSON {type(value).__name__}, not "
                                 "an object; fix or replace the file.")
            yield number, value


def read_json(path: str) -> dict[str, Any]:
    """The JSON object in file `path`."""
    with open(path, "rb") as f:
        text = decode_utf8(f.read(), path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno} is not valid JSON ({_json_error(e)}); fix or "
                         "replace the file.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; fix or "
                         "replace the file.")
    return value


def field(record: Mapping[str, Any], name: str, where: str, kind: type = str) -> Any:
    """`record[name]`, which must be a `kind`; `where` names the record in the error."""
    if name not in record:
        raise ValueError(f"{where} has no {name!r} field (it has {sorted(record)}); fix or "
                         "replace the file.")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{where} field {name!r} is {type(value).__name__}, not "
                         f"{kind.__name__}; fix or replace the file.")
    return value
