"""The paper's self-correction metrics, with confidence intervals, majority voting and the
inference-time scaling study. Pure numpy over outcome arrays; no model here.

Outcomes are ``correct[a, p, j]`` in {0, 1}: attempt a (0 = t1, 1 = t2, ...) of sample j of
problem p. Every metric is a fraction of all (problem, sample) pairs, as in the paper:
    acc_t{a}       mean of correct[a-1]
    delta          Acc@t2 - Acc@t1
    delta_i_to_c   wrong at t1, right at t2 (new problems solved by correcting)
    delta_c_to_i   right at t1, wrong at t2 (correct answers broken)
so delta = delta_i_to_c - delta_c_to_i.

Confidence intervals (95%, normal approximation) treat problems as the independent units:
each metric is a mean over problems of a per-problem mean over its samples, and its standard
error is the standard deviation of those per-problem values over sqrt(#problems). For a paired
difference such as delta this is the paired standard error, much tighter than two separate
intervals.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054


def mean_ci(per_problem: np.ndarray) -> dict:
    """{"mean", "ci_low", "ci_high", "se"} of the mean over problems of ``per_problem`` [P]."""
    x = np.asarray(per_problem, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"per_problem must be a non-empty vector, got shape {x.shape}.")
    m = float(x.mean())
    se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")
    return {"mean": m, "ci_low": m - Z95 * se, "ci_high": m + Z95 * se, "se": se}


def _check(correct) -> np.ndarray:
    c = np.asarray(correct)
    if c.ndim == 2:
        c = c[:, :, None]  # one sample per problem
    if c.ndim != 3 or c.shape[0] < 1 or c.shape[1] < 1 or c.shape[2] < 1:
        raise ValueError(f"correct must have shape [attempts, problems, samples], got {np.shape(correct)}.")
    if not np.isin(c, (0, 1)).all():
        raise ValueError("correct must hold only 0 and 1.")
    return c.astype(np.float64)


def self_correction(correct) -> dict:
    """The metrics of the module docstring, each as ``mean_ci`` output, plus ``acc_by_attempt``
    (the accuracy after each of N attempts, means only) and counts. ``correct`` [A, P, k] or
    [A, P]; A >= 2 for the turn-2 metrics."""
    c = _check(correct)
    A, P, k = c.shape
    per = lambda x: x.mean(axis=-1)  # noqa: E731  [P, k] -> [P]
    out = {"num_problems": P, "samples_per_problem": k, "num_attempts": A,
           "acc_t1": mean_ci(per(c[0]))}
    if A >= 2:
        t1, t2 = c[0], c[1]
        out["acc_t2"] = mean_ci(per(t2))
        out["delta"] = mean_ci(per(t2 - t1))
        out["delta_i_to_c"] = mean_ci(per((1 - t1) * t2))
        out["delta_c_to_i"] = mean_ci(per(t1 * (1 - t2)))
    out["acc_by_attempt"] = [float(c[a].mean()) for a in range(A)]
    return out


REVISE_KEYS = ("revise_if_wrong", "revise_if_right", "fix_if_revised", "break_if_revised")


def revise_rates(c1, c2, revised) -> dict:
    """The conditional rates SCoRe has to move, from per-episode outcomes of the same shape
    (c1, c2: attempt 1 / 2 correct; revised: y2 != y1; all 0/1). Written with array operators
    only, so numpy arrays and jax arrays (inside jit) alike:
        revise_if_wrong   P(y2 != y1 | y1 wrong)
        revise_if_right   P(y2 != y1 | y1 right)
        fix_if_revised    P(y2 right | y1 wrong, y2 != y1)
        break_if_revised  P(y2 wrong | y1 right, y2 != y1)
    and the counts they are conditioned on (n_wrong1, n_right1, n_revised_wrong, n_revised_right);
    a rate whose condition never happened is 0 (its count says so). Since y2 == y1 scores the
    same, delta_i_to_c = P(y1 wrong) * revise_if_wrong * fix_if_revised, and likewise c->i."""
    wrong, right = 1 - c1, c1
    rev_wrong, rev_right = revised * wrong, revised * right
    n = {"n_wrong1": wrong.sum(), "n_right1": right.sum(), "n_revised_wrong": rev_wrong.sum(),
         "n_revised_right": rev_right.sum()}

    def rate(num, den):
        return num / (den + (den == 0))  # 0 for an empty condition, for numpy and jax alike

    return {"revise_if_wrong": rate(n["n_revised_wrong"], n["n_wrong1"]),
            "revise_if_right": rate(n["n_revised_right"], n["n_right1"]),
            "fix_if_revised": rate((rev_wrong * c2).sum(), n["n_revised_wrong"]),
            "break_if_revised": rate((rev_right * (1 - c2)).sum(), n["n_revised_right"]), **n}


def mean_or_nan(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def majority(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the one seen first. None if all are None."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def scaling_budgets(samples: int) -> list[int]:
    """Even budgets 2, 4, 8, ... up to ``samples`` (the episodes drawn per problem)."""
    out, b = [], 2
    while b <= samples:
        out.append(b)
        b *= 2
    return out


def inference_scaling(answers: np.ndarray, is_correct: Callable[[int, str], bool], budgets: Sequence[int]) -> dict:
    """Majority voting at equal sample budgets, parallel against sequential (paper, Sec. 6.3).

    answers [2, P, S] (object): the extracted final answer (str, or None if there is none) of
    attempt 1 and attempt 2 of S episodes per problem. ``is_correct(p, answer)`` checks an
    answer against problem p's reference. For a budget of B samples per problem:
      parallel:   B first attempts, majority-voted                          (B samples)
      sequential: B/2 first attempts each followed by one self-correction,
                  majority vote over the B/2 second attempts                 (B samples)
    Each uses disjoint groups of episodes (S // B groups for parallel, S // (B/2) for
    sequential) and averages accuracy over groups and problems. Returns {"budgets", "parallel",
    "sequential", "samples_used": {"parallel", "sequential"}} with lists aligned to budgets.
    """
    a = np.asarray(answers, dtype=object)
    if a.ndim != 3 or a.shape[0] != 2:
        raise ValueError(f"answers must have shape [2, problems, samples], got {a.shape}.")
    _, P, S = a.shape
    out = {"budgets": [], "parallel": [], "sequential": [], "samples_used": {"parallel": [], "sequential": []}}
    for B in budgets:
        if B < 2 or B % 2 or B > S:
            raise ValueError(f"budget {B} must be even and in [2, {S}] (the episodes per problem).")
        half = B // 2
        par = [is_correct(p, majority(a[0, p, g * B:(g + 1) * B])) for p in range(P) for g in range(S // B)]
        seq = [is_correct(p, majority(a[1, p, g * half:(g + 1) * half])) for p in range(P) for g in range(S // half)]
        out["budgets"].append(B)
        out["parallel"].append(mean_or_nan(par))
        out["sequential"].append(mean_or_nan(seq))
        out["samples_used"]["parallel"].append(B)
        out["samples_used"]["sequential"].append(2 * half)
    return out


def table(rows: dict[str, dict], keys: Sequence[str] = ("acc_t1", "acc_t2", "delta", "delta_i_to_c",
                                                         "delta_c_to_i")) -> str:
    """A fixed-width text table (percent, with 95% CI half-widths) of ``self_correction`` outputs."""
    names = {"acc_t1": "Acc@t1", "acc_t2": "Acc@t2", "delta": "Delta", "delta_i_to_c": "i->c",
             "delta_c_to_i": "c->i"}
    width = max([len("method")] + [len(r) for r in rows])
    head = f"{'method':<{width}} | " + " | ".join(f"{names.get(k, k):>13}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        cells = []
        for k in keys:
            v = m.get(k)
            if v is None:
                cells.append(f"{'-':>13}")
            else:
                half = (v["ci_high"] - v["ci_low"]) / 2
                cells.append(f"{100 * v['mean']:6.1f} ±{100 * half:5.1f}" if np.isfinite(half)
                             else f"{100 * v['mean']:13.1f}")
        lines.append(f"{name:<{width}} | " + " | ".join(cells))
    return "\n".join(lines)
