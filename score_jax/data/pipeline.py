"""Grain input pipeline: TFDS data source -> shuffled, sharded, tokenised SFT batches.

A source is anything with `__len__` and `__getitem__` returning a record dict, e.g.
`builder.as_data_source("train")` or `tfds.data_source(name, data_dir=..., split=...)`.
Records hold `prompt` and `response` texts (str or utf-8 bytes) and, for the toy task, an
integer `answer`.

Order: the whole source is shuffled with `seed` (a new permutation each epoch), epochs are
concatenated, and element j of that global stream goes to shard j % shard_count. So step t's
global batch is stream elements [t*G, (t+1)*G) with G = global_batch_size, and shard k holds
those with index = k mod shard_count: shards are disjoint and together make the global batch.
Each process reads only its own records, synchronously in the calling thread (no
worker processes or prefetch threads), at about 1,800 toy examples/s on one busy CPU core.
"""

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from score_jax import chat, prompts
from score_jax import tokenizer as tokenizer_lib

TOO_LONG_MODES = ("error", "skip", "truncate")


def text_field(record: Mapping[str, Any], field: str, index: int) -> str:
    """The record's ``field`` as str (TFDS gives utf-8 bytes); errors name the record."""
    if field not in record:
        raise ValueError(
            f"Record {index} has no {field!r} field (it has {sorted(record)}); "
            "rebuild the dataset or point the loader at a source with prompt/response records."
        )
    value = record[field]
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype == object:
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"Record {index} field {field!r} is not valid utf-8; fix or rebuild the dataset.") from None
    if isinstance(value, str):
        return value
    raise ValueError(
        f"Record {index} field {field!r} is {type(value).__name__}, not text; "
        "rebuild the dataset with Text features."
    )


def source_name(source: Any) -> str:
    """``name[split]`` of a TFDS data source (e.g. "math[train+test_minus_math500]"), or "" for
    other sources; names the split that record indices count in."""
    info, split = getattr(source, "dataset_info", None), getattr(source, "split", None)
    name = getattr(info, "name", None)
    return f"{name}[{split}]" if name and split else ""


def _text_or_none(value: Any) -> str | None:
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype == object:
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value if isinstance(value, str) else None


def record_label(record: Mapping[str, Any], index: int, source: str = "", chars: int = 40) -> str:
    """How errors name a record so that a user can find it: its index in ``source`` (see
    `source_name`), its ``id`` if it has one (task datasets: the problem's file, task id, or
    "<split>/<line>" of the file) and the first ``chars`` characters of its prompt.

    TFDS stores a split in its own order (by the hash of the id), so the index is not the
    record's line in the file it was built from; the id is what to look for there.
    """
    label = f"record {index}" + (f" of {source}" if source else "")
    details = []
    record_id = _text_or_none(record.get("id"))
    if record_id is not None:
        details.append(f"id {record_id!r}")
    prompt = _text_or_none(record.get("prompt"))
    if prompt is not None:
        details.append(f"prompt {prompt[:chars] + ('...' if len(prompt) > chars else '')!r}")
    return label + (f" ({', '.join(details)})" if details else "")


def tokenize_example(
    record: Mapping[str, Any],
    index: int,
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    seq_len: int,
    too_long: str,
    integer_answer: bool,
    template: chat.ChatTemplate,
    attempt_fields: Sequence[str],
    correction: str,
    learn: str = "all",
    prompt_template: str = "{prompt}",
    source: str = "",
) -> dict[str, np.ndarray] | None:
    """Renders and tokenises one record into SFT arrays, each int32 [seq_len].

    tokens    = the chat template's episode: x1 (bos, the user turn with `prompt_template`
                filled from the record, as RL prompts are (prompt_set), the model opener), then for each of `attempt_fields` its text and the model's
                end of turn, the correction turn (`correction`) between attempts; then eos,
                then pad_id up to seq_len. One field ("response") is plain single-turn SFT.
    loss_mask = 1 where the token is a target to learn: every attempt with its end of turn
                (learn="all"), or only the last attempt (learn="last": e.g. training a
                correction given a fixed first attempt), and eos. It is aligned with `tokens` (not shifted): a trainer predicting
                tokens[:, 1:] from tokens[:, :-1] weights its losses with loss_mask[:, 1:].
    valid     = 1 on every non-pad position.

    `index` is the record's index in the source (named `source`, see `source_name`), used in
    errors with the record's id and prompt (`record_label`). Returns None if the example
    is longer than seq_len and too_long == "skip"; with "truncate" keeps the first seq_len
    tokens (an example whose prompt fills seq_len then has no targets).
    """
    prompt = prompts.render(prompt_template, record, index)
    texts = [text_field(record, f, index) for f in attempt_fields]
    if integer_answer:
        answer = text_field(record, "answer", index)
        try:
            int(answer)
        except ValueError:
            raise ValueError(
                f"Record {index} answer {answer!r} is not an integer; rebuild the dataset, or "
                "pass integer_answer=False for datasets with free-form answers."
            ) from None
    ids = chat.encode_prompt(tokenizer, template, prompt)
    mask = [0] * len(ids)
    for t, text in enumerate(texts):
        if t:
            between = chat.instruction_ids(tokenizer, template, correction)
            ids, mask = ids + between, mask + [0] * len(between)
        turn = chat.response_ids(tokenizer, template, text)
        learned = int(learn == "all" or t == len(texts) - 1)
        ids, mask = ids + turn, mask + [learned] * len(turn)
    ids, mask = ids + [tokenizer.eos_id], mask + [1]
    length = len(ids)
    if length > seq_len:
        if too_long == "error":
            label = record_label(record, index, source)
            raise ValueError(
                f"{label[0].upper()}{label[1:]} is {length} tokens, longer than seq_len={seq_len}; "
                "raise seq_len or set too_long='skip' or 'truncate'."
            )
        if too_long == "skip":
            return None
    ids, mask = ids[:seq_len], mask[:seq_len]
    n = len(ids)
    tokens = np.full((seq_len,), tokenizer.pad_id, np.int32)
    tokens[:n] = ids
    loss_mask = np.zeros((seq_len,), np.int32)
    loss_mask[:n] = mask
    valid = np.zeros((seq_len,), np.int32)
    valid[:n] = 1
    return {"tokens": tokens, "loss_mask": loss_mask, "valid": valid}


def sft_loader(
    source: Sequence[Mapping[str, Any]],
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    shard_index: int,
    shard_count: int,
    too_long: str = "error",
    num_epochs: int | None = None,
    integer_answer: bool = True,
    template: chat.ChatTemplate = chat.TOY,
    attempt_fields: Sequence[str] = ("response",),
    correction: str = "",
    learn: str = "all",
    prompt_template: str = "{prompt}",
) -> grain.DatasetIterator:
    """Returns this shard's iterator of SFT batches; see `tokenize_example` for the arrays.

    Each batch is {"tokens", "loss_mask", "valid"}: int32 [global_batch_size // shard_count,
    seq_len]. Batches are deterministic given (source, seed, shard_index, shard_count); the
    last partial batch is dropped; num_epochs=None repeats forever. The iterator's
    `get_state()` is a JSON-serialisable dict and `set_state(state)` on a fresh loader with
    the same arguments resumes with exactly the batches an uninterrupted run would yield.

    With too_long="skip", shards drop different numbers of records, so with finite
    num_epochs processes may see different numbers of batches; use num_epochs=None when
    several processes train together. Errors from bad records (missing or non-text fields,
    a non-integer answer, or an over-long example under too_long="error") are raised when
    the record is read and name its index in the source (an over-long one also its id and
    the start of its prompt).
    """
    if too_long not in TOO_LONG_MODES:
        raise ValueError(f"too_long={too_long!r} is not one of {TOO_LONG_MODES}.")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count}).")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"shard_count={shard_count}; change the batch size or the number of processes."
        )
    if learn not in ("all", "last"):
        raise ValueError(f"learn={learn!r}; choose 'all' or 'last'.")
    if len(attempt_fields) > 1 and not correction:
        raise ValueError("Several attempts per example need the correction instruction between them.")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2.")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed} must be in [0, 2**32) for grain's shuffle.")
    size = len(source)
    if size == 0:
        raise ValueError("The data source is empty; build the dataset split before loading it.")

    tokenize = functools.partial(
        tokenize_example,
        tokenizer=tokenizer,
        seq_len=seq_len,
        too_long=too_long,
        integer_answer=integer_answer,
        template=template,
        attempt_fields=tuple(attempt_fields),
        correction=correction,
        learn=learn,
        prompt_template=prompt_template,
        source=source_name(source),
    )
    ds = grain.MapDataset.source(source)
    # After repeat the index runs past the source length; the record index is its remainder.
    ds = ds.map_with_index(lambda i, record: tokenize(record, i % size))
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    ds = ds[shard_index::shard_count]
    # Reading in the calling thread: on CPU hosts grain's default 16 prefetch threads were
    # 3.5x slower (GIL contention) and read hundreds of records ahead.
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    it = it.filter(lambda ex: ex is not None)
    it = it.batch(global_batch_size // shard_count, drop_remainder=True)
    return iter(it)


def saved_positions(states: Sequence[Mapping[str, Any]], shard_count: int) -> dict:
    """What a checkpoint keeps of the ``sft_loader`` iterators of all ``shard_count`` shards
    (their ``get_state()``, in shard order): enough to resume them on any number of shards."""
    return {"shards": shard_count, "next_index": [int(s["next_index"]) for s in states]}


def resume_state(saved: Mapping[str, Any], shard_index: int, shard_count: int) -> dict:
    """The ``set_state`` argument of shard ``shard_index`` of ``shard_count`` from
    ``saved_positions`` (or one shard's own ``get_state()``, as older checkpoints hold).

    Shard k of n has read stream elements k, k + n, ..., so its ``next_index`` i says the
    stream is read up to i * n. With as many shards as were saved, each resumes exactly where
    it was. With another count, the stream resumes at the least position any shard reached
    (every shard reached the same one unless too_long="skip" dropped records unevenly), each
    new shard at its own index from there: the same global batches an uninterrupted run reads.
    """
    if "shards" not in saved:
        return dict(saved)
    n, positions = int(saved["shards"]), [int(i) for i in saved["next_index"]]
    if n == shard_count:
        return {"next_index": positions[shard_index]}
    read = min(i * n for i in positions)  # stream elements [0, read) were read by every shard
    return {"next_index": -(-read // shard_count)}

