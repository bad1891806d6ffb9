"""Turn-1 prompts for RL and evaluation: every record of a split rendered, tokenised and checked
once, then served as shuffled, sharded, checkpointable batches.

    ps = prompt_set.build(source, tok, template, "{prompt}", max_prompt_len=32, too_long="skip")
    it = prompt_set.batches(ps, global_batch_size=16, seed=0, shard_index=0, shard_count=1)
    batch = next(it)   # {"tokens" [b, P], "lengths" [b], "index" [b]}; ps.answers[index]

A prompt is ``chat.encode_prompt(template.first_prompt(prompt_template.format(record)))``:
bos, the user turn, the model-turn opener. Prompts longer than ``max_prompt_len`` are counted
and, by ``too_long``, rejected with an error naming the first one (its index, id and start:
``pipeline.record_label``) ("error"), dropped
("skip"), or cut inside the user text so the turn markers survive ("truncate"); the count
is logged and kept in ``PromptSet.too_long``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from score_jax import chat, prompts
from score_jax import tokenizer as tokenizer_lib
from score_jax.data import pipeline

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """M prompts of one split, ready for the sampler (rows in source order, kept ones only)."""

    tokens: np.ndarray  # [M, P] int32, right-padded with pad_id
    lengths: np.ndarray  # [M] int32 in [1, P]
    answers: tuple[str, ...]  # the reward's reference per prompt (the record's `answer`)
    problems: tuple[str, ...]  # the rendered user text per prompt (for logs and samples)
    source_index: np.ndarray  # [M] the record's index in the source
    too_long: int  # records over max_prompt_len (skipped or truncated; see the module doc)
    num_records: int  # records in the source

    def __len__(self) -> int:
        return len(self.answers)


def _truncate(tok, template, text: str, max_len: int, overhead: int) -> tuple[list[int], str]:
    """The prompt ids with the user text cut (at a token boundary) so that all fit in max_len."""
    room = max_len - overhead
    if room < 1:
        raise ValueError(f"max_prompt_len={max_len} cannot even hold the chat template's {overhead} "
                         "marker tokens; raise sampling.max_prompt_len (rl.sampling or eval.sampling).")
    body = tok.encode(text)
    while room > 0:  # re-encoding a cut text can merge differently: shrink until it fits
        cut = tok.decode(body[:room])
        ids = chat.encode_prompt(tok, template, cut)
        if len(ids) <= max_len:
            return ids, cut
        room -= 1
    return chat.encode_prompt(tok, template, ""), ""


def build(source: Sequence[Mapping[str, Any]], tok: tokenizer_lib.Tokenizer, template: chat.ChatTemplate,
          prompt_template: str, *, max_prompt_len: int, too_long: str, limit: int = 0) -> PromptSet:
    """Renders and tokenises every record of ``source`` (the first ``limit`` if > 0)."""
    if too_long not in pipeline.TOO_LONG_MODES:
        raise ValueError(f"too_long={too_long!r}; choose one of {pipeline.TOO_LONG_MODES}.")
    n = len(source) if limit <= 0 else min(limit, len(source))
    if n == 0:
        raise ValueError("The prompt split is empty; build the dataset split before training on it.")
    overhead = len(chat.encode_prompt(tok, template, ""))  # bos and turn markers
    rows, lengths, answers, problems, kept, over = [], [], [], [], [], 0
    first_over = None
    for i in range(n):
        record = source[i]
        text = prompts.render(prompt_template, record, i)
        answer = pipeline.text_field(record, "answer", i)
        ids = chat.encode_prompt(tok, template, text)
        if len(ids) > max_prompt_len:
            over += 1
            first_over = first_over if first_over is not None else (i, len(ids))
            if too_long == "skip":
                continue
            if too_long == "truncate":
                ids, text = _truncate(tok, template, text, max_prompt_len, overhead)
        rows.append(ids)
        lengths.append(len(ids))
        answers.append(answer)
        problems.append(text)
        kept.append(i)
    if over and too_long == "error":
        i, length = first_over
        first = pipeline.record_label(source[i], i, pipeline.source_name(source))
        raise ValueError(f"{over} of {n} prompts are longer than max_prompt_len={max_prompt_len}; the first is "
                         f"{first}, {length} tokens; raise sampling.max_prompt_len (rl.sampling or "
                         "eval.sampling) or set data.too_long to 'skip' or 'truncate'.")
    if over:
        log.warning("%d of %d prompts are longer than max_prompt_len=%d: %s them (data.too_long).",
                    over, n, max_prompt_len, "skipped" if too_long == "skip" else "truncated")
    if not rows:
        raise ValueError(f"Every prompt is longer than max_prompt_len={max_prompt_len}; raise it.")
    tokens = np.full((len(rows), max_prompt_len), tok.pad_id, np.int32)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)] = ids
    return PromptSet(tokens=tokens, lengths=np.asarray(lengths, np.int32), answers=tuple(answers),
                     problems=tuple(problems), source_index=np.asarray(kept, np.int64), too_long=over,
                     num_records=n)


def batches(ps: PromptSet, *, global_batch_size: int, seed: int, shard_index: int,
            shard_count: int) -> grain.DatasetIterator:
    """This process's share of an endless, shuffled stream of prompt batches.

    Global batch t holds stream elements [t*G, (t+1)*G) (G = global_batch_size) of a new
    permutation of the prompts each epoch; process k gets the contiguous block of b = G /
    shard_count of them starting at t*G + k*b: {"tokens" [b, P], "lengths" [b], "index" [b]}
    (``index`` into ``ps``), the rows its devices hold of a batch split along the mesh's data
    axes, so a run's global batch (and each row's sampling key) is the same for any number of
    processes. ``get_state()`` / ``set_state()`` resume the stream exactly.
    """
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count}).")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ValueError(f"batch_size={global_batch_size} must be a positive multiple of the "
                         f"{shard_count} processes.")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed} must be in [0, 2**32).")
    tokens, lengths = ps.tokens, ps.lengths
    ds = grain.MapDataset.range(len(ps)).shuffle(seed=seed).repeat(None)
    b = global_batch_size // shard_count
    ds = ds.batch(global_batch_size, drop_remainder=True)
    ds = ds.map(lambda i: _rows(i[shard_index * b:(shard_index + 1) * b], tokens, lengths))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def _rows(index: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> dict:
    index = np.asarray(index, np.int64)
    return {"tokens": tokens[index], "lengths": lengths[index], "index": index}
