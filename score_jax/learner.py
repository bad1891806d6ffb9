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

from score_jax import losses, model, optim, sharding

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


def sft_loss(cfg: model.ModelConfig, params: dict, batch: dict, loss_chunk: int = 0):
    """Next-token loss on response tokens. batch: tokens, loss_mask, valid, all [B,T] int32.
    ``loss_chunk`` > 0 projects onto the vocabulary that many positions at a time."""
    tokens = batch["tokens"]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    net = model.bind(cfg, params)
    hidden, _ = net.hidden(tokens, positions, batch["valid"].astype(bool))
    logp = losses.chunked_token_logprobs(net.unembed, hidden[:, :-1], tokens[:, 1:], loss_chunk)
    return losses.masked_mean_nll(logp, batch["loss_mask"][:, 1:])


def make_sft_step(cfg: model.ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                  batch_shapes: dict, loss_chunk: int = 0) -> Callable[[State, dict], tuple[State, dict]]:
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

    def run(state, batch):
        with jax.set_mesh(mesh):
            return jitted(state, batch)

    return run

