import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import optim

CFG = optim.OptimConfig(learning_rate=1e-2, schedule="cosine", warmup_steps=4, end_lr_fraction=0.1,
                        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
                        grad_accum_steps=1, max_nonfinite_steps=3)


def test_schedules():
    cos = optim.schedule(CFG, total_steps=20)
    assert float(cos(0)) == 0.0
    np.testing.assert_allclose(float(cos(4)), 1e-2, rtol=1e-6)
    np.testing.assert_allclose(float(cos(20)), 1e-3, rtol=1e-5)
    const = optim.schedule(dataclasses.replace(CFG, schedule="constant"), total_steps=20)
    np.testing.assert_allclose([float(const(s)) for s in (2, 4, 10, 19)], [5e-3, 1e-2, 1e-2, 1e-2], rtol=1e-6)


def test_bad_schedule_and_accumulation_are_rejected():
    with pytest.raises(ValueError, match="cosine or constant"):
        dataclasses.replace(CFG, schedule="linear")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        dataclasses.replace(CFG, grad_accum_steps=0)


def test_nonfinite_updates_are_skipped_and_counted():
    params = {"w": jnp.ones((3,))}
    tx = optim.make(CFG, 10)
    state = tx.init(params)
    good, bad = {"w": jnp.full((3,), 0.1)}, {"w": jnp.array([0.1, jnp.nan, 0.1])}
    updates, state = tx.update(bad, state, params)
    assert jnp.all(updates["w"] == 0)
    assert optim.nonfinite(state) == (1, 1)
    _, state = tx.update(bad, state, params)
    assert optim.nonfinite(state) == (2, 2)
    updates, state = tx.update(good, state, params)
    assert optim.nonfinite(state) == (0, 2)  # consecutive count resets, total does not


def test_gradient_accumulation_applies_every_k_steps():
    params = {"w": jnp.zeros((2,))}
    tx = optim.make(dataclasses.replace(CFG, grad_accum_steps=2, warmup_steps=0, schedule="constant"), 10)
    state = tx.init(params)
    u1, state = tx.update({"w": jnp.ones((2,))}, state, params)
    assert jnp.all(u1["w"] == 0)
    u2, state = tx.update({"w": jnp.ones((2,))}, state, params)
    assert jnp.all(u2["w"] < 0)
    assert optim.nonfinite(state) == (0, 0)


def test_weight_decay_mask_skips_norms_and_biases():
    axes = {"w": ("embed", "mlp"), "scale": ("norm",), "b": ("heads", "head_dim")}
    assert optim.decay_mask(axes) == {"w": True, "scale": False, "b": False}


def test_clip_by_global_norm_is_applied():
    # eps=1 makes Adam's first update depend on the gradient's scale, so clipping shows.
    cfg = dataclasses.replace(CFG, warmup_steps=0, schedule="constant", eps=1.0)
    params = {"w": jnp.zeros((4,))}
    big = {"w": jnp.full((4,), 10.0)}  # global norm 20
    clipped = {"w": jnp.full((4,), 0.5)}  # the same direction at norm 1
    with_clip = optim.make(cfg, 10)
    without = optim.make(dataclasses.replace(cfg, clip_norm=0.0), 10)
    u_clip, _ = with_clip.update(big, with_clip.init(params), params)
    u_ref, _ = without.update(clipped, without.init(params), params)
    u_big, _ = without.update(big, without.init(params), params)
    np.testing.assert_allclose(u_clip["w"], u_ref["w"], rtol=1e-6)
    assert not np.allclose(u_big["w"], u_ref["w"])
