"""Pure loss functions. Shapes: B batch, T sequence length, V vocabulary."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) under softmax(logits). logits [B,T,V] f32, targets [B,T] -> [B,T]."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - logz


def next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array):
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1], over the tokens
    whose ``loss_mask`` is 1 (the mask marks tokens to be learned, aligned with ``tokens``).

    Returns (loss, num_target_tokens); the mean is over all target tokens of the batch.
    """
    return masked_mean_nll(token_logprobs(logits[:, :-1], tokens[:, 1:]), loss_mask[:, 1:])


def masked_mean_nll(logp: jax.Array, mask: jax.Array):
    """(-mean of logp over mask == 1, number of such tokens). logp, mask [B,T]."""
    w = mask.astype(jnp.float32)
    n = jnp.sum(w)
    return -jnp.sum(logp * w) / jnp.maximum(n, 1.0), n


def chunked_token_logprobs(unembed, hidden: jax.Array, targets: jax.Array, chunk: int) -> jax.Array:
    """``token_logprobs(unembed(hidden), targets)`` computed ``chunk`` positions at a time.

    hidden [B,T,D], targets [B,T] -> [B,T]. Only one chunk's [B,chunk,V] logits exist at a time,
    in the forward and (through rematerialisation) in the backward pass: with vocabularies of
    128k-256k entries the full [B,T,V] tensor would dominate memory. chunk <= 0 or >= T: one go.
    """
    B, T, D = hidden.shape
    if chunk <= 0 or chunk >= T:
        return token_logprobs(unembed(hidden), targets)
    n = -(-T // chunk)
    pad = n * chunk - T
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(B, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        hc, tc = args  # [B,chunk,D], [B,chunk]
        return token_logprobs(unembed(hc), tc)

    out = jax.lax.map(one, (h, t))  # [n,B,chunk]
    return out.swapaxes(0, 1).reshape(B, n * chunk)[:, :T]
