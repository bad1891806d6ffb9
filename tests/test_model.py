"""score_jax.model: cached decoding, scan/remat/dtype equivalences, and a from-scratch reference.

Cached decoding goes through ``Transformer.decode`` (the sampler's path) by way of
tests/contiguous_cache.py, which keeps the cache as one buffer with a write index.

Every architecture knob the presets use gets a tiny config here (a few layers, d_model 32-64,
sequences of 12-18 tokens, sliding windows of 4), so each check compiles in about a second.
Parameters are drawn on the host (``random_params``) rather than by ``init_params``, whose RNG
program is slow to compile on CPU; tests/test_sharding.py covers ``init_params`` itself.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import contiguous_cache
from numerics import assert_close_f32, decoder_terms, grad_terms
from score_jax import model

# Tiny stand-ins for each preset family: same knobs, toy sizes. Softcaps are small so tanh
# actually bends the logits; rope_original_max_pos=32 puts the Llama 3 high / medium / low
# frequency bands all inside head_dim=16.
_BASE = dict(vocab_size=97, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=64)
_GEMMA = dict(activation="gelu_tanh", norm_plus_one=True, sandwich_norm=True, embed_scale=True,
              query_scale=24.0)
KNOBS = {
    "llama3": dict(norm_eps=1e-5, rope_theta=10_000.0, rope_scaling="llama3", rope_factor=32.0,
                   rope_original_max_pos=32, tie_embeddings=False),
    "qwen2.5": dict(rope_theta=1_000_000.0, qkv_bias=True),
    "qwen3": dict(rope_theta=1_000_000.0, qk_norm=True),
    "mqa": dict(num_kv_heads=1),
    "gemma2": dict(_GEMMA, num_layers=3, attn_softcap=5.0, final_softcap=3.0, sliding_window=4,
                   layer_pattern="LG"),
    "gemma3": dict(_GEMMA, num_layers=7, qk_norm=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
                   rope_scaling="linear", rope_factor=8.0, sliding_window=4, layer_pattern="LLLLLG"),
    "gemma2-unrolled": dict(_GEMMA, num_layers=3, attn_softcap=5.0, final_softcap=3.0, sliding_window=4,
                            layer_pattern="LG", scan_layers=False),
}


# XLA:CPU spends most of a tiny model's compile time in LLVM optimisation and its fusion
# emitters; with both off it compiles about 4x faster and gives the same numbers up to float
# rounding. The tests are compile-bound, so every jit here uses these options.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def jit(fn, **kw):
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kw)


_forward = jit(model.forward, static_argnums=0)
_cached_forward = jit(contiguous_cache.cached_forward, static_argnums=0)


def make_cfg(name: str, **overrides) -> model.ModelConfig:
    return model.ModelConfig(**{**_BASE, **KNOBS[name], **overrides})


def random_params(cfg: model.ModelConfig, seed: int = 0) -> dict:
    """Random host (numpy) parameters shaped like ``model.param_shapes``; no compile needed.

    Weights are N(0, 1/fan_in); norm scales and biases are moved off their 0/1 init so they
    are tested too.
    """
    rng = np.random.default_rng(seed)
    fan_in = {"o": cfg.num_heads * cfg.head_dim, "down": cfg.mlp_dim}

    def draw(path, shape):
        name = path[-1].key
        x = rng.standard_normal(shape.shape).astype(np.float32)
        if name == "scale":
            return 0.3 * x + (0.0 if cfg.norm_plus_one else 1.0)
        if name.endswith("bias"):
            return 0.3 * x
        return x * fan_in.get(name, cfg.d_model) ** -0.5

    return jax.tree_util.tree_map_with_path(draw, model.param_shapes(cfg))


def full_logits(cfg, params, tokens: np.ndarray) -> np.ndarray:
    """[T,V] logits of one unpadded sequence [T] at positions 0..T-1."""
    T = len(tokens)
    logits, _ = _forward(cfg, params, np.asarray(tokens)[None], np.arange(T)[None])
    return np.asarray(logits[0])


def next_token_loss(cfg, params, tokens):
    logits, _ = model.forward(cfg, params, tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def assert_trees_close_f32(got, want, terms):
    """Leaf by leaf, each against its own scale (a norm's gradient is not an embedding's)."""
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert_close_f32(g, w, terms, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- cached decoding


@pytest.mark.parametrize("name", sorted(KNOBS))
def test_cached_decoding_matches_full_forward(name):
    """Ragged right-padded prefill, then one token per step at each row's own next position,
    gives the logits of a plain forward over each row's unpadded sequence."""
    cfg = make_cfg(name)
    params = random_params(cfg)
    rng = np.random.default_rng(0)
    lengths, steps = np.array([9, 14]), 4  # both longer than the window of 4
    B, width = len(lengths), lengths.max()
    seqs = [rng.integers(0, cfg.vocab_size, n + steps) for n in lengths]  # each row's real tokens
    prompt = rng.integers(0, cfg.vocab_size, (B, width))  # the padding holds junk on purpose
    for b, n in enumerate(lengths):
        prompt[b, :n] = seqs[b][:n]
    valid = np.arange(width)[None] < lengths[:, None]
    cache = contiguous_cache.init_cache(cfg, B, width + steps + 3)  # 3 slots stay empty (pos -1)

    prefill, cache = _cached_forward(cfg, params, prompt, np.broadcast_to(np.arange(width), (B, width)), valid, cache)
    decoded = []  # [steps] of [B,V]
    for s in range(steps):
        tok = np.array([[seqs[b][n + s]] for b, n in enumerate(lengths)])
        out, cache = _cached_forward(cfg, params, tok, lengths[:, None] + s, None, cache)
        decoded.append(np.asarray(out[:, 0]))
    assert int(cache["index"]) == width + steps

    # The cache path (prefill, then one token at a time) sums attention over other key sets
    # and in another order than the full forward: float32 rounding through every layer.
    terms = decoder_terms(cfg, width + steps + 3)
    for b, n in enumerate(lengths):
        want = full_logits(cfg, params, seqs[b])  # [n + steps, V]
        scale = np.abs(want).max()
        assert_close_f32(prefill[b, :n], want[:n], terms, magnitude=scale, err_msg=f"prefill row {b}")
        assert_close_f32(np.stack([d[b] for d in decoded]), want[n:], terms, magnitude=scale, err_msg=f"decode row {b}")


def test_cache_layout():
    cfg = make_cfg("mqa")
    cache = contiguous_cache.init_cache(cfg, batch=3, length=10)
    assert cache["k"].shape == cache["v"].shape == (cfg.num_layers, 3, 10, 1, cfg.head_dim)
    assert cache["pos"].shape == (3, 10) and np.all(np.asarray(cache["pos"]) == -1)
    assert int(cache["index"]) == 0
    assert set(contiguous_cache.CACHE_AXES) == set(cache)
    for k, v in cache.items():
        assert len(contiguous_cache.CACHE_AXES[k]) == v.ndim


# ----------------------------------------------------------------------------- equivalences


# One gemma2-style model and batch for the equivalence tests, so they share compiled functions.
_EQ_CFG = make_cfg("gemma2")
_EQ_TOKENS = np.random.default_rng(3).integers(0, _EQ_CFG.vocab_size, (2, 12))
_EQ_POS = np.broadcast_to(np.arange(12), (2, 12))
_value_and_grad = jit(jax.value_and_grad(next_token_loss, argnums=1), static_argnums=0)


def test_scan_and_unrolled_agree():
    params = random_params(_EQ_CFG)
    results = []
    for scan in (True, False):
        c = dataclasses.replace(_EQ_CFG, scan_layers=scan)
        results.append((_forward(c, params, _EQ_TOKENS, _EQ_POS)[0], _value_and_grad(c, params, _EQ_TOKENS)))
    # Two programs (a scan body vs inlined layers) that XLA fuses and orders differently.
    (logits, (loss, grads)), (logits_u, (loss_u, grads_u)) = results
    assert_close_f32(logits_u, logits, decoder_terms(_EQ_CFG, 12), err_msg="logits")
    assert_close_f32(loss_u, loss, decoder_terms(_EQ_CFG, 12) + _EQ_CFG.vocab_size + _EQ_TOKENS.size, err_msg="loss")
    assert_trees_close_f32(grads_u, grads, grad_terms(_EQ_CFG, 12, _EQ_TOKENS.size))


@pytest.mark.parametrize("scan,policies", [(True, ("full", "dots", "dots_no_batch")), (False, ("full",))],
                         ids=["scan", "unrolled"])
def test_remat_policies_give_the_same_gradients(scan, policies):
    cfg = dataclasses.replace(_EQ_CFG, scan_layers=scan)
    params = random_params(cfg)
    want = _value_and_grad(cfg, params, _EQ_TOKENS)
    for policy in policies:
        got = _value_and_grad(dataclasses.replace(cfg, remat=policy), params, _EQ_TOKENS)
        # Recomputing the forward in the backward pass is another program (other fusions).
        assert_close_f32(got[0], want[0], decoder_terms(cfg, 12) + cfg.vocab_size + _EQ_TOKENS.size, err_msg="loss")
        assert_trees_close_f32(got[1], want[1], grad_terms(cfg, 12, _EQ_TOKENS.size))


def test_bf16_compute_with_f32_params_is_close():
    cfg16 = dataclasses.replace(_EQ_CFG, dtype="bfloat16")
    params = random_params(_EQ_CFG)
    want, got = _forward(_EQ_CFG, params, _EQ_TOKENS, _EQ_POS)[0], _forward(cfg16, params, _EQ_TOKENS, _EQ_POS)[0]
    assert got.dtype == jnp.float32  # logits always come out in f32
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, atol=0.1)
    assert np.abs(np.asarray(got - want)).mean() < 0.02
    # The bf16 cache path runs too (the cache is bf16).
    cache = contiguous_cache.init_cache(cfg16, 2, 14)
    assert cache["k"].dtype == jnp.bfloat16
    out, cache = _cached_forward(cfg16, params, _EQ_TOKENS, _EQ_POS, None, cache)
    np.testing.assert_allclose(out, got, atol=0.1)
    # Gradients come back in the f32 parameter dtype and point the same way as in f32.
    (loss16, g16), (loss, g) = _value_and_grad(cfg16, params, _EQ_TOKENS), _value_and_grad(_EQ_CFG, params, _EQ_TOKENS)
    np.testing.assert_allclose(loss16, loss, rtol=1e-2)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g)):
        a, b = np.ravel(a), np.ravel(b)
        assert a.dtype == np.float32 and np.isfinite(a).all()
        assert a @ b > 0.99 * np.linalg.norm(a) * np.linalg.norm(b)


# ----------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("pattern,layers", [("L", 1), ("L", 2), ("G", 2)])
def test_sliding_window_reach(pattern, layers):
    """With window w, token j reaches position p of a local-only model iff 0 <= p - j <= layers*(w-1)
    (one layer sees exactly w tokens: itself and w-1 back); global layers reach everything after j."""
    w, T, j = 4, 16, 2
    cfg = make_cfg("llama3", num_layers=layers, sliding_window=w, layer_pattern=pattern)
    params = random_params(cfg)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, T)
    perturbed = tokens.copy()
    perturbed[j] = (tokens[j] + 1) % cfg.vocab_size
    diff = np.abs(full_logits(cfg, params, tokens) - full_logits(cfg, params, perturbed)).max(-1)  # [T]
    reach = j + layers * (w - 1)
    assert np.all(diff[:j] == 0)
    assert np.all(diff[j:reach + 1] > 1e-4)  # up to and including the last position in reach
    if pattern == "L":
        assert np.all(diff[reach + 1:] == 0)  # masked keys contribute exactly nothing
    else:
        assert np.all(diff[reach + 1:] > 1e-4)


# ----------------------------------------------------------------------------- RoPE


def _llama3_scale_reference(freqs, factor, low, high, old_len):
    """Meta's apply_scaling (llama-models), one frequency at a time."""
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            out.append(f)
        elif wavelen > old_len / low:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


def test_rope_inverse_frequencies():
    from configs import models
    cfg = model.ModelConfig(**models.get("llama3.1-8b").to_dict())
    base = 1.0 / 500_000.0 ** (np.arange(0, 128, 2) / 128)
    want = _llama3_scale_reference(base, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(model.rope_inv_freq(cfg, local=False), want, rtol=1e-6)
    assert (want == base).any() and (want == base / 8).any()  # both outer bands are exercised
    assert ((want != base) & (want != base / 8)).any()  # and the smoothed middle band

    g3 = model.ModelConfig(**models.get("gemma3-4b").to_dict())
    np.testing.assert_allclose(model.rope_inv_freq(g3, local=False),
                               1.0 / 1e6 ** (np.arange(0, 256, 2) / 256) / 8.0, rtol=1e-6)
    np.testing.assert_allclose(model.rope_inv_freq(g3, local=True),  # local layers: theta 1e4, unscaled
                               1.0 / 1e4 ** (np.arange(0, 256, 2) / 256), rtol=1e-6)


# ----------------------------------------------------------------------------- from-scratch reference


def _ref_forward(cfg: model.ModelConfig, p: dict, tokens: np.ndarray) -> np.ndarray:
    """float64 numpy decoder written from the Hugging Face modeling files; logits [T,V]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    T, D, N, K, H = len(tokens), cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def norm(x, w):
        x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps)
        return x * (1.0 + w if cfg.norm_plus_one else w)

    def rotate(x, inv):  # x [T, heads, H], rotate-half layout
        ang = np.arange(T)[:, None] * inv[None]  # [T, H/2]
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        x1, x2 = x[..., :H // 2], x[..., H // 2:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)

    def act(g):
        if cfg.activation == "silu":
            return g / (1 + np.exp(-g))
        return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))

    x = p["embed"][tokens]
    if cfg.embed_scale:
        x = x * math.sqrt(D)
    for l in range(cfg.num_layers):
        b = jax.tree.map(lambda a: a[l], p["blocks"])
        local = cfg.layer_pattern[l % len(cfg.layer_pattern)] == "L"
        h = norm(x, b["attn_norm"]["scale"])
        q = (h @ b["attn"]["q"].reshape(D, N * H)).reshape(T, N, H)
        k = (h @ b["attn"]["k"].reshape(D, K * H)).reshape(T, K, H)
        v = (h @ b["attn"]["v"].reshape(D, K * H)).reshape(T, K, H)
        if cfg.qkv_bias:
            q, k, v = q + b["attn"]["q_bias"], k + b["attn"]["k_bias"], v + b["attn"]["v_bias"]
        if cfg.qk_norm:
            q, k = norm(q, b["attn"]["q_norm"]["scale"]), norm(k, b["attn"]["k_norm"]["scale"])
        theta = cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta
        inv = 1.0 / theta ** (np.arange(0, H, 2) / H)
        if cfg.rope_scaling == "llama3":
            inv = _llama3_scale_reference(inv, cfg.rope_factor, cfg.rope_low_freq_factor,
                                          cfg.rope_high_freq_factor, cfg.rope_original_max_pos)
        elif cfg.rope_scaling == "linear" and not local:
            inv = inv / cfg.rope_factor
        q, k = rotate(q, inv), rotate(k, inv)
        heads = []
        for n in range(N):
            kv = n // (N // K)
            s = q[:, n] @ k[:, kv].T * (cfg.query_scale or H) ** -0.5  # [T, T]
            if cfg.attn_softcap:
                s = cfg.attn_softcap * np.tanh(s / cfg.attn_softcap)
            i, j = np.arange(T)[:, None], np.arange(T)[None]
            allowed = (j <= i) & ((i - j < cfg.sliding_window) if local else True)
            s = np.where(allowed, s, -np.inf)
            e = np.exp(s - s.max(-1, keepdims=True))
            heads.append((e / e.sum(-1, keepdims=True)) @ v[:, kv])
        attn = np.concatenate(heads, axis=-1) @ b["attn"]["o"].reshape(N * H, D)
        if cfg.sandwich_norm:
            attn = norm(attn, b["post_attn_norm"]["scale"])
        x = x + attn
        h = norm(x, b["mlp_norm"]["scale"])
        m = (act(h @ b["mlp"]["gate"]) * (h @ b["mlp"]["up"])) @ b["mlp"]["down"]
        if cfg.sandwich_norm:
            m = norm(m, b["post_mlp_norm"]["scale"])
        x = x + m
    x = norm(x, p["final_norm"]["scale"])
    logits = x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"])
    if cfg.final_softcap:
        logits = cfg.final_softcap * np.tanh(logits / cfg.final_softcap)
    return logits


@pytest.mark.parametrize("name,overrides", [
    ("llama3", dict(qkv_bias=True)),  # GQA, llama3 rope (all three bands), untied head, biases
    ("gemma2", dict(layer_pattern="LGG", query_scale=20.0)),
    ("gemma3", dict()),
])
def test_matches_numpy_reference(name, overrides):
    cfg = make_cfg(name, **overrides)
    params = random_params(cfg)
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, 14)
    # float32 against float64: our side's rounding alone.
    assert_close_f32(full_logits(cfg, params, tokens), _ref_forward(cfg, params, tokens), decoder_terms(cfg, 14))


def test_padding_and_position_offsets():
    """Left padding with shifted positions gives the logits of the unpadded sequence."""
    cfg = make_cfg("gemma2")
    params = random_params(cfg)
    tokens = np.random.default_rng(9).integers(0, cfg.vocab_size, 10)
    want = full_logits(cfg, params, tokens)
    padded = np.concatenate([np.full(3, 5), tokens])[None]
    pos = np.concatenate([np.zeros(3, int), np.arange(10)])[None]
    valid = np.arange(13)[None] >= 3
    got = _forward(cfg, params, padded, pos, valid)[0]
    # Another shape (13 keys, 3 of them masked), so other blocking of the same sums.
    assert_close_f32(got[0, 3:], want, decoder_terms(cfg, 13))


def test_config_errors():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        make_cfg("llama3", num_kv_heads=3)
    with pytest.raises(ValueError, match="sliding_window is 0"):
        make_cfg("llama3", layer_pattern="LG")
    with pytest.raises(ValueError, match="remat"):
        make_cfg("llama3", remat="some")
