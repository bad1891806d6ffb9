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
    logp = token_logprobs(logits[:, :-1], tokens[:, 1:])  # [B,T-1]
    w = loss_mask[:, 1:].astype(jnp.float32)
    n = jnp.sum(w)
    return -jnp.sum(logp * w) / jnp.maximum(n, 1.0), n
