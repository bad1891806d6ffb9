"""Tolerances for comparing two float32 computations of the same quantity.

Two programs that compute the same value in another order (another mesh or sharding, scan vs
unrolled layers, a KV cache vs a full forward, chunked vs whole, jit vs eager, transformers vs
ours, another CPU's matmul kernels) differ by float32 rounding only. A sum of n rounded terms is
off by about eps * sqrt(n) (rounding errors of random sign; eps * n in the worst case) times
the size of its terms; a chain of reductions (a decoder's layers) adds the errors of each, so
``terms`` is the sum of the reduction lengths along the chain (``decoder_terms``). The size of
the terms is taken as the largest |value| of the compared array: an element near 0 is usually a
difference of terms that size, so its error is not smaller than theirs.

    tol = safety * eps * magnitude * sqrt(terms)

``SAFETY`` covers what the random-rounding estimate leaves out: gains through norms, softmax and
residual layers, both sides rounding, terms larger than the result, the largest of thousands of
errors. The largest error seen in this suite is 0.84 eps * magnitude * sqrt(terms) (the logits
of test_hf's 8-device mesh, here and on an AMD EPYC; XLA:CPU's default and Eigen matmuls, one
core or two), a fifth of the tolerance. Bugs (a wrong sign, a missing mask, an off-by-one
position) are errors of 1e-3 and up, far above every tolerance here.
"""

import math

import numpy as np

EPS = float(np.finfo(np.float32).eps)  # 1.19e-7
SAFETY = 4.0


def f32_tol(magnitude, terms: int = 1, safety: float = SAFETY) -> float:
    """Absolute tolerance for float32 values of size ``magnitude`` that went through
    reductions of ``terms`` terms in total, computed in two different ways."""
    return safety * EPS * float(magnitude) * math.sqrt(max(int(terms), 1))


def decoder_terms(cfg, seq_len: int) -> int:
    """The reduction lengths one logit of score_jax.model (a ModelConfig ``cfg``) goes through
    over ``seq_len`` keys: per layer its RMSNorms and the q/k/v and gate/up projections (d_model
    each), q/k norms and scores (head_dim), the softmax and its weighted sum (seq_len each), the
    output projection (heads * head_dim) and the down projection (mlp_dim); then the final norm
    and the unembedding (d_model each)."""
    D, H = cfg.d_model, cfg.head_dim
    norms = 4 if cfg.sandwich_norm else 2
    per_layer = (norms + 2) * D + 2 * H + 2 * seq_len + cfg.num_heads * H + cfg.mlp_dim
    return cfg.num_layers * per_layer + 2 * D


def grad_terms(cfg, seq_len: int, tokens: int) -> int:
    """The same for a gradient: the forward chain, the backward chain (the same reductions
    transposed) and the sum over the ``tokens`` positions that a weight's gradient adds up."""
    return 2 * decoder_terms(cfg, seq_len) + tokens


def assert_close_f32(got, want, terms: int, safety: float = SAFETY, magnitude=None, err_msg: str = ""):
    """|got - want| <= f32_tol(magnitude, terms, safety) elementwise, magnitude defaulting to
    max |want| (an array's scale, not each element's own). Returns the largest error in units
    of eps * magnitude * sqrt(terms), which the failure message also gives."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if magnitude is None:
        magnitude = float(np.abs(want).max()) if want.size else 0.0
    atol = f32_tol(magnitude, terms, safety)
    unit = f32_tol(magnitude, terms, 1.0)
    err = float(np.abs(got - want).max()) if want.size else 0.0
    msg = (f"max error {err:.3g} = {err / unit if unit else float('inf'):.3g} x eps*{magnitude:.3g}*sqrt({terms}); "
           f"tolerance {atol:.3g} (safety {safety:g})")
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=f"{err_msg}\n{msg}" if err_msg else msg)
    return err / unit if unit else 0.0


def top2_margin(logits) -> np.ndarray:
    """Largest minus second-largest logit along the last axis: a greedy choice that two float32
    computations can make differently only where this is within their two errors."""
    part = np.partition(np.asarray(logits, np.float64), -2, axis=-1)
    return part[..., -1] - part[..., -2]


def logprob_scale(logits) -> float:
    """The size of the terms behind log-softmax values of ``logits`` [..., V]: log p = logit -
    logsumexp, so max |logit| + max |logsumexp| (what their rounding scales with; use
    ``terms`` + V for the sum inside the logsumexp)."""
    x = np.asarray(logits, np.float64)
    m = x.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(x - m).sum(-1))
    return float(np.abs(x).max() + np.abs(lse).max())


def agreeing_prefix(got, want, close, err_msg: str = "") -> int:
    """Tokens that two computations chose (greedy or sampled from the same uniforms) agree up to
    their first difference, which must fall on a close call: ``close[i]`` says the choice of
    ``want[i]`` was within rounding of going otherwise (after it the contexts differ, so
    nothing later is comparable). Returns how many tokens agree: len(want) when all do, and
    then ``got`` must be as long."""
    got, want, where = list(got), list(want), f"{err_msg}: " if err_msg else ""
    differ = [i for i in range(min(len(got), len(want))) if got[i] != want[i]]
    if not differ:
        assert len(got) == len(want), f"{where}lengths {len(got)} vs {len(want)} with equal tokens"
        return len(want)
    i = differ[0]
    assert close[i], f"{where}token {i} is {got[i]}, not {want[i]}, at a clear choice"
    return i
