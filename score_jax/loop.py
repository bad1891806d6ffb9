"""The step loop every training job shares: resume, step, log, checkpoint, stop.

A job supplies ``step_fn(state, step) -> (state, metrics)`` and ``extra_fn() -> dict`` (the
JSON saved beside the state: data-iterator position and the like). The loop owns what must
be identical across jobs: periodic and final checkpoints, a checkpoint and a clean exit on
SIGTERM, the non-finite stop, TensorBoard and console progress.
"""

from __future__ import annotations

import dataclasses
import logging
import os

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


def check_same_run(extra: dict, seed: int, data_name: str) -> None:
    """Raises if the workdir's checkpoint (its ``extra``) belongs to a run with another seed or dataset."""
    if extra.get("seed") != seed or extra.get("data_name") != data_name:
        raise ValueError(
            f"The checkpoint in this workdir was written with seed={extra.get('seed')} and data "
            f"{extra.get('data_name')!r}, but the config asks for seed={seed} and "
            f"{data_name!r}; use a new --workdir or the original settings.")


def finish(workdir: str, out: Outcome, num_params: int, **more) -> dict:
    """Exports the final params to ``<workdir>/export`` and writes ``summary.json`` (final step,
    metrics, params digest, ``more``); returns the summary."""
    checkpoints.export_params(os.path.join(workdir, checkpoints.EXPORT_DIR), out.state["params"])
    summary = {"step": out.step, "final_metrics": out.metrics, "stopped_early": False,
               "params_sha256": checkpoints.params_digest(out.state["params"]), "num_params": num_params, **more}
    metrics.write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
