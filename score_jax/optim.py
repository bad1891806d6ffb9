"""The optax chain: clip by global norm, AdamW, warmup then cosine or constant, gradient
accumulation, and non-finite updates skipped and counted."""

from __future__ import annotations

import dataclasses

import jax
import optax

from score_jax import ranges


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float
    schedule: str  # cosine | constant
    warmup_steps: int
    end_lr_fraction: float
    b1: float
    b2: float
    eps: float
    weight_decay: float
    clip_norm: float
    grad_accum_steps: int
    max_nonfinite_steps: int

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule={self.schedule!r}; choose cosine or constant.")
        ranges.check("optim", self, learning_rate="(0, inf)", warmup_steps="[0, inf)", end_lr_fraction="[0, 1]",
                     b1="[0, 1)", b2="[0, 1)", eps="[0, inf)", weight_decay="[0, inf)", clip_norm="[0, inf)",
                     grad_accum_steps="[1, inf)", max_nonfinite_steps="[1, inf)")


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate by optimiser update (= train step // grad_accum_steps)."""
    updates = max(1, total_steps // cfg.grad_accum_steps)
    warmup = min(cfg.warmup_steps, updates - 1)
    if cfg.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1)),
             optax.constant_schedule(cfg.learning_rate)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup, max(updates, warmup + 1),
        end_value=cfg.learning_rate * cfg.end_lr_fraction)


def decay_mask(axes_tree) -> dict:
    """Weight decay on matrices only (anything with an ``embed`` axis), not norms or biases."""
    return jax.tree.map(lambda axes: "embed" in axes, axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def make(cfg: OptimConfig, total_steps: int, axes_tree=None) -> optax.GradientTransformation:
    """The full transformation. Non-finite updates are skipped by ``apply_if_finite``; the
    caller stops training after ``max_nonfinite_steps`` consecutive ones (see ``nonfinite``)."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay,
                             mask=None if axes_tree is None else decay_mask(axes_tree)))
    # The error budget is ours to enforce (with a checkpoint and a clear message), so optax's
    # own fallback of applying the update anyway must never trigger.
    tx = optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=2**31 - 1)
    if cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum_steps)
    return tx


def structure(cfg: OptimConfig) -> str:
    """The shape of ``make``'s state in words: what a checkpoint of one config shares with
    another's only when these agree (the learning rate and its schedule are not part of it)."""
    inner = ("clip_by_global_norm, " if cfg.clip_norm > 0 else "") + "adamw"
    out = f"apply_if_finite(chain({inner}))"
    return f"MultiSteps({out}, every {cfg.grad_accum_steps})" if cfg.grad_accum_steps > 1 else out


def nonfinite(opt_state) -> tuple[jax.Array, jax.Array]:
    """(consecutive, total) counts of skipped non-finite updates."""
    if isinstance(opt_state, optax.MultiStepsState):
        opt_state = opt_state.inner_opt_state
    assert isinstance(opt_state, optax.ApplyIfFiniteState), type(opt_state)
    return opt_state.notfinite_count, opt_state.total_notfinite
