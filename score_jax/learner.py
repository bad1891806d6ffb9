"""Train state and the jit-compiled train steps.

The train state is a plain dict pytree ``{"params", "opt_state", "step"}`` so that Orbax,
optax and jit all see the same structure. Every step is ``jax.jit`` with explicit in/out
shardings over the mesh and the state buffers donated (updated in place).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from score_jax import evaluate, losses, model, optim, sharding

State = dict[str, Any]


def state_shardings(cfg: model.ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> State:
    """NamedShardings of the whole train state, computed without allocating anything.

    Optimiser moments follow their parameter's sharding; counters are replicated.
    """
    p_shard = model.param_shardings(cfg, mesh)
    opt_shapes = jax.eval_shape(tx.init, model.param_shapes(cfg))
    opt_shard = optax.tree_map_params(
        tx, lambda _, s: s, opt_shapes, p_shard,
        transform_non_params=lambda _: sharding.replicated(mesh),
        is_leaf=lambda x: isinstance(x, NamedSharding))
    return {"params": p_shard, "opt_state": opt_shard, "step": sharding.replicated(mesh)}


def abstract_state(cfg: model.ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> State:
    """ShapeDtypeStructs with shardings: the restore target for Orbax."""
    shapes = {"params": model.param_shapes(cfg),
              "opt_state": jax.eval_shape(tx.init, model.param_shapes(cfg)),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, state_shardings(cfg, tx, mesh))


def abstract_params(cfg: model.ModelConfig, mesh: Mesh) -> dict:
    """ShapeDtypeStructs with shardings of the params: the restore target of an export."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        model.param_shapes(cfg), model.param_shardings(cfg, mesh))


def init_state(cfg: model.ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
               key: jax.Array, params: dict | None = None) -> State:
    """A fresh train state, created sharded. ``params`` (e.g. an export) replaces random init."""
    shardings = state_shardings(cfg, tx, mesh)
    if params is None:
        params = model.init_params(cfg, key, mesh)
    params = jax.device_put(params, shardings["params"])
    opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    return {"params": params, "opt_state": opt_state,
            "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])}


def batch_shardings(mesh: Mesh, batch_shapes: dict) -> dict:
    return {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}


def _apply_update(tx, state: State, grads) -> tuple[State, dict]:
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    consecutive, total = optim.nonfinite(opt_state)
    metrics = {"grad_norm": optax.tree.norm(grads), "nonfinite_consecutive": consecutive,
               "nonfinite_total": total}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def sft_loss(cfg: model.ModelConfig, params: dict, batch: dict, loss_chunk: int):
    """Next-token loss on response tokens. batch: tokens, loss_mask, valid, all [B,T] int32.
    ``loss_chunk`` > 0 projects onto the vocabulary that many positions at a time."""
    tokens = batch["tokens"]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    net = model.bind(cfg, params)
    hidden, _ = net.hidden(tokens, positions, batch["valid"].astype(bool))
    logp = losses.chunked_token_logprobs(net.unembed, hidden[:, :-1], tokens[:, 1:], loss_chunk)
    return losses.masked_mean_nll(logp, batch["loss_mask"][:, 1:])


def make_sft_step(cfg: model.ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                  batch_shapes: dict, loss_chunk: int) -> Callable[[State, dict], tuple[State, dict]]:
    """The jit SFT step: (state, batch) -> (state, metrics). The input state is donated."""

    def step(state, batch):
        (loss, n_tokens), grads = jax.value_and_grad(
            lambda p: sft_loss(cfg, p, batch, loss_chunk), has_aux=True)(state["params"])
        state, metrics = _apply_update(tx, state, grads)
        return state, dict(metrics, loss=loss, target_tokens=n_tokens,
                           tokens=jnp.sum(batch["valid"]))

    s_shard = state_shardings(cfg, tx, mesh)
    jitted = jax.jit(step, in_shardings=(s_shard, batch_shardings(mesh, batch_shapes)),
                     out_shardings=(s_shard, sharding.replicated(mesh)), donate_argnums=0)
    return sharding.on_mesh(mesh, jitted)


# ---------------------------------------------------------------------------------------------
# SCoRe RL steps. An RL batch holds R two-turn episodes packed by ``sampler.pack_episodes``:
#   tokens, valid [R,T] (T = SamplerConfig.episode_len()); for turn t in (1, 2): start{t} [R]
#   (position of the turn's first token), mask{t} [R,N] (its generated tokens), logp{t}_sampler
#   [R,N] (the sampler's log-probs), truncated{t} [R] bool; r1, r2 [R] binary rewards;
#   edit_ratio [R] (host-computed similarity of y1 and y2). Rows are prompt-major (k per prompt).
# ---------------------------------------------------------------------------------------------

RL_BATCH_KEYS = ("tokens", "valid", "start1", "start2", "mask1", "mask2", "logp1_sampler",
                 "logp2_sampler", "truncated1", "truncated2", "r1", "r2", "edit_ratio")


def episode_logprobs(cfg: model.ModelConfig, params: dict, tokens, valid, loss_chunk: int):
    """(log pi(tokens[:, j+1] | tokens[:, :j+1]), entropy at j), both [R, T-1] f32, from one
    forward over the packed episodes (positions 0..T-1, padding masked by ``valid``)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    net = model.bind(cfg, params)
    hidden, _ = net.hidden(tokens, positions, valid.astype(bool))
    return losses.chunked_logprobs_and_entropy(net.unembed, hidden[:, :-1], tokens[:, 1:], loss_chunk)


def turn_values(full: jax.Array, start: jax.Array, n: int) -> jax.Array:
    """Turn values [R,n] from next-token values ``full`` [R,T-1]: entry i is the value of the
    token at position start + i, i.e. column start + i - 1 (clipped; mask the tail)."""
    idx = jnp.clip(start[:, None] - 1 + jnp.arange(n, dtype=jnp.int32), 0, full.shape[1] - 1)
    return jnp.take_along_axis(full, idx, axis=1)


REF_KEYS = ("tokens", "valid", "start1", "start2")  # what the reference forward reads


def make_reference_logprobs(cfg: model.ModelConfig, mesh: Mesh, batch_shapes: dict, max_new_tokens: int,
                            loss_chunk: int) -> Callable:
    """jit (ref_params, batch) -> (ref_logp1, ref_logp2) [R,N]: the frozen reference's log-probs
    of both turns (reads only REF_KEYS of the batch, so it can run before the rewards exist).
    No gradient, nothing donated (the reference is reused every step)."""

    def fn(ref_params, batch):
        full, _ = episode_logprobs(cfg, ref_params, batch["tokens"], batch["valid"], loss_chunk)
        full = jax.lax.stop_gradient(full)
        return (turn_values(full, batch["start1"], max_new_tokens),
                turn_values(full, batch["start2"], max_new_tokens))

    b_shard = batch_shardings(mesh, {k: batch_shapes[k] for k in REF_KEYS})
    out = sharding.batch_sharding(mesh, 2)
    jitted = sharding.on_mesh(mesh, jax.jit(fn, in_shardings=(model.param_shardings(cfg, mesh), b_shard),
                                            out_shardings=(out, out)))

    def run(ref_params, batch):
        return jitted(ref_params, {k: batch[k] for k in REF_KEYS})

    run.lower = lambda ref_params, batch: jitted.lower(ref_params, {k: batch[k] for k in REF_KEYS})
    return run


def rl_loss(cfg: model.ModelConfig, rl, params: dict, batch: dict, ref_logp1, ref_logp2, *, stage: int,
            loss_chunk: int):
    """The SCoRe loss of ``stage`` (1 or 2) on a packed RL batch; returns (loss, metrics).

    ``rl`` is a settings.RLConfig. The policy's log-probs of both turns come from one forward
    over the packed episodes; ``losses.score_loss`` combines them with the reference's.
    """
    N = batch["mask1"].shape[1]
    full, ent = episode_logprobs(cfg, params, batch["tokens"], batch["valid"], loss_chunk)
    logp1, logp2 = turn_values(full, batch["start1"], N), turn_values(full, batch["start2"], N)
    mask1, mask2 = batch["mask1"], batch["mask2"]
    loss, m = losses.score_loss(
        logp1=logp1, ref_logp1=ref_logp1, mask1=mask1, logp2=logp2, ref_logp2=ref_logp2, mask2=mask2,
        r1=batch["r1"], r2=batch["r2"], stage=stage, alpha=rl.alpha, beta1=rl.beta1, beta2=rl.beta2,
        shaping=rl.shaping, baseline=rl.baseline, k=rl.sampling.samples_per_prompt, kl_estimator=rl.kl_estimator,
        kl_in_reward=rl.kl_in_reward, normalize=rl.normalize)
    sg = jax.lax.stop_gradient
    r1, r2 = batch["r1"], batch["r2"]
    m.update(
        delta=jnp.mean(r2 - r1),  # Delta(t1, t2) on the training batch
        delta_i_to_c=jnp.mean(((r1 == 0) & (r2 == 1)).astype(jnp.float32)),
        delta_c_to_i=jnp.mean(((r1 == 1) & (r2 == 0)).astype(jnp.float32)),
        entropy1=losses.masked_mean(turn_values(ent, batch["start1"], N), mask1),
        entropy2=losses.masked_mean(turn_values(ent, batch["start2"], N), mask2),
        len1=jnp.mean(jnp.sum(mask1, axis=1).astype(jnp.float32)),
        len2=jnp.mean(jnp.sum(mask2, axis=1).astype(jnp.float32)),
        truncated1=jnp.mean(batch["truncated1"].astype(jnp.float32)),
        truncated2=jnp.mean(batch["truncated2"].astype(jnp.float32)),
        edit_ratio=jnp.mean(batch["edit_ratio"]),
        # What SCoRe must move (evaluate.revise_rates): an edit ratio of exactly 1 is y2 == y1.
        **_revise_rates(r1, r2, (batch["edit_ratio"] < 1.0).astype(jnp.float32)),
        # The learner's and the sampler's log-probs of the same tokens: equal up to float
        # rounding when both see the same weights (a check that they score the same episode).
        logp_gap=jnp.maximum(losses.masked_mean(jnp.abs(sg(logp1) - batch["logp1_sampler"]), mask1),
                             losses.masked_mean(jnp.abs(sg(logp2) - batch["logp2_sampler"]), mask2)),
        stage=jnp.asarray(stage, jnp.float32),
    )
    return loss, m


def _revise_rates(r1, r2, revised) -> dict:
    rates = evaluate.revise_rates(r1, r2, revised)
    return {k: rates[k] for k in evaluate.REVISE_KEYS}


def make_rl_step(cfg: model.ModelConfig, rl, tx: optax.GradientTransformation, mesh: Mesh,
                 batch_shapes: dict, stage: int, loss_chunk: int) -> Callable:
    """The jit SCoRe step of ``stage``: (state, batch, ref_logp1, ref_logp2) -> (state, metrics).
    The state is donated; the reference log-probs come from ``make_reference_logprobs``."""

    def step(state, batch, ref_logp1, ref_logp2):
        (_, m), grads = jax.value_and_grad(
            lambda p: rl_loss(cfg, rl, p, batch, ref_logp1, ref_logp2, stage=stage, loss_chunk=loss_chunk),
            has_aux=True)(state["params"])
        state, upd = _apply_update(tx, state, grads)
        return state, dict(m, **upd, tokens=jnp.sum(batch["valid"]))

    s_shard = state_shardings(cfg, tx, mesh)
    b_shard = batch_shardings(mesh, batch_shapes)
    lp = sharding.batch_sharding(mesh, 2)
    jitted = jax.jit(step, in_shardings=(s_shard, b_shard, lp, lp),
                     out_shardings=(s_shard, sharding.replicated(mesh)), donate_argnums=0)
    return sharding.on_mesh(mesh, jitted)


def rl_batch_shapes(rows: int, episode_len: int, max_new_tokens: int) -> dict:
    """ShapeDtypeStructs of an RL batch (see RL_BATCH_KEYS)."""
    R, T, N = rows, episode_len, max_new_tokens
    s = jax.ShapeDtypeStruct
    return {"tokens": s((R, T), jnp.int32), "valid": s((R, T), jnp.bool_),
            "start1": s((R,), jnp.int32), "start2": s((R,), jnp.int32),
            "mask1": s((R, N), jnp.bool_), "mask2": s((R, N), jnp.bool_),
            "logp1_sampler": s((R, N), jnp.float32), "logp2_sampler": s((R, N), jnp.float32),
            "truncated1": s((R,), jnp.bool_), "truncated2": s((R,), jnp.bool_),
            "r1": s((R,), jnp.float32), "r2": s((R,), jnp.float32), "edit_ratio": s((R,), jnp.float32)}
