"""A decoder-only transformer in Flax NNX covering Llama 3.x, Qwen 2.5/3 and Gemma 2/3.

Dimension letters used in every einsum and shape comment:
    B batch        T query length      S key length (T, or all cache slots)   C one cache chunk's slots
    D d_model      N query heads       K key/value heads    G query heads per KV head (N / K)
    H head dim     F MLP width         V vocabulary         L layers

Parameters carry logical axis names in their ``axes`` metadata; ``score_jax.sharding.RULES``
maps them to mesh axes. Layer parameters are stacked along a leading ``layers`` axis, so the
same checkpoint serves a scanned or an unrolled forward.

Two paths run the same layers: ``Transformer.__call__`` / ``hidden`` for training and scoring
(the T tokens attend to each other; layers scanned or unrolled, with remat), and
``Transformer.decode`` for the sampler (a chunked KV cache; layers unrolled).

Attention masks are built from token *positions*, not slot indices: a query at position p
sees every filled key slot whose position is <= p (and > p - window on sliding layers). Empty
and padding slots hold position -1. This is what lets the sampler append the correction
instruction right after each sequence's own first attempt, whatever its length, in one cache.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from score_jax import ranges, sharding

GLOBAL_WINDOW = 1 << 30  # "no sliding window"
_NEG_INF = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every architecture knob; presets live in configs/models.py."""

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "silu"  # gate activation: silu (SwiGLU) or gelu_tanh (GeGLU)
    norm_eps: float = 1e-6
    norm_plus_one: bool = False  # Gemma: scale = 1 + w, w initialised at 0
    sandwich_norm: bool = False  # Gemma 2/3: extra norms after attention and after the MLP
    rope_theta: float = 10_000.0
    rope_local_theta: float = 0.0  # Gemma 3 sliding layers; 0 = same as rope_theta
    rope_scaling: str = "none"  # none | llama3 | linear (linear applies to global layers only)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_pos: int = 8192
    qkv_bias: bool = False
    qk_norm: bool = False
    query_scale: float = 0.0  # attention scale is query_scale**-0.5; 0 = head_dim
    attn_softcap: float = 0.0  # 0 = off
    final_softcap: float = 0.0
    sliding_window: int = 0  # 0 = every layer global
    layer_pattern: str = "G"  # repeated over layers: L = sliding-window layer, G = global
    tie_embeddings: bool = True
    embed_scale: bool = False  # Gemma: embeddings times sqrt(d_model)
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"  # none | full | dots | dots_no_batch
    scan_layers: bool = True

    def __post_init__(self):
        ranges.check("model", self, vocab_size="[1, inf)", num_layers="[1, inf)", d_model="[1, inf)",
                     num_heads="[1, inf)", num_kv_heads="[1, inf)", head_dim="[1, inf)", mlp_dim="[1, inf)",
                     norm_eps="[0, inf)", rope_theta="(0, inf)", rope_factor="(0, inf)", query_scale="[0, inf)",
                     attn_softcap="[0, inf)", final_softcap="[0, inf)", sliding_window="[0, inf)")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r}; choose one of {', '.join(DTYPES)}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}.")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; choose one of {sorted(_ACTIVATIONS)}.")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}.")
        if self.rope_scaling not in ("none", "llama3", "linear"):
            raise ValueError(f"rope_scaling={self.rope_scaling!r}; choose none, llama3 or linear.")
        if not self.layer_pattern or set(self.layer_pattern) - {"L", "G"}:
            raise ValueError(f"layer_pattern={self.layer_pattern!r} must be a non-empty string of L and G.")
        if "L" in self.layer_pattern and self.sliding_window <= 0:
            raise ValueError("layer_pattern has sliding (L) layers but sliding_window is 0.")

    def layer_is_local(self) -> np.ndarray:
        """[L] bool: which layers use the sliding window."""
        p = self.layer_pattern
        return np.array([p[i % len(p)] == "L" for i in range(self.num_layers)])


DTYPES = ("float32", "bfloat16", "float16")  # compute and parameter dtypes
_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# ----------------------------------------------------------------------------- layers


def _param(rngs: nnx.Rngs, init, shape, axes, stack: tuple[int, ...], dtype) -> nnx.Param:
    lead = ("layers",) * len(stack)
    return nnx.Param(init(rngs.params(), stack + tuple(shape), dtype), axes=lead + tuple(axes))


def _dense_init(fan_in: int):
    return nnx.initializers.normal(stddev=fan_in ** -0.5)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs, stack=()):
        init = nnx.initializers.zeros if cfg.norm_plus_one else nnx.initializers.ones
        self.scale = _param(rngs, init, (dim,), ("norm",), stack, jnp.dtype(cfg.param_dtype))
        self.eps, self.plus_one = cfg.norm_eps, cfg.norm_plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        return (xf * (1.0 + scale if self.plus_one else scale)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack=()):
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.q = _param(rngs, _dense_init(D), (D, N, H), ("embed", "heads", "head_dim"), stack, pd)
        self.k = _param(rngs, _dense_init(D), (D, K, H), ("embed", "kv_heads", "head_dim"), stack, pd)
        self.v = _param(rngs, _dense_init(D), (D, K, H), ("embed", "kv_heads", "head_dim"), stack, pd)
        self.o = _param(rngs, _dense_init(N * H), (N, H, D), ("heads", "head_dim", "embed"), stack, pd)
        if cfg.qkv_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = _param(rngs, zeros, (N, H), ("heads", "head_dim"), stack, pd)
            self.k_bias = _param(rngs, zeros, (K, H), ("kv_heads", "head_dim"), stack, pd)
            self.v_bias = _param(rngs, zeros, (K, H), ("kv_heads", "head_dim"), stack, pd)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H, cfg, rngs, stack)
            self.k_norm = RMSNorm(H, cfg, rngs, stack)
        self.cfg = cfg

    def __call__(self, x, sin, cos, q_pos, window, k_pos):
        """The training forward's attention: the T tokens attend to each other.

        x [B,T,D]; sin/cos [B,T,H/2]; q_pos [B,T]; window scalar int; k_pos [B,T] (q_pos with
        -1 at padding). Returns [B,T,D].
        """
        dt = jnp.dtype(self.cfg.dtype)
        q, k, v = self._project(x, sin, cos)
        B, T, N, H = q.shape
        q = self._grouped(q, k.shape[2])
        # f32 scores even from bf16 operands (as flash attention keeps them): a bf16 score of
        # magnitude ~30 is off by up to 0.06, which moves the softmax noticeably.
        logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        probs = self._probs(logits, q_pos, k_pos, window)
        out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(B, T, N, H)
        return _dense(out, self.o[...].astype(dt), 2)

    def decode(self, x, sin, cos, q_pos, window, chunks, k_pos, write, offset):
        """Attention against a chunked cache (see ``Transformer.decode``).

        x [B,T,D]; chunks: tuple of (k, v), each [B,K,C,H] (C may differ per chunk);
        k_pos: tuple of [B,C], the chunks' positions, this call's already written.
        This call's keys and values go into chunk ``write`` (static) at slot ``offset``.
        Returns ([B,T,D], chunks).
        """
        dt = jnp.dtype(self.cfg.dtype)
        q, k, v = self._project(x, sin, cos)
        chunks = list(chunks)
        ck, cv = chunks[write]
        kv_new = [jnp.swapaxes(a, 1, 2).astype(ck.dtype) for a in (k, v)]  # [B,K,T,H]
        chunks[write] = tuple(sharding.constrain(jax.lax.dynamic_update_slice(c, a, (0, 0, offset, 0)), CHUNK_AXES)
                              for c, a in zip((ck, cv), kv_new))
        B, T, N, H = q.shape
        q = self._grouped(q, k.shape[2])
        # One score matmul per chunk, each reading its own buffer: a slice or concatenation
        # of cache buffers would be a copy on XLA:CPU (4x slower than the matmul itself).
        logits = jnp.concatenate([jnp.einsum("BTKGH,BKCH->BKGTC", q, c[0].astype(dt), preferred_element_type=jnp.float32)
                                  for c in chunks], axis=-1)  # [B,K,G,T,S]
        probs = self._probs(logits, q_pos, jnp.concatenate(k_pos, axis=1), window)
        out, start = 0, 0
        for _, c in chunks:
            C = c.shape[2]
            out = out + jnp.einsum("BKGTC,BKCH->BTKGH", probs[..., start:start + C], c.astype(dt))
            start += C
        out = out.reshape(B, T, N, H)
        return _dense(out, self.o[...].astype(dt), 2), tuple(chunks)

    def _project(self, x, sin, cos):
        """q [B,T,N,H], k and v [B,T,K,H]: projections, biases, qk-norm and RoPE."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        q = _dense(x, self.q[...].astype(dt), 1)  # [B,T,D] x [D,N,H] -> [B,T,N,H]
        k = _dense(x, self.k[...].astype(dt), 1)  # [B,T,K,H]
        v = _dense(x, self.v[...].astype(dt), 1)
        if cfg.qkv_bias:
            q, k, v = q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt), v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rope(q, sin, cos), _rope(k, sin, cos)
        return sharding.constrain(q, ("batch", "length", "act_heads", None)), k, v

    def _grouped(self, q, K):
        """q [B,T,N,H] -> [B,T,K,G,H], the G query heads of each KV head, times the attention scale."""
        B, T, N, H = q.shape
        scale = (self.cfg.query_scale or self.cfg.head_dim) ** -0.5
        return q.reshape(B, T, K, N // K, H) * jnp.asarray(scale, jnp.dtype(self.cfg.dtype))

    def _probs(self, logits, q_pos, k_pos, window):
        """Scores [B,K,G,T,S] f32 -> attention weights [B,K,G,T,S] in the compute dtype: the
        soft-cap, then the position mask (see the module docstring). q_pos [B,T], k_pos [B,S]."""
        cfg = self.cfg
        if cfg.attn_softcap:
            logits = cfg.attn_softcap * jnp.tanh(logits / cfg.attn_softcap)
        qp, kp = q_pos[:, :, None], k_pos[:, None, :]  # [B,T,1], [B,1,S]
        mask = (kp >= 0) & (kp <= qp) & (qp - kp < window)  # [B,T,S]
        return jax.nn.softmax(jnp.where(mask[:, None, None], logits, _NEG_INF), axis=-1).astype(jnp.dtype(cfg.dtype))


def _dense(x, w, n_in: int, out_dtype=None):
    """x [*lead, *in] times w [*in, *out] -> [*lead, *out], with ``n_in`` contracted dims, as
    one 2-D matmul [prod(lead), prod(in)] @ [prod(in), prod(out)]. Same product as the einsum
    (e.g. "BTD,DNH->BTNH"), but XLA:CPU lowers the einsum's weight gradient through a
    transposed copy of the activation gradient that costs as much as the matmul itself (2.5x
    slower MLP forward and backward on the toy model); the reshapes are free on TPU and GPU."""
    lead, ins, outs = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:], w.shape[n_in:]
    k = math.prod(ins)
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
    return y.reshape(*lead, *outs)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack=()):
        D, F, pd = cfg.d_model, cfg.mlp_dim, jnp.dtype(cfg.param_dtype)
        self.gate = _param(rngs, _dense_init(D), (D, F), ("embed", "mlp"), stack, pd)
        self.up = _param(rngs, _dense_init(D), (D, F), ("embed", "mlp"), stack, pd)
        self.down = _param(rngs, _dense_init(F), (F, D), ("mlp", "embed"), stack, pd)
        self.act = cfg.activation
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x):  # [B,T,D] -> [B,T,D]
        dt = self.dtype
        g = _dense(x, self.gate[...].astype(dt), 1)  # [B,T,F]
        u = _dense(x, self.up[...].astype(dt), 1)
        h = sharding.constrain(_ACTIVATIONS[self.act](g) * u, ("batch", "length", "act_mlp"))
        return _dense(h, self.down[...].astype(dt), 1)


class Block(nnx.Module):
    """One pre-norm decoder layer; built with ``stack=(L,)`` it holds all L layers' weights."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack=()):
        D = cfg.d_model
        self.attn_norm = RMSNorm(D, cfg, rngs, stack)
        self.attn = Attention(cfg, rngs, stack)
        self.mlp_norm = RMSNorm(D, cfg, rngs, stack)
        self.mlp = MLP(cfg, rngs, stack)
        if cfg.sandwich_norm:
            self.post_attn_norm = RMSNorm(D, cfg, rngs, stack)
            self.post_mlp_norm = RMSNorm(D, cfg, rngs, stack)
        self.sandwich = cfg.sandwich_norm

    def __call__(self, x, sin, cos, q_pos, window, k_pos):
        return self._residual(x, self.attn(self.attn_norm(x), sin, cos, q_pos, window, k_pos))

    def decode(self, x, sin, cos, q_pos, window, chunks, k_pos, write, offset):
        h, chunks = self.attn.decode(self.attn_norm(x), sin, cos, q_pos, window, chunks, k_pos, write, offset)
        return self._residual(x, h), chunks

    def _residual(self, x, h):
        """x + attention output h, then the MLP sub-layer."""
        if self.sandwich:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.sandwich:
            h = self.post_mlp_norm(h)
        return sharding.constrain(x + h, ("batch", "length", "act_embed"))


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: ModelConfig, local: bool) -> np.ndarray:
    """[H/2] inverse frequencies, with Llama 3 or linear scaling where the config asks."""
    theta = cfg.rope_local_theta if (local and cfg.rope_local_theta) else cfg.rope_theta
    inv = 1.0 / theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    if cfg.rope_scaling == "linear" and not local:
        inv = inv / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        low_wavelen = cfg.rope_original_max_pos / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_pos / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (cfg.rope_original_max_pos / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        mid = (1 - smooth) * inv / cfg.rope_factor + smooth * inv
        inv = np.where(wavelen > low_wavelen, inv / cfg.rope_factor, np.where(wavelen < high_wavelen, inv, mid))
    return inv.astype(np.float32)


def _sin_cos(positions: jax.Array, inv_freq: np.ndarray):
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B,T,H/2]
    return jnp.sin(angles), jnp.cos(angles)


def _rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates halves of the head dim (the Hugging Face layout). x [B,T,*,H]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    s, c = sin[:, :, None, :], cos[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------- model


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        V, D, pd = cfg.vocab_size, cfg.d_model, jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Param(nnx.initializers.normal(stddev=D ** -0.5)(rngs.params(), (V, D), pd),
                               axes=("vocab", "embed"))
        self.blocks = Block(cfg, rngs, stack=(cfg.num_layers,))
        self.final_norm = RMSNorm(D, cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(_dense_init(D)(rngs.params(), (D, V), pd), axes=("embed", "vocab"))
        self.cfg = cfg

    def __call__(self, tokens, positions, valid=None):
        """Logits [B,T,V] (float32) for tokens [B,T] at positions [B,T], and None.

        valid [B,T] bool marks real tokens (default all); padding is never attended to.
        The second value is always None (no cache on this path; ``decode`` has one): the
        callers in learner.py and the tests still unpack a pair.
        """
        x, _ = self.hidden(tokens, positions, valid)
        return self.unembed(x), None

    def unembed(self, x):
        """Final hidden states [B,T,D] (from ``hidden``) -> logits [B,T,V] float32."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        # f32 output straight from the matmul: log-probs (policy ratios, KL) keep f32 precision.
        logits = _dense(x, head.astype(dt), 1, jnp.float32)  # [B,T,V]
        if cfg.final_softcap:
            logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
        return sharding.constrain(logits, ("batch", "length", "act_vocab"))

    def hidden(self, tokens, positions, valid=None):
        """Like ``__call__`` but stops before the vocabulary projection: returns the final
        normed hidden states [B,T,D] (compute dtype) and None. Losses over large
        vocabularies project chunk by chunk from here instead of materialising [B,T,V]."""
        cfg = self.cfg
        if valid is None:
            valid = jnp.ones(tokens.shape, bool)
        k_pos = jnp.where(valid, positions, -1).astype(jnp.int32)  # [B,T]
        x = self._embed(tokens)
        local = jnp.asarray(cfg.layer_is_local())
        windows = jnp.where(local, cfg.sliding_window, GLOBAL_WINDOW)
        sc_global = _sin_cos(positions, rope_inv_freq(cfg, local=False))
        sc_local = _sin_cos(positions, rope_inv_freq(cfg, local=True))

        graphdef, layer_state = nnx.split(self.blocks)

        def layer(x, xs):
            state, is_local, window = xs
            sin = jnp.where(is_local, sc_local[0], sc_global[0])
            cos = jnp.where(is_local, sc_local[1], sc_global[1])
            return nnx.merge(graphdef, state)(x, sin, cos, positions, window, k_pos), None

        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=not cfg.scan_layers)
        xs = (layer_state, local, windows)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(layer, x, xs)
        else:
            for i in range(cfg.num_layers):
                x, _ = layer(x, jax.tree.map(lambda a: a[i], xs))
        return self.final_norm(x), None

    def _embed(self, tokens):
        """tokens [B,T] -> embeddings [B,T,D] in the compute dtype."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)  # [B,T,D]
        if cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)
        return sharding.constrain(x, ("batch", "length", "act_embed"))

    def decode(self, tokens, positions, valid, cache, layers, write, offset):
        """``hidden`` against a chunked KV cache, layers unrolled; the sampler's fast path.

        tokens, positions, valid [B,T]. cache: {"k", "v": one tuple per layer of one [B,K,C,H]
        array per chunk; "pos": one [B,C] array per chunk (-1 = empty)}, every chunk a buffer
        of its own (attention reads each in place). This call's T tokens are written into
        chunk ``write`` (a static index) at slot ``offset`` and attend to every chunk given.
        ``layers`` is ``split_layers(cfg, params)``. Returns (hidden [B,T,D], cache).

        Why a path of its own, not a cache inside ``hidden``: on XLA:CPU both scanning the
        layers (the cache as scan xs/ys) and slicing a stacked cache or stacked weights copy
        them at every step, and a [B,S,K,H] cache is transposed before each attention matmul;
        here nothing is copied.
        """
        cfg = self.cfg
        x = self._embed(tokens)
        k_pos = list(cache["pos"])
        new_pos = jnp.where(valid, positions, -1).astype(jnp.int32)
        k_pos[write] = jax.lax.dynamic_update_slice(k_pos[write], new_pos, (0, offset))
        sin_cos = {local: _sin_cos(positions, rope_inv_freq(cfg, local)) for local in (False, True)}
        graphdef = nnx.graphdef(self.blocks)
        new_k, new_v = [], []
        for i, local in enumerate(cfg.layer_is_local()):
            local = bool(local)
            window = cfg.sliding_window if local else GLOBAL_WINDOW
            x, chunks = nnx.merge(graphdef, layers[i]).decode(
                x, *sin_cos[local], positions, window, tuple(zip(cache["k"][i], cache["v"][i])), k_pos, write, offset)
            new_k.append(tuple(c[0] for c in chunks))
            new_v.append(tuple(c[1] for c in chunks))
        return self.final_norm(x), {"k": tuple(new_k), "v": tuple(new_v), "pos": tuple(k_pos)}


# ----------------------------------------------------------------------------- functional API


@functools.lru_cache(maxsize=None)
def _skeleton(cfg: ModelConfig):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, state


def param_shapes(cfg: ModelConfig) -> dict:
    """Nested dict of jax.ShapeDtypeStruct; nothing is allocated."""
    return nnx.to_pure_dict(_skeleton(cfg)[1])


def param_axes(cfg: ModelConfig) -> dict:
    """Nested dict of logical axis-name tuples, matching ``param_shapes``."""
    flat = {path: var.get_metadata()["axes"] for path, var in nnx.to_flat_state(_skeleton(cfg)[1])}
    return nnx.traversals.unflatten_mapping(flat)


def num_params(cfg: ModelConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(cfg)))


def param_shardings(cfg: ModelConfig, mesh) -> dict:
    return sharding.tree_shardings(mesh, param_axes(cfg), param_shapes(cfg))


def init_params(cfg: ModelConfig, key: jax.Array, mesh=None) -> dict:
    """Random parameters as a nested dict, created already sharded over ``mesh``."""
    def make(key):
        return nnx.to_pure_dict(nnx.state(Transformer(cfg, nnx.Rngs(params=key)), nnx.Param))
    out = None if mesh is None else param_shardings(cfg, mesh)
    return jax.jit(make, out_shardings=out)(key)


def bind(cfg: ModelConfig, params: dict) -> Transformer:
    """The NNX module holding ``params`` (no copy); callable inside or outside jit."""
    graphdef, abstract = _skeleton(cfg)
    state = jax.tree.map(lambda v: v, abstract)  # fresh State; _skeleton's stays abstract
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def forward(cfg: ModelConfig, params: dict, tokens, positions, valid=None):
    """Functional call: see ``Transformer.__call__``; returns (logits [B,T,V], None)."""
    return bind(cfg, params)(tokens, positions, valid)


def split_layers(cfg: ModelConfig, params: dict) -> tuple:
    """One parameter state per layer, for ``Transformer.decode``. Slice once, outside a decode loop:
    this holds a second copy of the layer weights while it lives."""
    state = nnx.state(bind(cfg, params).blocks)
    return tuple(jax.tree.map(lambda a: a[i], state) for i in range(cfg.num_layers))


# One chunk of a chunked cache (``Transformer.decode``): k or v [B,K,C,H]; its positions [B,C].
CHUNK_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "head_dim")
CHUNK_POS_AXES = ("cache_batch", "cache_length")
