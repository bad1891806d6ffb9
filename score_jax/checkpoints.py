"""Orbax checkpoints: periodic async saves, resume from the latest complete one, a save on
SIGTERM, and params-only exports that hand one stage's weights to the next.

Layout under a run directory:
    checkpoints/<step>/state   train state (params, optimiser state, step)
    checkpoints/<step>/extra   JSON: data-iterator position, seed, anything the job needs
    export/                    params only (written at the end of a run)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import threading
import time
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from score_jax import ranges

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int  # periodic saves (0 = only at the end and on SIGTERM)
    keep: int  # newest checkpoints kept
    async_save: bool

    def __post_init__(self):
        # keep=0 would keep nothing, so a rerun could never resume.
        ranges.check("checkpoint", self, every_steps="[0, inf)", keep="[1, inf)")


def _path(path) -> epath.Path:
    """Orbax wants absolute paths: local ones are made absolute, gs:// ones kept."""
    path = str(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


class Manager:
    """Saves and restores ``(train state, extra JSON)`` pairs under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool = True):
        self.directory = _path(workdir) / CHECKPOINT_DIR
        self.every_steps = every_steps
        self._pending = None  # the step of an asynchronous save not yet known to have finished
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True)
        # Handlers named up front, so a checkpoint's metadata reads before any restore.
        self._mgr = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state, extra_fn: Callable[[], dict], *, force: bool = False) -> bool:
        """Saves when ``step`` is on the save interval (or ``force``); returns whether it did.
        ``extra_fn`` is called only when a save happens. Raises SaveError when this save, or the
        asynchronous one before it, failed (a full disk, a lost mount)."""
        if not force and (self.every_steps <= 0 or step % self.every_steps):
            return False
        if step in self._mgr.all_steps():
            return False
        self._check_space(step, state)
        with self._failing_save():
            self._mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra_fn())), force=True)
        self._pending = step
        return True

    def _resume_hint(self, failed_step=None) -> str:
        good = [s for s in self._mgr.all_steps() if s != failed_step]
        return (f"it resumes from step {max(good)}, the last complete checkpoint." if good else
                "no checkpoint is complete yet, so it starts again.")

    def _check_space(self, step: int, state) -> None:
        """SaveError before a save that cannot fit on a local disk (a full disk found by the save
        itself fails in Orbax's threads, which print tracebacks; this says it in one line)."""
        need = ensure_space(str(self.directory), state)
        if need:
            self.wait()  # the previous save, if any, is complete before the resume hint is given
            raise SaveError(f"Not enough disk space for the checkpoint of step {step} in {self.directory} ({need}); "
                            f"free space or move --workdir, then rerun the same command: {self._resume_hint()}")

    @contextlib.contextmanager
    def _failing_save(self):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - Orbax raises ValueError / OSError / RuntimeError alike
            step, self._pending = self._pending, None
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            full = "RESOURCE_EXHAUSTED" in reason or "No space left" in reason
            raise SaveError(
                f"Saving the checkpoint{f' of step {step}' if step is not None else ''} to {self.directory} "
                f"failed ({'the disk is full: ' if full else ''}{reason[:160]}); "
                f"{'free space or move --workdir' if full else 'check the workdir'}, then rerun the same command: "
                + self._resume_hint(step)) from e

    def restore_latest(self, abstract_state):
        """(step, state, extra) from the newest checkpoint that restores, or None.

        A checkpoint whose arrays do not match ``abstract_state`` (another model shape or
        optimiser structure) raises MismatchError and is left untouched: it is another run's
        good checkpoint, not a broken one. A checkpoint that fails to read (partial copy,
        deleted or truncated files) is moved aside to ``<step>.corrupt.<time>`` with a warning
        and the next older one is tried.
        """
        for step in sorted(self._mgr.all_steps(), reverse=True):
            try:
                saved = self._mgr.item_metadata(step)["state"]
            except Exception as e:  # noqa: BLE001 - unreadable metadata: this step is unusable
                self._set_aside(step, e)
                continue
            if saved is not None:
                difference = layout_difference(saved, abstract_state)
                if difference:
                    raise MismatchError(
                        f"The checkpoint {self.directory / str(step)} holds another model or optimiser "
                        f"({difference}); use a new --workdir, or the settings it was written with.")
            try:
                out = self._mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore()))
                return step, out["state"], out["extra"]
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                self._set_aside(step, e)
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        bad = self.directory / str(step)
        log.warning("Checkpoint %s is unreadable (%s: %s); moving it to %s.corrupt and trying an older one.",
                    bad, type(error).__name__, str(error)[:200], bad)
        if jax.process_index() == 0 and bad.exists():
            bad.rename(bad.parent / f"{bad.name}.corrupt.{int(time.time())}")
        self._mgr.reload()

    def wait(self):
        with self._failing_save():
            self._mgr.wait_until_finished()
        self._pending = None

    def reached_preemption(self, step: int) -> bool:
        """Multi-host: whether every host agreed to stop at this step (jax.distributed)."""
        return jax.process_count() > 1 and self._mgr.reached_preemption(step)

    def close(self):
        try:
            self._mgr.wait_until_finished()
        finally:
            self._mgr.close()


class SaveError(ValueError):
    """A checkpoint could not be written; the message says where, why and what a rerun resumes."""


class MismatchError(ValueError):
    """A readable checkpoint of another model shape or optimiser structure than the config's."""


def _leaf_layout(tree) -> list[tuple[str, tuple, str]]:
    """(path, shape, dtype) of every array leaf; paths as Orbax names them (``a.b.0``)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    out = []
    for path, leaf in flat:
        if not hasattr(leaf, "shape"):
            continue
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        out.append((".".join(parts), tuple(leaf.shape), str(np.dtype(leaf.dtype))))
    return out


def layout_difference(saved_metadata, abstract_state) -> str:
    """"" when the checkpoint's arrays (Orbax metadata) are those of ``abstract_state``, else
    what differs, in a few words. Arrays are compared as a multiset of (shape, dtype) overall
    (Orbax stores named tuples as lists, so optimiser paths differ in spelling), and by path
    under ``params``."""
    tree = getattr(saved_metadata, "tree", saved_metadata)
    saved, wanted = _leaf_layout(tree), _leaf_layout(abstract_state)
    if len(saved) != len(wanted):
        return f"{len(saved)} arrays there, {len(wanted)} here"
    saved_params = {p: (s, d) for p, s, d in saved if p.startswith("params.")}
    for p, s, d in wanted:
        if p.startswith("params.") and saved_params.get(p, (s, d)) != (s, d):
            return f"{p} is {saved_params[p][0]} {saved_params[p][1]} there, {s} {d} here"
    if sorted((s, d) for _, s, d in saved) != sorted((s, d) for _, s, d in wanted):
        return "its optimiser state's array shapes differ from this config's"
    return ""


class Interrupted(BaseException):
    """A stop signal arrived where nothing could be saved (start-up), or a second one aborted."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class Stopped(Exception):
    """A stop signal was honoured: the work so far is saved and a rerun resumes it."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def raise_on_signals() -> None:
    """Outside a StopRequest (start-up, compiles, reading data) SIGTERM and SIGINT raise
    Interrupted at once: there is nothing to save, so nothing to wait for."""
    def handle(signum, frame):
        raise Interrupted(signum)
    for sig in STOP_SIGNALS:
        signal.signal(sig, handle)


class StopRequest:
    """Turns SIGTERM (what a TPU preemption or ``kill`` sends) and SIGINT (Ctrl-C) into a flag
    the loop polls, so the loop can checkpoint and exit cleanly instead of dying mid-step. A
    second signal while the first is honoured raises Interrupted (a second Ctrl-C aborts)."""

    def __init__(self):
        self._event = threading.Event()
        self._previous: dict = {}
        self.signum = 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self._event.is_set():
            log.warning("%s received again: aborting without saving.", name)
            raise Interrupted(signum)
        log.warning("%s received: saving and stopping after this step (send it again to abort).", name)
        self.signum = signum
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


# Orbax's files beyond the array bytes (metadata, manifests), and a margin for its chunking.
_SAVE_OVERHEAD_BYTES, _SAVE_MARGIN = 1 << 20, 1.1


def ensure_space(directory: str, tree) -> str:
    """"" when a save of ``tree`` fits on the disk of local ``directory`` (or it is remote), else
    "needs about X MB, Y MB free"."""
    if "://" in directory:
        return ""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    need = _SAVE_MARGIN * sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                              for x in jax.tree.leaves(tree) if hasattr(x, "shape")) + _SAVE_OVERHEAD_BYTES
    free = shutil.disk_usage(probe).free
    return "" if free >= need else f"needs about {need / 2**20:.1f} MB, {free / 2**20:.1f} MB free"


def export_params(path: str, params) -> None:
    """Writes params only (no optimiser state) to ``path``, replacing an older export. The new
    export is written beside it and renamed into place, so a failed or interrupted export
    leaves the older one (or none), never a half-written one."""
    path = _path(path)
    need = ensure_space(str(path.parent), params)
    if need:
        raise SaveError(f"Not enough disk space for the params export {path} ({need}); free space or move the "
                        "workdir, then rerun the same command.")
    tmp = path.parent / f".{path.name}.writing"
    if jax.process_index() == 0 and tmp.exists():
        tmp.rmtree()
    multihost_utils.sync_global_devices(f"export_params:clean:{path}")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp, params)
    if jax.process_index() == 0:
        old = path.parent / f".{path.name}.replaced"
        if old.exists():
            old.rmtree()
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            old.rmtree()
    multihost_utils.sync_global_devices(f"export_params:done:{path}")


def saved_steps(workdir: str) -> list[int]:
    """Steps with a checkpoint directory under ``<workdir>/checkpoints`` (complete or not),
    without starting a manager: enough to know whether a run would resume."""
    d = epath.Path(workdir) / CHECKPOINT_DIR
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


class MissingExportError(FileNotFoundError):
    """A params export a job needs does not exist (the message says which and how to make it)."""


def has_export(path: str) -> bool:
    path = epath.Path(path)
    return (path / "_CHECKPOINT_METADATA").exists() or (path / "_METADATA").exists()


def require_export(path: str, what: str, how_to_create: str) -> None:
    """Raises MissingExportError, before any work, if there is no export at ``path``."""
    if not has_export(path):
        raise MissingExportError(f"No {what} export found at {path}; create it with: {how_to_create}")


def load_params(path: str, abstract_params, how_to_create: str = "") -> dict:
    """Restores an export onto ``abstract_params`` (ShapeDtypeStructs with shardings), so an
    export written on one mesh loads onto any other."""
    if not has_export(path):
        hint = f"; create it with: {how_to_create}" if how_to_create else ""
        raise MissingExportError(f"No params export found at {path}{hint}")
    path = _path(path)
    with ocp.StandardCheckpointer() as ckptr:
        # The metadata first: a restore of mismatched arrays fails inside Orbax's threads and
        # leaves them printing tracebacks at exit, after the one clear line.
        try:
            saved = ckptr.metadata(path).item_metadata
        except Exception as e:  # noqa: BLE001 - any failure to read it: the export is damaged
            raise ValueError(f"The export at {path} is unreadable (truncated or partly copied? {type(e).__name__}: "
                             f"{str(e)[:120]}); write it again or point at another export.") from e
        tree = getattr(saved, "tree", saved)
        if not _leaf_layout(tree or {}):  # metadata files cut short read as an empty tree
            raise ValueError(f"The export at {path} is unreadable (truncated or partly copied? its metadata lists "
                             "no arrays); write it again or point at another export.")
        difference = layout_difference({"params": tree}, {"params": abstract_params})
        if difference:
            raise ValueError(f"The export at {path} is of another model than this config's ({difference}); "
                             "point at an export of this preset, or set the preset it was trained with.")
        try:
            return ckptr.restore(path, abstract_params)
        except Exception as e:  # noqa: BLE001 - metadata matched: the array data is damaged
            raise ValueError(f"The export at {path} is unreadable (truncated or partly copied? {type(e).__name__}: "
                             f"{str(e)[:120]}); write it again or point at another export.") from e


def params_digest(params) -> str:
    """SHA-256 over every parameter's bytes in sorted path order (bitwise identity check)."""
    h = hashlib.sha256()
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(arr.tobytes())
    return h.hexdigest()
