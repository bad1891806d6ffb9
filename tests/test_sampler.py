"""score_jax.sampler against a slow reference that runs the full forward for every new token.

Tiny models (vocabulary 48-64, two or three layers) so each sampler program compiles in a few
seconds; every jit here uses FAST_COMPILE (see tests/test_model.py).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import agreeing_prefix, assert_close_f32, decoder_terms, f32_tol, logprob_scale, top2_margin
from score_jax import model, sampler, sharding

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

_BASE = dict(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
             scan_layers=False)
CFGS = {
    "llama": model.ModelConfig(**_BASE, tie_embeddings=False, qkv_bias=True),
    # Sliding window shorter than a turn, softcaps, sandwich norms, qk-norm, local RoPE theta.
    "gemma": model.ModelConfig(**dict(_BASE, num_layers=3), activation="gelu_tanh", norm_plus_one=True,
                               sandwich_norm=True, embed_scale=True, qk_norm=True, attn_softcap=5.0,
                               final_softcap=8.0, sliding_window=4, layer_pattern="LLG", rope_local_theta=100.0),
}


def host_params(cfg, seed=0, scale=1.0):
    """N(0, scale^2/fan_in) weights (no compile); larger scale = peakier next-token distributions."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        x = rng.standard_normal(s.shape).astype(np.float32)
        if name == "scale":
            return 0.2 * x + (0.0 if cfg.norm_plus_one else 1.0)
        if name.endswith("bias"):
            return 0.2 * x
        fan_in = {"o": cfg.num_heads * cfg.head_dim, "down": cfg.mlp_dim}.get(name, cfg.d_model)
        return x * scale * fan_in ** -0.5

    return jax.tree_util.tree_map_with_path(draw, model.param_shapes(cfg))


def one_device():
    return sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])


@functools.lru_cache(maxsize=None)
def get_sampler(cfg, scfg, mesh_shape=None, batch=4):
    mesh = one_device() if mesh_shape is None else sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
    return sampler.Sampler(cfg, scfg, mesh, batch, compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _full_forward(cfg):
    return jax.jit(lambda p, tokens, valid: model.forward(
        cfg, p, tokens, jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), valid)[0],
        compiler_options=FAST_COMPILE)


def full_logits(cfg, params, tokens, valid):
    return np.asarray(_full_forward(cfg)(params, np.asarray(tokens, np.int32), np.asarray(valid)))


def reference_greedy(cfg, params, scfg, prompts, lens, instruction):
    """Greedy episodes, one full forward over every row's whole sequence per new token.

    Returns per turn (tokens [R,N], logprobs [R,N], lengths [R], truncated [R]), the packed
    sequences [R,T], their lengths, the number of decode steps of each turn, and over every
    greedy choice: the smallest top-2 logit margin, the largest |logit| and ``logprob_scale``."""
    k, N, T = scfg.samples_per_prompt, scfg.max_new_tokens, scfg.episode_len()
    seqs = np.zeros((len(lens) * k, T), np.int64)
    cur = np.repeat(lens, k)
    for r in range(len(seqs)):
        seqs[r, :cur[r]] = prompts[r // k, :cur[r]]
    turns, steps = [], []
    choices = dict(margin=np.inf, logits=0.0, logprobs=0.0)
    for t in range(scfg.num_turns):
        R = len(seqs)
        toks, lps = np.full((R, N), scfg.pad_id), np.zeros((R, N))
        active, n = np.ones(R, bool), np.zeros(R, int)
        s = 0
        while s < N and active.any():
            logits = full_logits(cfg, params, seqs, np.arange(T)[None] < cur[:, None])[np.arange(R), cur - 1]
            logp = jax.nn.log_softmax(logits.astype(np.float64))
            chosen = logits[active]
            choices = dict(margin=min(choices["margin"], top2_margin(chosen).min()),
                           logits=max(choices["logits"], np.abs(chosen).max()),
                           logprobs=max(choices["logprobs"], logprob_scale(chosen)))
            for r in np.flatnonzero(active):
                tok = int(np.argmax(logits[r]))
                toks[r, s], lps[r, s] = tok, logp[r, tok]
                seqs[r, cur[r]] = tok
                cur[r] += 1
                n[r] += 1
                if tok in scfg.stop_token_ids:
                    active[r] = False
            s += 1
        turns.append((toks, lps, n, active.copy()))
        steps.append(s)
        if t < scfg.num_turns - 1:
            for r in range(R):
                seqs[r, cur[r]:cur[r] + len(instruction)] = instruction
            cur = cur + len(instruction)
    return turns, seqs, cur, steps, choices


def ragged_prompts(cfg, scfg, lens, seed=1):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(0, cfg.vocab_size, (len(lens), scfg.max_prompt_len))  # junk in the padding too
    instruction = rng.integers(0, cfg.vocab_size, scfg.instruction_len)
    return prompts, np.asarray(lens), instruction


# ----------------------------------------------------------------------------- greedy = reference


def _stop_ids_for(cfg, params, base, prompts, lens, instruction):
    """Two stop tokens under which the prompts' first turns end at the most different steps
    (one of them not at all), judged on the greedy turn 0 without stop tokens."""
    turns, *_ = reference_greedy(cfg, params, base, prompts, lens, instruction)
    toks = turns[0][0][::base.samples_per_prompt]  # [B,N]: one row per prompt
    N = base.max_new_tokens

    def lengths(stop):
        hit = np.isin(toks, stop)
        return np.where(hit.any(1), hit.argmax(1) + 1, N)

    pairs = [(a, b) for a in np.unique(toks) for b in np.unique(toks) if a < b]
    best = max(pairs, key=lambda p: (N in lengths(p), len(set(lengths(p))), -sum(p)))
    return tuple(int(t) for t in best)


@pytest.mark.parametrize("name", sorted(CFGS))
def test_greedy_matches_full_forward_reference(name):
    cfg = CFGS[name]
    params = host_params(cfg, scale=2.0)
    base = sampler.SamplerConfig(max_prompt_len=7, max_new_tokens=6, instruction_len=3, num_turns=3,
                                 temperature=0.0, samples_per_prompt=2, chunk_len=4, pad_id=0)
    prompts, lens, instruction = ragged_prompts(cfg, base, [7, 2, 5, 4])
    scfg = dataclasses.replace(base, stop_token_ids=_stop_ids_for(cfg, params, base, prompts, lens, instruction))
    want, seqs, ends, want_steps, choices = reference_greedy(cfg, params, scfg, prompts, lens, instruction)
    # The sampler (chunked KV cache, one token at a time) and the reference (a full forward per
    # token) round differently. Their greedy choices can differ only where the top two logits
    # are within twice the logit tolerance; with these seeded weights (scale 2) every choice is
    # far clearer than that, so tokens, lengths and steps must be equal exactly.
    terms = decoder_terms(cfg, scfg.episode_len())
    assert choices["margin"] > 2 * f32_tol(choices["logits"], terms), choices
    lp_terms, lp_scale = terms + cfg.vocab_size, choices["logprobs"]

    out = jax.device_get(get_sampler(cfg, scfg)(params, prompts, lens, instruction, jax.random.key(0)))
    lengths = np.stack([t["lengths"] for t in out["turns"]])
    assert (lengths < scfg.max_new_tokens).any() and (lengths == scfg.max_new_tokens).any()  # stops and limits
    assert len(set(lengths.ravel())) > 2  # rows stop at different steps
    for t, (toks, lps, n, trunc) in enumerate(want):
        got = out["turns"][t]
        np.testing.assert_array_equal(got["tokens"], toks, err_msg=f"turn {t}")
        np.testing.assert_array_equal(got["lengths"], n)
        np.testing.assert_array_equal(got["truncated"], trunc)
        np.testing.assert_array_equal(got["mask"], np.arange(scfg.max_new_tokens)[None] < n[:, None])
        assert_close_f32(got["logprobs"], lps, lp_terms, magnitude=lp_scale, err_msg=f"turn {t}")
    np.testing.assert_array_equal(out["steps"], want_steps)
    np.testing.assert_array_equal(out["prompt_lens"], np.repeat(lens, 2))

    packed = jax.device_get(sampler.pack_episodes(scfg, out, prompts, instruction))
    valid = np.arange(scfg.episode_len())[None] < ends[:, None]
    np.testing.assert_array_equal(packed["valid"], valid)
    np.testing.assert_array_equal(np.where(valid, packed["tokens"], 0), np.where(valid, seqs, 0))
    # Re-scoring the packed episodes (what the learner does) gives the sampler's log-probs.
    logp = jax.nn.log_softmax(full_logits(cfg, params, packed["tokens"], packed["valid"]))
    target_lp = np.take_along_axis(np.asarray(logp[:, :-1]), packed["tokens"][:, 1:, None], -1)[..., 0]
    for t, turn in enumerate(out["turns"]):
        assert_close_f32(target_lp[turn_positions(packed, t + 1)[:, 1:]], turn["logprobs"][turn["mask"]],
                         lp_terms, magnitude=lp_scale, err_msg=f"rescored turn {t}")
        for key, field in (("start", "start"), ("mask", "mask"), ("logp", "logprobs"), ("truncated", "truncated")):
            name = f"{key}{t + 1}_sampler" if key == "logp" else f"{key}{t + 1}"
            np.testing.assert_array_equal(packed[name], turn[field], err_msg=name)


def turn_positions(packed, t):
    """[R,T] bool: the positions of turn t's tokens (1-based t) in packed episodes."""
    start, mask = packed[f"start{t}"], packed[f"mask{t}"]
    T = packed["tokens"].shape[1]
    on = np.zeros((len(start), T), bool)
    for r in range(len(start)):
        on[r, start[r] + np.flatnonzero(mask[r])] = True
    return on


def test_early_exit_and_no_recompilation():
    """Every token a stop token: each turn runs one step. New data, same program."""
    cfg = CFGS["llama"]
    scfg = sampler.SamplerConfig(max_prompt_len=7, max_new_tokens=6, instruction_len=3, num_turns=2,
                                 temperature=1.0, stop_token_ids=tuple(range(cfg.vocab_size)), chunk_len=3)
    s = get_sampler(cfg, scfg)
    params = host_params(cfg)
    prompts, lens, instruction = ragged_prompts(cfg, scfg, [3, 7, 1, 2])
    out = s(params, prompts, lens, instruction, jax.random.key(0))
    np.testing.assert_array_equal(out["steps"], [1, 1])
    for turn in out["turns"]:
        np.testing.assert_array_equal(turn["lengths"], 1)
        assert not np.asarray(turn["truncated"]).any()
        assert (np.asarray(turn["tokens"])[:, 1:] == scfg.pad_id).all()

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *a, **kw: compiles.append(event) if "backend_compile" in event else None)
    try:
        for seed in (1, 2):
            prompts, lens, instruction = ragged_prompts(cfg, scfg, [seed, 7, 4, 5], seed=seed)
            jax.block_until_ready(s(host_params(cfg, seed), prompts, lens, instruction, jax.random.key(seed)))
    finally:
        jax.monitoring.clear_event_listeners()
    assert compiles == []
    assert s.jitted._cache_size() == 1


# ----------------------------------------------------------------------------- meshes


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_sampler_matches_one_device(mesh_shape):
    cfg = CFGS["llama"]
    params = host_params(cfg, scale=2.0)
    scfg = sampler.SamplerConfig(max_prompt_len=7, max_new_tokens=5, instruction_len=3, num_turns=2,
                                 temperature=0.8, top_k=20, samples_per_prompt=2, stop_token_ids=(3, 9), chunk_len=3)
    prompts, lens, instruction = ragged_prompts(cfg, scfg, [7, 2, 5, 4])
    want = jax.device_get(get_sampler(cfg, scfg)(params, prompts, lens, instruction, jax.random.key(5)))
    s = get_sampler(cfg, scfg, mesh_shape)
    out = s(params, prompts, lens, instruction, jax.random.key(5))
    assert out["turns"][0]["tokens"].sharding.mesh.shape == s.mesh.shape
    out = jax.device_get(out)
    # The mesh computes the logits in another order, so a draw may come out otherwise where a
    # logit error within the tolerance would change it (a uniform at the edge of its token's CDF
    # interval, or a near-tie at the top-k cut). Each row must agree exactly up to such a close
    # call (with this key, all of it); after a difference there, its context differs.
    margins, redrawn, logits = draw_margins(cfg, scfg, params, prompts, instruction, want, jax.random.key(5))
    terms = decoder_terms(cfg, scfg.episode_len())
    tol, lp_scale = f32_tol(np.abs(logits).max(), terms), logprob_scale(logits)
    for t, exp in enumerate(want["turns"]):  # the draws were redone right: the reference's tokens
        clear = exp["mask"] & (margins[t] > tol)
        np.testing.assert_array_equal(redrawn[t][clear], exp["tokens"][clear], err_msg=f"turn {t} redrawn")
    compared = 0
    for r in range(s.rows):
        for t, (got, exp) in enumerate(zip(out["turns"], want["turns"])):
            where = f"row {r} turn {t}"
            np.testing.assert_array_equal(got["start"][r], exp["start"][r], err_msg=where)
            n = agreeing_prefix(got["tokens"][r, :got["lengths"][r]], exp["tokens"][r, :exp["lengths"][r]],
                                margins[t, r] <= tol, where)
            compared += n
            if n < exp["lengths"][r]:
                assert_close_f32(got["logprobs"][r, :n], exp["logprobs"][r, :n], terms + cfg.vocab_size,
                                 magnitude=lp_scale, err_msg=where)
                break
            for key in ("tokens", "lengths", "truncated", "mask"):
                np.testing.assert_array_equal(got[key][r], exp[key][r], err_msg=f"{where} {key}")
            assert_close_f32(got["logprobs"][r], exp["logprobs"][r], terms + cfg.vocab_size, magnitude=lp_scale,
                             err_msg=where)
    assert compared >= 0.9 * sum(int(t["mask"].sum()) for t in want["turns"])  # close calls are rare
    assert set(np.unique(np.stack([t["lengths"] for t in out["turns"]]))) != {scfg.max_new_tokens}  # some stop


def draw_margins(cfg, scfg, params, prompts, instruction, out, key):
    """How close each draw of a temperature + top-k sampler's ``out`` came to another token.

    Redoes every draw from a full forward's logits and the sampler's key schedule (step s of
    turn t draws one uniform per row with fold_in(fold_in(key, t), s), inverting the CDF in
    token order). Returns margins [turns,R,N]: the smallest change of the logits (max norm)
    that could change the draw, i.e. min over the top-k cut's gap / 2 and T d / 2 for a uniform
    at distance d (a fraction of the mass) from its token's CDF edges (logits moved by e scale
    each probability by at most exp(+-e/T), so the CDF moves by at most about 2 e / T); the
    redrawn tokens [turns,R,N] (-1 where none); and the logits [M,V] behind the draws.
    """
    assert scfg.top_p == 1.0 and scfg.temperature > 0
    packed = jax.device_get(sampler.pack_episodes(scfg, out, prompts, instruction))
    full = full_logits(cfg, params, packed["tokens"], packed["valid"]).astype(np.float64)  # [R,T,V]
    T, k, (R, N) = scfg.temperature, scfg.top_k or cfg.vocab_size, out["turns"][0]["tokens"].shape
    margins, redrawn, seen = np.full((scfg.num_turns, R, N), np.inf), np.full((scfg.num_turns, R, N), -1), []
    for t, turn in enumerate(out["turns"]):
        for step in range(N):
            u = np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, t), step), (R,)), np.float64)
            for r in np.flatnonzero(turn["mask"][:, step]):
                logits = full[r, turn["start"][r] + step - 1]  # the logits token `step` was drawn from
                x = logits / T
                top = np.sort(x)[::-1]
                cut_gap = (top[k - 1] - top[k]) * T / 2 if k < len(x) else np.inf
                p = np.where(x >= top[k - 1], np.exp(x - top[0]), 0.0)
                cdf = np.cumsum(p) / p.sum()
                i = int(np.sum(cdf <= u[r]))
                d = min(u[r] - (cdf[i - 1] if i else 0.0), cdf[i] - u[r])
                margins[t, r, step], redrawn[t, r, step] = min(cut_gap, T * d / 2), i
                seen.append(logits)
    return margins, redrawn, np.stack(seen)


# ----------------------------------------------------------------------------- distributions


def test_temperature_samples_follow_the_softmax():
    """First tokens of 4096 samples of one prompt against softmax(logits / T): chi-square."""
    cfg = model.ModelConfig(**dict(_BASE, vocab_size=48))
    params = host_params(cfg, scale=1.5)
    T = 0.7
    scfg = sampler.SamplerConfig(max_prompt_len=5, max_new_tokens=1, num_turns=1, temperature=T,
                                 samples_per_prompt=4096, chunk_len=64)
    prompts, lens, _ = ragged_prompts(cfg, scfg, [4])
    out = jax.device_get(get_sampler(cfg, scfg, batch=1)(params, prompts, lens, np.zeros(0), jax.random.key(0)))
    toks = out["turns"][0]["tokens"][:, 0]
    logits = full_logits(cfg, params, prompts, np.arange(5)[None] < 4)[0, 3].astype(np.float64)
    # The returned log-probs are the policy's at temperature 1, not the sampling distribution's
    # (those differ by 0.2-1.9 here); the sampler's prefill vs a full forward: float32 rounding.
    assert_close_f32(out["turns"][0]["logprobs"][:, 0], jax.nn.log_softmax(logits)[toks],
                     decoder_terms(cfg, 5) + cfg.vocab_size, magnitude=logprob_scale(logits))
    probs = np.asarray(jax.nn.softmax(logits / T))
    counts = np.bincount(toks, minlength=cfg.vocab_size)
    expected = probs * len(toks)
    assert chi_square_p_value(counts, expected) > 1e-3
    assert counts[np.argsort(probs)[-1]] > 0.5 * expected.max()  # not the T=1 distribution by accident
    assert not np.allclose(probs, np.asarray(jax.nn.softmax(logits)), atol=0.01)


def test_blocked_argmax_and_categorical():
    """The block-wise argmax and inverse-CDF draw over a vocabulary of several blocks."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1000)).astype(np.float32)
    x[1, [5, 700]] = 9.0  # a tie: the first index wins, as in jnp.argmax
    np.testing.assert_array_equal(jax.jit(sampler._argmax)(x), np.argmax(x, -1))

    logits = np.where(rng.random(1000) < 0.3, -np.inf, 2.0 * rng.standard_normal(1000)).astype(np.float32)
    n = 40_000
    draws = np.asarray(jax.jit(sampler._categorical)(jax.random.key(0), np.broadcast_to(logits, (n, 1000))))
    probs = np.asarray(jax.nn.softmax(logits.astype(np.float64)))
    counts = np.bincount(draws, minlength=1000)
    assert counts[probs == 0].sum() == 0  # masked tokens are never drawn
    assert chi_square_p_value(counts, probs * n) > 1e-3


def chi_square_p_value(counts, expected):
    """Pearson's test, the bins that expect fewer than 5 draws pooled into one."""
    rare = expected < 5
    obs = np.append(counts[~rare], counts[rare].sum())
    exp = np.append(expected[~rare], expected[rare].sum())
    chi2 = ((obs - exp) ** 2 / np.maximum(exp, 1e-12)).sum()
    df = len(obs) - 1
    assert df >= 10, df
    return float(jax.scipy.special.gammaincc(df / 2, chi2 / 2))


@pytest.mark.parametrize("knob", [dict(top_k=3), dict(top_p=0.6)], ids=lambda k: next(iter(k)))
def test_top_k_and_top_p_stay_in_the_allowed_set(knob):
    cfg = CFGS["llama"]
    params = host_params(cfg, scale=1.5)
    T = 1.5  # flat, so tokens outside the set would be drawn often if they were allowed
    scfg = sampler.SamplerConfig(max_prompt_len=5, max_new_tokens=4, instruction_len=2, num_turns=2,
                                 temperature=T, samples_per_prompt=64, chunk_len=0, **knob)
    prompts, lens, instruction = ragged_prompts(cfg, scfg, [5, 2, 3, 4])
    out = jax.device_get(get_sampler(cfg, scfg)(params, prompts, lens, instruction, jax.random.key(3)))
    packed = jax.device_get(sampler.pack_episodes(scfg, out, prompts, instruction))
    logits = full_logits(cfg, params, packed["tokens"], packed["valid"])[:, :-1].astype(np.float64) / T
    sampled = (turn_positions(packed, 1) | turn_positions(packed, 2))[:, 1:]
    lg, tok = logits[sampled], packed["tokens"][:, 1:][sampled]  # [M,V], [M]
    own = np.take_along_axis(lg, tok[:, None], -1)
    # The sampler decided on its own logits (KV cache), these are a full forward's: "more likely"
    # must hold beyond both logits' float32 errors (2 tol, here in units of logits / T).
    slack = 2 * f32_tol(np.abs(lg).max() * T, decoder_terms(cfg, scfg.episode_len())) / T
    if "top_k" in knob:
        rank = (lg > own + slack).sum(-1)  # tokens more likely beyond rounding
        assert rank.max() < knob["top_k"]
        assert len(np.unique(rank)) == knob["top_k"]  # every allowed rank gets drawn
    else:
        probs = np.asarray(jax.nn.softmax(lg))
        own_p = np.take_along_axis(probs, tok[:, None], -1)
        before = np.where(probs > own_p * np.exp(slack), probs, 0).sum(-1)  # mass of more likely tokens
        # Each probability is off by a factor of at most exp(+-slack): the mass by ~slack.
        assert before.max() < knob["top_p"] + slack
        assert before.max() > knob["top_p"] / 3  # the draws do reach into the nucleus
    assert math.isfinite(np.asarray(out["turns"][1]["logprobs"]).sum())


# ----------------------------------------------------------------------------- errors


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="instruction_len >= 1"):
        sampler.SamplerConfig(max_prompt_len=4, max_new_tokens=4, temperature=1.0, chunk_len=64, num_turns=2)
    with pytest.raises(ValueError, match="top_p"):
        sampler.SamplerConfig(max_prompt_len=4, max_new_tokens=4, temperature=1.0, chunk_len=64, num_turns=1,
                              top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sampler.SamplerConfig(max_prompt_len=4, max_new_tokens=4, num_turns=1, temperature=-1.0, chunk_len=64)
    with pytest.raises(ValueError, match="stop_token_ids"):
        sampler.Sampler(CFGS["llama"], sampler.SamplerConfig(max_prompt_len=4, max_new_tokens=4, temperature=1.0,
                                                             chunk_len=64, num_turns=1, stop_token_ids=(64,)),
                        one_device(), 2)
    s = sampler.Sampler(CFGS["llama"], sampler.SamplerConfig(max_prompt_len=4, max_new_tokens=4, temperature=1.0,
                                                             chunk_len=64, num_turns=1), one_device(), 2)
    params = host_params(CFGS["llama"])
    with pytest.raises(ValueError, match="right-pad"):
        s(params, np.zeros((2, 5)), np.ones(2), np.zeros(0), jax.random.key(0))
    with pytest.raises(ValueError, match=r"prompt_lens must be in \[1, 4\]"):
        s(params, np.zeros((2, 4)), np.array([0, 4]), np.zeros(0), jax.random.key(0))
