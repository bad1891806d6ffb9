"""What every job repeats, written once: the mesh and its batch check, the run's identity and
keys, resume-or-init, the step loop (log, checkpoint, SIGTERM, the non-finite stop), and the
final export and summary.

A training job reads top to bottom as

    mesh = harness.make_mesh(cfg.mesh, cfg.batch_size)
    ...inputs, optimiser...
    with harness.Run(cfg, workdir, tx, mesh) as run:
        state, extra = run.resume_or_init(lambda: learner.init_state(...))
        ...the job's step function, a top-level function bound with functools.partial...
        out = run.loop(state, step_fn, extra_fn)
        return run.finish(out)

and ``run.start`` is the step it resumed from (0 for a new run).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import optax

from score_jax import checkpoints, learner, metrics, model, settings, sharding
from score_jax.jobs import keys

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite gradients; the last good state is saved."""


def make_mesh(cfg: sharding.MeshConfig, batch_size: int, what: str = "batch_size"):
    """The device mesh of ``cfg``; raises if the global batch does not split over its data axes."""
    mesh = sharding.make_mesh(cfg)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ValueError(f"{what}={batch_size} must be divisible by data x fsdp = {shards}.")
    log.info("Mesh %s over %d devices, %d processes.", dict(mesh.shape), mesh.size, jax.process_count())
    return mesh


def root_key(cfg) -> jax.Array:
    """The run's root key (keys.root of its seed, job and run index)."""
    return keys.root(cfg.seed, cfg.job, cfg.run)


@dataclasses.dataclass
class Outcome:
    state: Any
    step: int
    metrics: dict
    stopped_early: bool  # SIGTERM or multi-host preemption


class Run:
    """One training run in its workdir: the checkpoint manager, resume, the loop, the export."""

    def __init__(self, cfg: settings.TrainConfig, workdir: str, tx: optax.GradientTransformation, mesh):
        self.cfg, self.workdir, self.tx, self.mesh = cfg, workdir, tx, mesh
        ck = cfg.checkpoint
        self.manager = checkpoints.Manager(workdir, ck.every_steps, ck.keep, ck.async_save)
        self.start = 0

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.manager.close()

    def identity(self) -> dict:
        """What a checkpoint of this run records about it (checked on resume)."""
        return {"seed": self.cfg.seed, "run": self.cfg.run, "data_name": self.cfg.data.name}

    def resume_or_init(self, init: Callable[[], learner.State]) -> tuple[learner.State, dict]:
        """(state, the job's extra JSON) from the newest checkpoint that restores, or (``init()``,
        {}) for a new run; sets ``self.start``. Raises if the checkpoint is another run's."""
        restored = self.manager.restore_latest(learner.abstract_state(self.cfg.model, self.tx, self.mesh))
        if restored is None:
            self.start = 0
            return init(), {}
        self.start, state, extra = restored
        mine = self.identity()
        theirs = {k: extra.get(k, 0 if k == "run" else None) for k in mine}
        if theirs != mine:
            raise ValueError(
                f"The checkpoint in this workdir was written with {_fmt(theirs)}, but the config asks for "
                f"{_fmt(mine)}; use a new --workdir or the original settings.")
        log.info("Resumed from %s at step %d.", self.manager.directory, self.start)
        return state, extra.get("progress", {})

    def loop(self, state, step_fn: Callable, extra_fn: Callable[[], dict],
             progress_keys: tuple[str, ...] = ("loss", "grad_norm", "lr", "tokens_per_s")) -> Outcome:
        """Runs steps ``start + 1 .. total_steps`` (step numbers count finished steps):
        ``step_fn(state, step) -> (state, metrics)``; ``extra_fn()`` is the job's JSON saved in
        each checkpoint (data position and the like); ``progress_keys`` the console line. Every
        ``log_every`` steps one row of window means goes to TensorBoard, metrics.jsonl and the
        console (``window_mean``)."""
        cfg = self.cfg
        writer = metrics.Writer(self.workdir, cfg.total_steps, self.start)
        try:
            return _steps(state, self.start, cfg.total_steps, step_fn,
                          lambda: {**self.identity(), "progress": extra_fn()}, self.manager, writer, cfg.log_every,
                          cfg.optim.max_nonfinite_steps, progress_keys)
        finally:
            writer.close()

    def finish(self, out: Outcome, **more) -> dict:
        """Exports the final params to ``<workdir>/export`` and writes ``summary.json`` (final step,
        metrics, params digest, ``more``); returns the summary ({"step", "stopped_early": True}
        and nothing written when the loop stopped early)."""
        if out.stopped_early:
            return {"step": out.step, "stopped_early": True}
        checkpoints.export_params(os.path.join(self.workdir, checkpoints.EXPORT_DIR), out.state["params"])
        final = out.metrics or self._logged_at(out.step)  # resumed at the end: no step ran here
        summary = {"step": out.step, "final_metrics": final, "stopped_early": False,
                   "params_sha256": checkpoints.params_digest(out.state["params"]),
                   "num_params": model.num_params(self.cfg.model), **more}
        metrics.write_json(os.path.join(self.workdir, "summary.json"), summary)
        return summary


    def _logged_at(self, step: int) -> dict:
        """The metrics.jsonl row of ``step`` (without its step), or {}."""
        rows = [r for r in metrics.read_jsonl(os.path.join(self.workdir, metrics.METRICS_FILE)) if r["step"] == step]
        return {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}


def _fmt(identity: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in identity.items())


# Logged as their value at the logged step; every other metric as its mean over the steps since
# the previous log (a window mean: one batch's reward has a standard error of ~0.05 on the toy).
LAST_VALUE_KEYS = ("nonfinite_consecutive", "nonfinite_total", "lr", "stage")


def window_mean(rows: list[dict]) -> dict:
    """One logged row from the metrics of the steps since the last log (host values)."""
    return {k: float(np.asarray(rows[-1][k])) if k in LAST_VALUE_KEYS else
            float(np.mean([np.asarray(r[k], np.float64) for r in rows])) for k in rows[-1]}


def _steps(state, start: int, total: int, step_fn, extra_fn, manager: checkpoints.Manager, writer: metrics.Writer,
           log_every: int, max_nonfinite: int, progress_keys) -> Outcome:
    last: dict = {}
    window: list[dict] = []  # the metrics (device arrays) of the steps since the last log
    step = start
    last_log_step, last_log_t = start, time.perf_counter()
    with checkpoints.StopRequest() as stop:
        while step < total:
            state, m = step_fn(state, step)
            window.append(m)
            step += 1
            # One scalar read per step: exact non-finite accounting for a negligible sync.
            if int(m["nonfinite_consecutive"]) >= max_nonfinite:
                manager.save(step, state, extra_fn, force=True)
                manager.wait()
                raise NonFiniteError(
                    f"{int(m['nonfinite_consecutive'])} consecutive steps had non-finite gradients "
                    f"(optim.max_nonfinite_steps={max_nonfinite}); the last good weights are "
                    f"saved at step {step}. Lower optim.learning_rate or check the data.")
            if step % log_every == 0 or step == total or stop:
                m = window_mean(jax.device_get(window))
                window.clear()
                now = time.perf_counter()
                m["tokens_per_s"] = m.get("tokens", 0.0) * (step - last_log_step) / max(now - last_log_t, 1e-9)
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
