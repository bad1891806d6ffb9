"""The step loop every training job shares: resume, step, log, checkpoint, stop.

A job supplies ``step_fn(state, step) -> (state, metrics)`` and ``extra_fn() -> dict`` (the
JSON saved beside the state: data-iterator position and the like). The loop owns what must
be identical across jobs: periodic and final checkpoints, a checkpoint and a clean exit on
SIGTERM, the non-finite stop, TensorBoard and console progress.
"""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)
import time
from typing import Any, Callable

import jax
import numpy as np

from score_jax import checkpoints, metrics


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int
    keep: int
    async_save: bool


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass
class Outcome:
    state: Any
    step: int
    metrics: dict
    stopped_early: bool  # SIGTERM or multi-host preemption


def run(*, state, start_step: int, total_steps: int, step_fn: Callable, extra_fn: Callable[[], dict],
        manager: checkpoints.Manager, writer: metrics.Writer, log_every: int,
        max_nonfinite_steps: int, tokens_key: str = "tokens",
        progress_keys: tuple[str, ...] = ("loss", "grad_norm", "lr", "tokens_per_s")) -> Outcome:
    """Runs steps ``start_step + 1 .. total_steps`` (step numbers count finished steps);
    ``progress_keys`` are the metrics shown on the console line."""
    last: dict = {}
    step = start_step
    last_log_step, last_log_t = start_step, time.perf_counter()
    with checkpoints.StopRequest() as stop:
        while step < total_steps:
            state, m = step_fn(state, step)
            step += 1
            # One scalar read per step: exact non-finite accounting for a negligible sync.
            if int(m["nonfinite_consecutive"]) >= max_nonfinite_steps:
                manager.save(step, state, extra_fn, force=True)
                manager.wait()
                raise NonFiniteError(
                    f"{int(m['nonfinite_consecutive'])} consecutive steps had non-finite gradients "
                    f"(optim.max_nonfinite_steps={max_nonfinite_steps}); the last good weights are "
                    f"saved at step {step}. Lower optim.learning_rate or check the data.")
            if step % log_every == 0 or step == total_steps or stop:
                m = {k: float(np.asarray(v)) for k, v in jax.device_get(m).items()}
                now = time.perf_counter()
                m["tokens_per_s"] = m.get(tokens_key, 0.0) * (step - last_log_step) / max(now - last_log_t, 1e-9)
                last_log_step, last_log_t = step, now
                writer.scalars(step, m)
                writer.progress(step, {k: m[k] for k in progress_keys if k in m})
                last = m
            manager.save(step, state, extra_fn)
            if stop or manager.reached_preemption(step):
                log.warning("Stopping at step %d on request; checkpoint saved.", step)
                manager.save(step, state, extra_fn, force=True)
                manager.wait()
                return Outcome(state, step, last, stopped_early=True)
    manager.save(step, state, extra_fn, force=True)
    manager.wait()
    return Outcome(state, step, last, stopped_early=False)
