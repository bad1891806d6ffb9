"""score_jax.learner's SCoRe steps on real sampled episodes of a tiny model.

The loss terms themselves are pinned by hand in tests/test_losses_rl.py; here: the learner
scores exactly the sampled tokens, per-turn credit reaches the right tokens, KL to an
identical reference is 0, the sharded step equals the single-device step, and Stage I learns.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import learner, model, optim, sampler, settings, sharding

CFG = model.ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                        mlp_dim=64, scan_layers=False)
P, N, I = 6, 5, 3  # prompt slots, new tokens per turn, instruction length


def rl_cfg(**kw) -> settings.RLConfig:
    sampling = settings.SamplingConfig(max_prompt_len=P, max_new_tokens=N, temperature=1.0, top_k=0, top_p=1.0,
                                       samples_per_prompt=kw.pop("samples_per_prompt", 4), chunk_len=0)
    base = dict(schedule="1", schedule_block_steps=0, alpha=10.0, shaping="difference", beta1=0.01, beta2=0.1,
                baseline="loo", kl_estimator="k2", kl_in_reward=False, normalize="constant", sampling=sampling,
                reference="unused", keep_best=False, samples_every=0, samples_per_write=0)
    return settings.RLConfig(**{**base, **kw})


def opt(lr=1e-2, eps=1e-8):
    return optim.make(optim.OptimConfig(learning_rate=lr, schedule="constant", warmup_steps=0, end_lr_fraction=1.0,
                                        b1=0.9, b2=0.99, eps=eps, weight_decay=0.0, clip_norm=0.0,
                                        grad_accum_steps=1, max_nonfinite_steps=10), 1000)


def mesh_of(shape=None):
    if shape is None:
        return sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    return sharding.make_mesh(sharding.MeshConfig(*shape))


@functools.lru_cache(maxsize=None)
def params0():
    return jax.device_get(model.init_params(CFG, jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def _sampler(batch, k):
    scfg = sampler.SamplerConfig(max_prompt_len=P, max_new_tokens=N, instruction_len=I, num_turns=2, temperature=1.0,
                                 samples_per_prompt=k, stop_token_ids=(7,), chunk_len=0)
    return scfg, sampler.Sampler(CFG, scfg, mesh_of(), batch)


def episodes(params, batch=4, k=4, seed=0):
    """A real rollout of ``params``: (scfg, host RL batch without rewards, sampler output)."""
    scfg, smp = _sampler(batch, k)
    rng = np.random.default_rng(seed)
    prompts = rng.integers(8, CFG.vocab_size, (batch, P)).astype(np.int32)
    lens = rng.integers(2, P + 1, batch).astype(np.int32)
    instruction = np.asarray([1, 2, 3], np.int32)
    out = smp(params, prompts, lens, instruction, jax.random.key(seed))
    ep = jax.device_get(smp.pack(out, prompts, instruction))
    out = jax.device_get(out)
    R = batch * k
    ep.update(r1=np.zeros(R, np.float32), r2=np.zeros(R, np.float32), edit_ratio=np.zeros(R, np.float32))
    return scfg, ep, out


def steps_for(mesh, rl, tx, scfg, rows, stage):
    shapes = learner.rl_batch_shapes(rows, scfg.episode_len(), N)
    ref = learner.make_reference_logprobs(CFG, mesh, shapes, N, loss_chunk=0)
    return ref, learner.make_rl_step(CFG, rl, tx, mesh, shapes, stage, loss_chunk=0)


def test_turn_values_reads_each_turns_tokens():
    full = np.arange(2 * 9, dtype=np.float32).reshape(2, 9)  # column j = value of the token at j + 1
    got = np.asarray(learner.turn_values(jnp.asarray(full), jnp.asarray([3, 5]), 3))
    np.testing.assert_array_equal(got, [[2, 3, 4], [13, 14, 15]])


def test_learner_scores_the_sampled_tokens_and_kl_to_itself_is_zero():
    params = params0()
    scfg, ep, out = episodes(params)
    mesh, rl, tx = mesh_of(), rl_cfg(), opt()
    ref, step = steps_for(mesh, rl, tx, scfg, 16, stage=1)
    lp1, lp2 = ref(params, ep)
    # The reference is the policy here: its log-probs are the sampler's, token for token.
    for lp, turn in ((lp1, out["turns"][0]), (lp2, out["turns"][1])):
        np.testing.assert_allclose(np.asarray(lp)[turn["mask"]], turn["logprobs"][turn["mask"]], atol=1e-5)
    state = learner.init_state(CFG, tx, mesh, jax.random.key(0), params)
    _, m = step(state, ep, lp1, lp2)
    m = jax.device_get(m)
    assert m["logp_gap"] < 1e-5
    assert m["kl1"] == 0.0 and m["kl2"] == 0.0 and m["kl_loss1"] == 0.0 and m["kl_loss2"] == 0.0
    assert m["len1"] == out["turns"][0]["lengths"].mean() and m["len2"] == out["turns"][1]["lengths"].mean()
    assert m["entropy1"] > 0 and m["entropy2"] > 0


@pytest.mark.parametrize("stage", [1, 2])
def test_per_turn_credit_reaches_only_the_credited_turns(stage):
    """Without KL, the step's gradient is exactly that of -sum_t A_t sum_i log pi(y_t,i) / (R N),
    with A_t the leave-one-out advantages of each turn's own reward; Stage I has no turn-1 term."""
    params = params0()
    scfg, ep, _ = episodes(params, seed=3)
    rng = np.random.default_rng(0)
    ep["r1"] = rng.integers(0, 2, 16).astype(np.float32)
    ep["r2"] = rng.integers(0, 2, 16).astype(np.float32)
    rl = rl_cfg(beta1=0.0, beta2=0.0, alpha=2.0)
    zeros = jnp.zeros((16, N))

    def expected_loss(p):
        full, _ = learner.episode_logprobs(CFG, p, ep["tokens"], ep["valid"], loss_chunk=0)
        lp1 = jnp.where(ep["mask1"], learner.turn_values(full, jnp.asarray(ep["start1"]), N), 0.0)
        lp2 = jnp.where(ep["mask2"], learner.turn_values(full, jnp.asarray(ep["start2"]), N), 0.0)

        def loo(r):
            g = r.reshape(-1, 4)
            return (g - (g.sum(1, keepdims=True) - g) / 3).reshape(-1)

        r1, r2 = ep["r1"], ep["r2"]
        r2_hat = r2 if stage == 1 else r2 + 2.0 * (r2 - r1)  # Stage II difference shaping, alpha = 2
        loss = -(loo(r2_hat)[:, None] * lp2).sum() / (16 * N)
        if stage == 2:
            loss = loss - (loo(r1)[:, None] * lp1).sum() / (16 * N)
        return loss

    want = jax.grad(expected_loss)(params)
    got = jax.grad(lambda p: learner.rl_loss(CFG, rl, p, ep, zeros, zeros, stage=stage, loss_chunk=0)[0])(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=1e-7, rtol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(got)) > 1e-4  # not vacuous


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_sharded_rl_step_equals_one_device(mesh_shape):
    params = params0()
    scfg, ep, _ = episodes(params, seed=1)
    ep["r1"] = np.tile([0, 1, 1, 0], 4).astype(np.float32)
    ep["r2"] = np.tile([1, 1, 0, 0], 4).astype(np.float32)
    ref_params = jax.tree.map(lambda x: x * 0.9, params)  # a reference that differs: KL > 0
    # Adam with a large eps: a tiny gradient summed in another order must not flip a full-size
    # update (with eps=1e-8 any near-zero gradient gets an update of +-lr, whatever its bits).
    rl, tx = rl_cfg(), opt(1e-3, eps=1e-2)
    results = []
    for shape in (None, mesh_shape):
        mesh = mesh_of(shape)
        ref, step = steps_for(mesh, rl, tx, scfg, 16, stage=2)
        shapes = learner.rl_batch_shapes(16, scfg.episode_len(), N)
        batch = {k: jax.device_put(v, learner.batch_shardings(mesh, shapes)[k]) for k, v in ep.items()}
        lp = ref(jax.device_put(ref_params, model.param_shardings(CFG, mesh)), batch)
        state = learner.init_state(CFG, tx, mesh, jax.random.key(0), params)
        state, m = step(state, batch, *lp)
        state, m2 = step(state, batch, *lp)  # two steps: the optimiser state is sharded too
        results.append(jax.device_get((state["params"], m, m2)))
    (p0, m0, n0), (p1, m1, n1) = results
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, atol=2e-6)
    for k in m0:
        np.testing.assert_allclose(m1[k], m0[k], atol=1e-5, rtol=1e-5, err_msg=k)
        np.testing.assert_allclose(n1[k], n0[k], atol=1e-5, rtol=1e-5, err_msg=k)
    assert m0["kl1"] > 0 and m0["kl2"] > 0


def _stage1_run(beta2: float, steps: int = 25) -> list[dict]:
    """Stage I on a toy task: an attempt scores 1 if its first token is one of 8 of the 64 ids."""
    targets = np.arange(40, 48)
    ref_params = params0()
    mesh, rl, tx = mesh_of(), rl_cfg(beta2=beta2, beta1=0.0), opt(1e-2)
    scfg, _, _ = episodes(ref_params)
    ref, step = steps_for(mesh, rl, tx, scfg, 32, stage=1)
    state = learner.init_state(CFG, tx, mesh, jax.random.key(0), ref_params)
    history = []
    for s in range(steps):
        _, ep, out = episodes(jax.device_get(state["params"]), batch=8, seed=100 + s)
        for t in (1, 2):
            ep[f"r{t}"] = np.isin(out["turns"][t - 1]["tokens"][:, 0], targets).astype(np.float32)
        state, m = step(state, ep, *ref(ref_params, ep))
        history.append(jax.device_get(m))
    return history


def test_stage1_learns_turn2_while_beta2_holds_turn1_to_the_reference():
    """25 Stage I steps raise the turn-2 reward from the random base's ~1/8; with beta2 = 1 the
    turn-1 distribution stays close to the reference (its KL a fraction of turn 2's), while
    without it (beta2 = 0) turn 1 drifts as far as turn 2."""
    anchored, free = _stage1_run(beta2=1.0), _stage1_run(beta2=0.0)
    mean = lambda h, key: float(np.mean([x[key] for x in h]))  # noqa: E731
    assert mean(anchored[:5], "reward2") < 0.3 and mean(anchored[-5:], "reward2") > 0.6
    assert mean(free[-5:], "reward2") > 0.6
    kl1, kl2, kl1_free = mean(anchored[-5:], "kl1"), mean(anchored[-5:], "kl2"), mean(free[-5:], "kl1")
    assert kl1 < 0.25 * kl2, (kl1, kl2)
    assert kl1 < 0.25 * kl1_free, (kl1, kl1_free)
    # The turn-1 reward is not trained in Stage I: it stays near the base rate when anchored.
    assert mean(anchored[-5:], "reward1") < 0.3
