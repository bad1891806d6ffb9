"""Test helper: "prefill, then one token at a time" over one contiguous KV cache.

score_jax.model has one decode path, ``Transformer.decode``, over the sampler's chunked cache
(per layer, one [B,K,C,H] buffer per chunk). Tests that only want to feed a model a few tokens
at a time are clearer with one cache of S slots and a write index:

    k, v [L,B,S,K,H]    pos [B,S] (-1 = empty slot)    index: the next slot written

``cached_forward`` runs such a cache through ``Transformer.decode`` as a single chunk, so what
these tests check is the sampler's own attention path, with the package's params.
"""

import jax.numpy as jnp

from score_jax import model

# Logical axis names of each cache entry (for score_jax.sharding.tree_shardings).
CACHE_AXES = {"k": ("layers", "cache_batch", "cache_length", "cache_kv_heads", "head_dim"),
              "v": ("layers", "cache_batch", "cache_length", "cache_kv_heads", "head_dim"),
              "pos": ("cache_batch", "cache_length"), "index": ()}


def init_cache(cfg: model.ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """An empty cache: k, v [L,B,S,K,H] zeros (``dtype``, default the compute dtype), pos [B,S] = -1, index 0."""
    dt = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt),
            "pos": jnp.full((batch, length), -1, jnp.int32), "index": jnp.zeros((), jnp.int32)}


def cached_forward(cfg: model.ModelConfig, params: dict, tokens, positions, valid, cache: dict):
    """Logits [B,T,V] float32 of tokens [B,T] at positions [B,T], and the updated cache.

    The T tokens are written at slot ``cache["index"]`` (the index moves on by T) and attend to
    every filled slot by position; valid [B,T] bool (None: all) marks real tokens, whose slots
    get their position (padding's get -1, so nothing attends to it).
    """
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    net = model.bind(cfg, params)
    # [L,B,S,K,H] -> per layer a single chunk [B,K,S,H], the layout decode reads in place.
    chunk = lambda a, i: (jnp.swapaxes(a[i], 1, 2),)  # noqa: E731
    chunked = {"k": tuple(chunk(cache["k"], i) for i in range(cfg.num_layers)),
               "v": tuple(chunk(cache["v"], i) for i in range(cfg.num_layers)),
               "pos": (cache["pos"],)}
    hidden, chunked = net.decode(tokens, positions, valid, chunked, model.split_layers(cfg, params), 0,
                                 cache["index"])
    unchunk = lambda per_layer: jnp.stack([jnp.swapaxes(c[0], 1, 2) for c in per_layer])  # noqa: E731
    new = {"k": unchunk(chunked["k"]), "v": unchunk(chunked["v"]), "pos": chunked["pos"][0],
           "index": cache["index"] + tokens.shape[1]}
    return net.unembed(hidden), new
