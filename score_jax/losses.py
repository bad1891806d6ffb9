"""Pure loss functions. Shapes: B batch, T sequence length, V vocabulary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) under softmax(logits). logits [B,T,V] f32, targets [B,T] -> [B,T]."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - logz


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over the entries where mask (same shape) is nonzero: a scalar, 0 for an empty
    mask. Masked-out entries are replaced by 0 (not multiplied), so they may hold inf or nan."""
    keep = mask.astype(bool)
    return jnp.sum(jnp.where(keep, x, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def masked_mean_nll(logp: jax.Array, mask: jax.Array):
    """(-mean of logp over mask == 1, number of such tokens f32). logp, mask [B,T]."""
    return -masked_mean(logp, mask), jnp.sum(mask.astype(jnp.float32))


def _chunked(per_chunk, unembed, hidden: jax.Array, targets: jax.Array, chunk: int):
    """``per_chunk(unembed(h), t)`` (a pytree of [B,c] arrays) over ``chunk`` positions at a time,
    reassembled to [B,T]; each chunk rematerialised in the backward pass."""
    B, T, D = hidden.shape
    if chunk <= 0 or chunk >= T:
        return per_chunk(unembed(hidden), targets)
    n = -(-T // chunk)
    pad = n * chunk - T
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        hc, tc = args  # [B,chunk,D], [B,chunk]
        return per_chunk(unembed(hc), tc)

    out = jax.lax.map(one, (h, t))  # leaves [n,B,chunk]
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(B, n * chunk)[:, :T], out)


def chunked_token_logprobs(unembed, hidden: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """``token_logprobs(unembed(hidden), targets)`` computed ``chunk`` positions at a time.

    hidden [B,T,D], targets [B,T] -> [B,T]. Only one chunk's [B,chunk,V] logits exist at a time,
    in the forward and (through rematerialisation) in the backward pass: with vocabularies of
    128k-256k entries the full [B,T,V] tensor would dominate memory. chunk <= 0 or >= T: one go.
    """
    return _chunked(token_logprobs, unembed, hidden, targets, chunk)


def _entropy(logp: jax.Array) -> jax.Array:
    """Entropy (nats) [...] of the distributions with log-probs logp [..., V]."""
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)  # -inf logits (soft-capped or masked) add 0


def _logprobs_entropy(logits: jax.Array, targets: jax.Array):
    logp = token_logprobs(logits, targets)
    return logp, _entropy(jax.nn.log_softmax(jax.lax.stop_gradient(logits), axis=-1))


def chunked_logprobs_and_entropy(unembed, hidden: jax.Array, targets: jax.Array, chunk: int):
    """(log p(targets) [B,T], entropy of the predictive distribution [B,T] in nats).

    Like ``chunked_token_logprobs``; the entropy carries no gradient (a metric). hidden [B,T,D].
    """
    return _chunked(_logprobs_entropy, unembed, hidden, targets, chunk)


# ---------------------------------------------------------------------------------------------
# SCoRe RL losses. Shapes: B episodes (prompt-major: rows [p*k:(p+1)*k] are the k samples of
# prompt p), T tokens of one turn (T1, T2 may differ), V vocabulary, k samples per prompt.
# String options are static Python values: validate them here, at trace time, before any work.
# ---------------------------------------------------------------------------------------------

STAGES = (1, 2)
SHAPINGS = ("difference", "indicator", "none")
BASELINES = ("loo", "mean", "none")


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))} (got {value!r}).")


def shaped_rewards(r1: jax.Array, r2: jax.Array, *, stage: int, alpha, shaping: str):
    """Per-episode rewards of the two turns, (r1_hat [B], r2_hat [B]) f32, from binary r1, r2 [B].

    Stage I: r1_hat = 0 (turn 1 has no reward; ``score_loss`` gives it no policy gradient) and
    r2_hat = r(y2); ``alpha`` and ``shaping`` are unused (but still validated).
    Stage II: r1_hat = r(y1) and r2_hat by ``shaping``:
      "difference" (paper): r(y2) + alpha * (r(y2) - r(y1))  -- rewards fixing, punishes breaking
      "indicator" (seed article): r(y2) + alpha * 1[r(y1) = 0 and r(y2) = 1]  -- fixing only
      "none": r(y2).
    """
    _check("stage", stage, STAGES)
    _check("shaping", shaping, SHAPINGS)
    r1 = jnp.asarray(r1, jnp.float32)
    r2 = jnp.asarray(r2, jnp.float32)
    if r1.ndim != 1 or r1.shape != r2.shape:
        raise ValueError(f"r1 and r2 must both have shape [B] (got {r1.shape} and {r2.shape}).")
    if stage == 1:
        return jnp.zeros_like(r1), r2  # r1_hat = 0, r2_hat = r(y2): Stage I
    if shaping == "difference":
        bonus = alpha * (r2 - r1)  # alpha (r(y2) - r(y1)), Stage II shaping
    elif shaping == "indicator":
        fixed = ((r1 == 0) & (r2 == 1)).astype(jnp.float32)  # 1[r(y1)=0 and r(y2)=1]; binary r
        bonus = alpha * fixed  # b 1[r(y1)=0, r(y2)=1], seed-article shaping
    else:
        bonus = jnp.zeros_like(r2)
    return r1, r2 + bonus  # r1_hat = r(y1), r2_hat = r(y2) + bonus


def advantages(rewards: jax.Array, *, baseline: str, k: int) -> jax.Array:
    """Advantages A [B] f32 of per-episode rewards [B] (episodes laid out prompt-major).

    "loo": A_i = r_i - mean_{j != i} r_j over the k samples of the same prompt (needs k >= 2 and
      B divisible by k); sums to zero per prompt and keeps REINFORCE unbiased.
    "mean": A_i = r_i - mean of the whole batch (slightly biased: includes r_i itself).
    "none": A_i = r_i, the paper's plain REINFORCE.
    """
    _check("baseline", baseline, BASELINES)
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1:
        raise ValueError(f"rewards must have shape [B] (got {r.shape}).")
    if baseline == "none":
        return r
    if baseline == "mean":
        return r - jnp.mean(r)
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"baseline 'loo' needs k >= 2 samples per prompt (got k={k!r}); "
                         "sample more per prompt or use baseline 'mean' or 'none'.")
    if r.shape[0] % k:
        raise ValueError(f"baseline 'loo' needs B divisible by k (got B={r.shape[0]}, k={k}); "
                         "episodes must be laid out prompt-major, k per prompt.")
    g = r.reshape(-1, k)  # [B/k, k]
    others = (jnp.sum(g, axis=1, keepdims=True) - g) / (k - 1)  # mean_{j != i} r_j
    return (g - others).reshape(-1)


# Schulman, "Approximating KL divergence" (2020), with d = ref_logp - logp = log(ref/pi) at
# tokens sampled from pi. As *values* all three estimate KL(pi || ref) (k1, k3 unbiased).
# As *losses* (differentiated through logp, the sampling not differentiated) they differ:
# E[grad k1] = E[grad log pi] = 0 (only noise); E[grad k2] = grad KL(pi || ref) (per position,
# prefix held fixed); E[grad k3] = grad KL(ref || pi) (the forward KL). So in the loss, k2 is
# the paper's KL; in the reward (stop-gradient), k1 is the usual choice.
KL_ESTIMATORS = {
    "k1": lambda logp, ref_logp: logp - ref_logp,
    "k2": lambda logp, ref_logp: 0.5 * jnp.square(logp - ref_logp),
    "k3": lambda logp, ref_logp: jnp.exp(ref_logp - logp) - (ref_logp - logp) - 1.0,
}


def kl_per_token(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
    """Per-token estimate of KL(pi || ref) from log-probs of the sampled tokens, [B,T] -> [B,T].

    "k1": logp - ref_logp; "k2": (logp - ref_logp)^2 / 2; "k3": exp(ref - logp) - (ref - logp) - 1.
    All are 0 where logp == ref_logp; k2 and k3 are >= 0. See the note on KL_ESTIMATORS for which
    gradient each gives when used in the loss.
    """
    _check("kl_estimator", estimator, tuple(KL_ESTIMATORS))
    return KL_ESTIMATORS[estimator](logp, ref_logp)


def _sequence_mean(x, w):
    n = jnp.sum(w, axis=1)  # [B] tokens per sequence
    per_seq = jnp.sum(x, axis=1) / jnp.maximum(n, 1.0)  # [B]
    return jnp.sum(per_seq) / jnp.maximum(jnp.sum(n > 0), 1)  # over sequences with tokens


# Token normalisation of a per-token loss, a config choice ("normalize"):
#   "sequence": mean over each sequence's own tokens, then mean over the sequences that have
#     tokens (GRPO): a token of a short answer weighs more than one of a long answer.
#   "token": sum over all tokens / number of tokens in the batch (DAPO): every token weighs the
#     same, but the weight depends on the other sequences of the batch.
#   "constant": sum over all tokens / (B * T), T the padded (static) length (Dr. GRPO): a fixed
#     normaliser, so the per-sequence gradient is not biased by its length.
REDUCTIONS = {
    "sequence": _sequence_mean,
    "token": masked_mean,
    "constant": lambda x, w: jnp.sum(x) / (x.shape[0] * x.shape[1]),
}


def reduce_tokens(x: jax.Array, mask: jax.Array, how: str) -> jax.Array:
    """Scalar reduction of x [B,T] over the tokens where mask [B,T] is nonzero (see REDUCTIONS).

    Masked-out entries are replaced by 0 (not multiplied), so padding may hold inf or nan.
    An empty mask gives 0.
    """
    _check("normalize", how, tuple(REDUCTIONS))
    if x.shape != mask.shape or x.ndim != 2:
        raise ValueError(f"x and mask must both have shape [B,T] (got {x.shape} and {mask.shape}).")
    keep = mask.astype(bool)
    return REDUCTIONS[how](jnp.where(keep, x, 0.0), keep.astype(jnp.float32))


def score_loss(*, logp1, ref_logp1, mask1, logp2, ref_logp2, mask2, r1, r2, stage, alpha, beta1,
               beta2, shaping, baseline, k, kl_estimator, kl_in_reward, normalize):
    """The SCoRe Stage I / Stage II objective as a loss to minimise. Returns (loss, metrics).

    logp{t}, ref_logp{t}, mask{t} [B,T_t]: policy (differentiable) and reference log-probs of
    turn t's sampled tokens, and the mask of its generated tokens. r1, r2 [B]: binary rewards
    of y1 and y2. stage, shaping, baseline, k, kl_estimator, kl_in_reward, normalize are static;
    alpha, beta1, beta2 may be traced scalars.

    Per-turn credit, discount 0: turn t's tokens get -stop_gradient(A_t) * logp (REINFORCE) with
    A_t the advantage (``baseline``) of turn t's shaped reward alone (``shaped_rewards``).
      Stage I:  loss = pg2 + beta2 KL(turn 1) + beta1 KL(turn 2); no reward, so no policy
                gradient, reaches turn 1.
      Stage II: loss = pg1 + pg2 + beta1 (KL(turn 1) + KL(turn 2)).
    KL(turn t) is ``reduce_tokens`` of ``kl_per_token`` over turn t, like the pg terms.
    kl_in_reward=True instead subtracts beta * (sum over the turn's tokens of stop_gradient
    per-token KL), i.e. the sequence KL, from that turn's reward before the baseline, and adds
    no KL term to the loss. In Stage I turn 1's reward is then -beta2 * KL alone, so turn 1 gets
    a REINFORCE term carrying only the KL. Note beta's scale differs between the two modes:
    a sum over tokens here, a normalised mean in the loss.

    metrics (f32 scalars, same keys in every mode): reward{t} (mean r), shaped_reward{t}
    (mean r_hat, before any KL), adv{t}_mean, adv{t}_std, kl{t} (mean per token, unweighted),
    pg{t} and kl_loss{t} (the loss terms; 0 where absent), loss.
    """
    _check("stage", stage, STAGES)
    _check("kl_in_reward", kl_in_reward, (False, True))
    for name, (lp, ref, m) in {"turn 1": (logp1, ref_logp1, mask1),
                               "turn 2": (logp2, ref_logp2, mask2)}.items():
        if not (lp.ndim == 2 and lp.shape == ref.shape == m.shape):
            raise ValueError(f"{name}: logp, ref_logp and mask must share one shape [B,T] "
                             f"(got {lp.shape}, {ref.shape}, {m.shape}).")
    B = logp1.shape[0]
    if logp2.shape[0] != B or jnp.shape(r1) != (B,) or jnp.shape(r2) != (B,):
        raise ValueError(f"logp1, logp2 [B,T] and r1, r2 [B] must agree on B (got {logp1.shape}, "
                         f"{logp2.shape}, {jnp.shape(r1)}, {jnp.shape(r2)}).")
    keep1, keep2 = mask1.astype(bool), mask2.astype(bool)
    # Zero padding before the KL: exp() of garbage there would put inf * 0 = nan into the grads.
    logp1, logp2 = jnp.where(keep1, logp1, 0.0), jnp.where(keep2, logp2, 0.0)
    ref_logp1 = jnp.where(keep1, jax.lax.stop_gradient(ref_logp1), 0.0)
    ref_logp2 = jnp.where(keep2, jax.lax.stop_gradient(ref_logp2), 0.0)

    r1_hat, r2_hat = shaped_rewards(r1, r2, stage=stage, alpha=alpha, shaping=shaping)
    kl_tok1 = kl_per_token(logp1, ref_logp1, kl_estimator)  # [B,T1]
    kl_tok2 = kl_per_token(logp2, ref_logp2, kl_estimator)  # [B,T2]
    beta_turn1 = beta2 if stage == 1 else beta1  # Stage I holds turn 1 to the base with beta2
    beta_turn2 = beta1

    pg_turn1 = stage == 2 or kl_in_reward
    if kl_in_reward:
        seq_kl1 = jnp.sum(jax.lax.stop_gradient(kl_tok1), axis=1)  # [B] ~ KL(pi(.|x1)||ref(.|x1))
        seq_kl2 = jnp.sum(jax.lax.stop_gradient(kl_tok2), axis=1)  # [B] ~ KL(pi(.|x2)||ref(.|x2))
        reward1 = r1_hat - beta_turn1 * seq_kl1  # r1_hat - beta KL(turn 1), KL in the reward
        reward2 = r2_hat - beta_turn2 * seq_kl2  # r2_hat - beta1 KL(turn 2), KL in the reward
    else:
        reward1, reward2 = r1_hat, r2_hat
    a1 = advantages(reward1, baseline=baseline, k=k) if pg_turn1 else jnp.zeros((B,))  # A1 [B]
    a2 = advantages(reward2, baseline=baseline, k=k)  # A2 [B]
    a1, a2 = jax.lax.stop_gradient(a1), jax.lax.stop_gradient(a2)

    zero = jnp.zeros((), jnp.float32)
    # -E[A1 log pi(y1|x1)], turn-1 REINFORCE: Stage II (Stage I only with the KL in the reward)
    pg1 = reduce_tokens(-a1[:, None] * logp1, mask1, normalize) if pg_turn1 else zero
    pg2 = reduce_tokens(-a2[:, None] * logp2, mask2, normalize)  # -E[A2 log pi(y2|x2)], turn 2
    if kl_in_reward:
        kl_loss1 = kl_loss2 = zero
    else:
        # beta2 KL(pi(.|x1) || ref(.|x1)) in Stage I, beta1 KL(pi(.|x1) || ref(.|x1)) in Stage II
        kl_loss1 = beta_turn1 * reduce_tokens(kl_tok1, mask1, normalize)
        # beta1 KL(pi(.|x2) || ref(.|x2)), both stages
        kl_loss2 = beta_turn2 * reduce_tokens(kl_tok2, mask2, normalize)
    loss = pg1 + pg2 + kl_loss1 + kl_loss2

    sg = jax.lax.stop_gradient
    metrics = {
        "reward1": jnp.mean(jnp.asarray(r1, jnp.float32)),
        "reward2": jnp.mean(jnp.asarray(r2, jnp.float32)),
        "shaped_reward1": jnp.mean(r1_hat),
        "shaped_reward2": jnp.mean(r2_hat),
        "adv1_mean": jnp.mean(a1), "adv1_std": jnp.std(a1),
        "adv2_mean": jnp.mean(a2), "adv2_std": jnp.std(a2),
        "kl1": sg(masked_mean(kl_tok1, keep1)),
        "kl2": sg(masked_mean(kl_tok2, keep2)),
        "pg1": sg(pg1), "pg2": sg(pg2),
        "kl_loss1": sg(kl_loss1), "kl_loss2": sg(kl_loss2),
        "loss": sg(loss),
    }
    return loss, metrics
