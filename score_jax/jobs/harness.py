"""What every job repeats, written once: joining a multi-process run (``init_distributed``),
the workdir's identity and its checks before any work (``start``), the mesh and its batch
check, the run's keys, resume-or-init, the step loop (log, checkpoint, SIGTERM / SIGINT, the
non-finite stop), and the final export and summary.

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
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
import optax
from etils import epath

from score_jax import checkpoints, learner, metrics, model, optim, settings, sharding
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


ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
ENV_INIT_TIMEOUT = "SCORE_JAX_DISTRIBUTED_TIMEOUT"  # seconds to wait for every process (default 300)


class DistributedError(ValueError):
    """The processes of a multi-process run could not form one run (the message says why)."""


def init_distributed() -> None:
    """``jax.distributed.initialize`` for ``--config.distributed=True``: TPU pods, SLURM and the
    other clusters JAX knows are detected by JAX; elsewhere JAX_COORDINATOR_ADDRESS (host:port
    of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID are read, so N copies of one command
    with those three variables form one run. CPU processes exchange data with gloo."""
    env = os.environ
    kw = {}
    given = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if env.get(n)]
    if given:
        missing = [n for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not env.get(n)]
        if missing:
            raise DistributedError(f"{', '.join(given)} set but not {', '.join(missing)}: set all three "
                                   "(or none, on a TPU pod or under SLURM, where JAX finds them).")
        try:
            kw = dict(coordinator_address=env[ENV_COORDINATOR], num_processes=int(env[ENV_NUM_PROCESSES]),
                      process_id=int(env[ENV_PROCESS_ID]))
        except ValueError:
            raise DistributedError(f"{ENV_NUM_PROCESSES}={env[ENV_NUM_PROCESSES]!r} and {ENV_PROCESS_ID}="
                                   f"{env[ENV_PROCESS_ID]!r} must be integers.") from None
        if not 0 <= kw["process_id"] < kw["num_processes"]:
            raise DistributedError(f"{ENV_PROCESS_ID}={kw['process_id']} must be in 0..{kw['num_processes'] - 1} "
                                   f"({ENV_NUM_PROCESSES}={kw['num_processes']}).")
    try:
        timeout = int(env.get(ENV_INIT_TIMEOUT, "300"))
    except ValueError:
        raise DistributedError(f"{ENV_INIT_TIMEOUT}={env[ENV_INIT_TIMEOUT]!r} must be a whole number of "
                               "seconds.") from None
    # Gloo: the CPU collectives across processes (XLA's in-process ones cannot span processes);
    # only the CPU backend reads it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = kw.get("coordinator_address", env.get(ENV_COORDINATOR, "the cluster's coordinator"))
    # JAX aborts the process (a C++ check failure, no Python error) when the processes do not
    # all meet in time; this watchdog says so first, in one line.
    joined = threading.Event()

    def watchdog():
        if not joined.wait(timeout):
            who = f"process {kw['process_id']} of {kw['num_processes']}" if kw else "this process"
            print(f"Error: the processes did not all meet the coordinator at {where} within {timeout} s ({who}); "
                  f"start every process with the same {ENV_COORDINATOR} (process 0 listens there), or raise "
                  f"{ENV_INIT_TIMEOUT}.", file=sys.stderr, flush=True)
            os._exit(2)
    threading.Thread(target=watchdog, name="distributed-watchdog", daemon=True).start()
    try:
        jax.distributed.initialize(initialization_timeout=timeout + 60, **kw)
        joined.set()
    except (RuntimeError, ValueError) as e:
        joined.set()
        text = str(e)
        raise DistributedError(f"jax.distributed could not start ({where}): {text.splitlines()[0][:200]}; on a "
                               f"machine that is not a TPU pod or a SLURM job, set {ENV_COORDINATOR}, "
                               f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}.") from e
    log.info("Process %d of %d (coordinator %s), %d local devices of %d.", jax.process_index(),
             jax.process_count(), where, jax.local_device_count(), jax.device_count())


IDENTITY_FILE = "identity.json"
# The model fields a checkpoint's arrays depend on (dtype, remat and the like do not).
SHAPE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                "qkv_bias", "qk_norm", "sandwich_norm", "tie_embeddings", "param_dtype", "scan_layers")


class WorkdirError(ValueError):
    """The workdir holds another run's work: the message says what differs."""


def identity(cfg) -> dict:
    """What a workdir's saved work depends on: the job, preset, model shape, optimiser
    structure, seed, run index and dataset (an eval also its params, split and decoding).
    Written with a run's first checkpoint (or an eval's first saved batch) as identity.json
    and checked on every start (``check_workdir``)."""
    if cfg.job == "demo":  # its runs are workdirs of their own, each with its identity
        return {"job": "demo", "model_preset": cfg.model_preset, "seed": cfg.seed}
    out = {"job": cfg.job, "model_preset": cfg.model_preset,
           "model": {f: getattr(cfg.model, f) for f in SHAPE_FIELDS},
           "seed": cfg.seed, "run": cfg.run, "data_name": cfg.data.name,
           "data": {"builder_seed": cfg.data.builder_seed, "num_train": cfg.data.num_train,
                    "num_test": cfg.data.num_test, **({"train_split": cfg.data.train_split}
                                                      if hasattr(cfg.data, "train_split") else {})}}
    if hasattr(cfg, "optim"):
        out["optimizer"] = optim.structure(cfg.optim)
    if hasattr(cfg, "eval"):
        ev = cfg.eval
        out["eval"] = {"params": ev.params, "split": ev.split, "num_problems": ev.num_problems,
                       "num_attempts": ev.num_attempts, "batch_size": ev.batch_size,
                       "sampling": dataclasses.asdict(ev.sampling), "correction": cfg.task.correction}
    return json.loads(json.dumps(out))  # as read back from JSON (tuples become lists)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def identity_difference(theirs: dict, mine: dict) -> str:
    """"" when equal, else "key: saved -> config" for each differing key (a few at most). Keys
    the saved identity lacks (written by a version that did not record them) are not compared."""
    a, b = _flat(theirs), _flat(mine)
    keys_ = [k for k in [k for k in b if k in a] + [k for k in a if k not in b] if a.get(k) != b.get(k)]
    shown = "; ".join(f"{k}: {a.get(k, '(none)')!r} there, {b.get(k, '(none)')!r} here" for k in keys_[:3])
    return shown + (f" (and {len(keys_) - 3} more)" if len(keys_) > 3 else "")


def check_workdir(cfg, workdir: str) -> None:
    """Raises WorkdirError, before any work, when ``workdir`` holds saved work of another job,
    preset, model shape, optimiser structure, seed, run or evaluation than ``cfg``'s."""
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"--workdir={workdir} is a file, not a directory; pass a directory.")
    file = path / IDENTITY_FILE
    if not file.exists():
        return
    try:
        theirs = json.loads(file.read_text())
        if not isinstance(theirs, dict):
            raise ValueError(f"a JSON {type(theirs).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{file} is unreadable ({e}); it records which run this workdir holds: "
                           "restore it, or use a new --workdir.") from e
    difference = identity_difference(theirs, identity(cfg))
    if difference:
        raise WorkdirError(f"{workdir} holds the work of another run ({difference}); use a new --workdir, "
                           "or the settings it was written with.")


def claim_workdir(cfg, workdir: str) -> None:
    """Writes identity.json (process 0) unless it exists: called with the first saved work."""
    file = epath.Path(workdir) / IDENTITY_FILE
    if jax.process_index() == 0 and not file.exists():
        metrics.write_json(str(file), identity(cfg))


_PENDING_CONFIG: dict = {}  # workdir -> config.json, until its checkpoints are found to be this run's


def start(cfg, workdir: str, config_json: dict) -> None:
    """The checks every job makes before work, then ``<workdir>/config.json``: creates the
    workdir, refuses another run's (``check_workdir``) and an unwritable one. In a workdir with
    checkpoints but no identity.json (written before it existed), config.json waits until
    ``Run.resume_or_init`` has found them to be this run's."""
    path = epath.Path(workdir)
    check_workdir(cfg, workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not (path / IDENTITY_FILE).exists() and checkpoints.saved_steps(workdir):
            _PENDING_CONFIG[os.path.abspath(workdir)] = config_json
        elif jax.process_index() == 0:
            metrics.write_json(str(path / "config.json"), config_json)
    except OSError as e:
        raise WorkdirError(f"Cannot write to --workdir={workdir} ({e.strerror or e}); "
                           "pass a writable directory.") from e


def _write_pending_config(workdir: str) -> None:
    pending = _PENDING_CONFIG.pop(os.path.abspath(workdir), None)
    if pending is not None and jax.process_index() == 0:
        metrics.write_json(os.path.join(workdir, "config.json"), pending)


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

    def __exit__(self, exc_type, *exc) -> None:
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001 - a failed save already on its way out is reported once
            if exc_type is None:
                raise

    def identity(self) -> dict:
        """What a checkpoint of this run records about it (checked on resume)."""
        return identity(self.cfg)

    def resume_or_init(self, init: Callable[[], learner.State]) -> tuple[learner.State, dict]:
        """(state, the job's extra JSON) from the newest checkpoint that restores, or (``init()``,
        {}) for a new run; sets ``self.start``. Raises WorkdirError if the workdir is another
        run's (identity.json, or a checkpoint's own record where a workdir predates it), and
        checkpoints.MismatchError if a checkpoint's arrays are another model's or optimiser's."""
        check_workdir(self.cfg, self.workdir)
        abstract = learner.abstract_state(self.cfg.model, self.tx, self.mesh)
        need = checkpoints.ensure_space(str(self.manager.directory), abstract)
        if need:  # before any work: training on, to fail at the first save, would waste it
            raise checkpoints.SaveError(f"Not enough disk space for a checkpoint in {self.manager.directory} "
                                        f"({need}); free space or move --workdir.")
        restored = self.manager.restore_latest(abstract)
        if restored is None:
            self.start = 0
            _write_pending_config(self.workdir)
            return init(), {}
        self.start, state, extra = restored
        mine = self.identity()
        theirs = {k: extra.get(k, 0 if k == "run" else None) for k in ("seed", "run", "data_name")}
        theirs = {**mine, **theirs, **{k: extra[k] for k in mine if k in extra}}
        difference = identity_difference(theirs, mine)
        if difference:
            raise WorkdirError(f"The checkpoint in this workdir was written by another run ({difference}); "
                               "use a new --workdir, or the settings it was written with.")
        claim_workdir(self.cfg, self.workdir)  # a workdir from before identity.json
        _write_pending_config(self.workdir)
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

        def extra():  # called once per save: the first one claims the workdir
            claim_workdir(cfg, self.workdir)
            return {**self.identity(), "progress": extra_fn()}

        try:
            return _steps(state, self.start, cfg.total_steps, step_fn, extra, self.manager, writer, cfg.log_every,
                          cfg.optim.max_nonfinite_steps, progress_keys)
        finally:
            writer.close()

    def finish(self, out: Outcome, **more) -> dict:
        """Exports the final params to ``<workdir>/export`` and writes ``summary.json`` (final step,
        metrics, params digest, ``more``); returns the summary ({"step", "stopped_early": True}
        and nothing written when the loop stopped early)."""
        if out.stopped_early:
            return {"step": out.step, "stopped_early": True}
        with checkpoints.StopRequest():  # a signal now waits for the export and summary
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
