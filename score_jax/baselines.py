"""Training data of the paper's supervised self-correction baselines, from the model's own samples.

Both start from episodes the current model sampled on the training prompts
(``jobs.eval.generate``) and return SFT records: the source record's fields plus
``attempt1`` / ``attempt2``, trained with the loss on attempt 2 only (``learn="last"``: the
first attempt is context, as a correction is what these methods teach).

  STaR      (Zelikman et al., as the paper applies it to self-correction): the model's own
            successful correction traces, y1 wrong and y2 right; iterated by the caller
            (sample with the newly trained model, filter, train again).
  Pair-SFT  (Welleck et al.'s pairing, the paper's "Pair-SFT"): each wrong first attempt of the
            model paired with a correct attempt the model made for the same problem in another
            sample (a first or a second attempt), so the pair need not come from one episode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from score_jax.data import pipeline, prompt_set


def _record(source: Sequence[Mapping[str, Any]], ps: prompt_set.PromptSet, problem: int, y1: str, y2: str) -> dict:
    index = int(ps.source_index[problem])
    raw = source[index]
    rec = {k: pipeline.text_field(raw, k, index) for k in raw if isinstance(raw[k], (str, bytes, np.ndarray))}
    rec.update(attempt1=y1, attempt2=y2)
    return rec


def star_records(source, ps: prompt_set.PromptSet, gen: dict, correct: np.ndarray) -> list[dict]:
    """Episodes with r(y1) = 0 and r(y2) = 1, in row order. gen/correct as from jobs.eval."""
    out = []
    for row, p in enumerate(gen["problem"]):
        if correct[0][row] == 0 and correct[1][row] == 1:
            out.append(_record(source, ps, int(p), gen["texts"][0][row], gen["texts"][1][row]))
    return out


def pair_records(source, ps: prompt_set.PromptSet, gen: dict, correct: np.ndarray, seed: int) -> list[dict]:
    """Every wrong first attempt with a correct attempt of the same problem drawn (with ``seed``)
    from that problem's correct attempts in other rows; problems with none give nothing."""
    rng = np.random.default_rng(seed)
    rows_of: dict[int, list[int]] = {}
    for row, p in enumerate(gen["problem"]):
        rows_of.setdefault(int(p), []).append(row)
    out = []
    for p, rows in rows_of.items():
        good = [(a, r) for r in rows for a in (0, 1) if correct[a][r] == 1]
        for r in rows:
            if correct[0][r] == 1:
                continue
            options = [(a, g) for a, g in good if g != r]
            if options:
                a, g = options[int(rng.integers(len(options)))]
                out.append(_record(source, ps, p, gen["texts"][0][r], gen["texts"][a][g]))
    return out
