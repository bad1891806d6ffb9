"""The host side of a rollout: the sampler's rows this process holds, their texts, their
rewards, and how much each attempt changed the one before.

Rows are prompt-major: row ``b * k + j`` is sample j of prompt b. On several hosts each
process handles only the rows on its own devices, which are the samples of the prompts it fed
in (the prompts and the rows are split over the same mesh axes, in the same order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from score_jax import tokenizer as tokenizer_lib


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of ``x`` (sharded along axis 0 only), in global row order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = {}
    for s in x.addressable_shards:  # replicas over the other mesh axes share an index
        shards.setdefault(s.index[0].start or 0, s.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


def turn_texts(tok: tokenizer_lib.Tokenizer, tokens: np.ndarray, lengths: np.ndarray,
               stop_ids: Sequence[int]) -> list[str]:
    """Texts of one turn's rows: tokens [R,N] up to each row's length, a final stop id dropped
    (rewards parse the attempt itself, not the turn marker that closed it)."""
    stops = set(int(s) for s in stop_ids)
    texts = []
    for row, n in zip(np.asarray(tokens), np.asarray(lengths)):
        ids = [int(t) for t in row[:int(n)]]
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        texts.append(tok.decode(ids))
    return texts


def score_turns(reward_fn: Callable[[list[str], list[str]], list[float]], texts: Sequence[Sequence[str]],
                references: Sequence[str]) -> np.ndarray:
    """Rewards [num_turns, R] float32 of every turn's texts against the rows' references, in one
    call of the batch reward (so code sandboxes and math workers run all turns in parallel)."""
    flat = [t for turn in texts for t in turn]
    refs = list(references) * len(texts)
    got = reward_fn(flat, refs)
    if len(got) != len(flat):
        raise RuntimeError(f"The reward function returned {len(got)} rewards for {len(flat)} completions.")
    values = np.asarray(got, np.float32)
    if not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("Rewards must be binary (0 or 1); the task's reward function returned others.")
    return values.reshape(len(texts), -1)


def edit_ratios(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """[R] float32: 1 - Levenshtein(a_i, b_i) / max(len): 1 = y2 copies y1."""
    return np.asarray([edit_distance_ratio(x, y) for x, y in zip(a, b)], np.float32)


def edit_distance_ratio(a: str, b: str) -> float:
    """1 - Levenshtein(a, b) / max(len(a), len(b)), in [0, 1]; 1.0 for two empty strings.

    Runs on the host (numpy, not jit): the evaluation's "how much does y2 change y1" metric.
    Unit-cost insert/delete/substitute over Unicode code points. O(len(a) * len(b)) work, in
    len(a) numpy steps over rows of length len(b) + 1.
    """
    if not a and not b:
        return 1.0
    x = np.frombuffer(a.encode("utf-32-le"), dtype=np.uint32)
    y = np.frombuffer(b.encode("utf-32-le"), dtype=np.uint32)
    j = np.arange(len(y) + 1)
    row = j.copy()  # distances from a[:0] to b[:j]
    for i, c in enumerate(x, start=1):
        sub = row[:-1] + (y != c)  # substitute (or match)
        new = np.empty_like(row)
        new[0] = i
        new[1:] = np.minimum(row[1:] + 1, sub)  # delete a[i-1], or substitute
        # Insertions chain left to right: new[j] = min_{j' <= j} new[j'] + (j - j').
        row = np.minimum.accumulate(new - j) + j
    return 1.0 - float(row[-1]) / max(len(x), len(y))
