"""Where a run reports: TensorBoard event files, a console progress line, JSON files."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

import jax
import numpy as np
from etils import epath


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


METRICS_FILE = "metrics.jsonl"


class Writer:
    """TensorBoard scalars under ``<workdir>/tensorboard`` and the same values as one JSON line
    per logged step in ``<workdir>/metrics.jsonl`` (process 0 only), plus a console line:
    step, the values shown, steps/s, ETA. A resumed run (``first_step`` > 0) first drops the
    JSON lines of steps after ``first_step``, which it is about to run again."""

    def __init__(self, workdir: str, total_steps: int, first_step: int = 0, stream=None):
        self.total_steps = total_steps
        self.stream = stream  # None: sys.stdout at the time of each line (redirectable)
        self._t0, self._step0 = time.perf_counter(), first_step
        self._tb = None
        self._jsonl = epath.Path(workdir) / METRICS_FILE
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 writes
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)
            if self._jsonl.exists():
                keep = [r for r in read_jsonl(str(self._jsonl)) if r.get("step", first_step + 1) <= first_step]
                self._jsonl.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))

    def scalars(self, step: int, values: dict) -> None:
        if self._tb is None:
            return
        row = {"step": step}
        for k, v in values.items():
            v = float(np.asarray(v))
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)
                row[k] = v
        line = json.dumps(row, sort_keys=True) + "\n"
        if "://" in str(self._jsonl):  # object stores cannot append: rewrite the (small) file
            old = self._jsonl.read_text() if self._jsonl.exists() else ""
            self._jsonl.write_text(old + line)
        else:
            with open(self._jsonl, "a") as f:
                f.write(line)

    def progress(self, step: int, values: dict) -> None:
        """Prints one progress line: the values, steps/s since the first step, and the ETA."""
        elapsed = time.perf_counter() - self._t0
        done = step - self._step0
        rate = done / elapsed if elapsed > 0 else float("nan")
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        shown = " | ".join(f"{k} {float(np.asarray(v)):.4g}" for k, v in values.items())
        if jax.process_index() == 0:
            print(f"step {step}/{self.total_steps} | {shown} | {rate:.2f} steps/s | "
                  f"ETA {_fmt_duration(eta)}", file=self.stream or sys.stdout, flush=True)

    def close(self):
        if self._tb is not None:
            self._tb.close()


def read_json(path: str):
    return json.loads(epath.Path(path).read_text())


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSON-lines file (metrics.jsonl, samples.jsonl); [] if it does not exist. A
    line that is not a JSON object (the one being written when a process died or the disk
    filled) is skipped with a warning: a log must never stop a run from resuming."""
    path = epath.Path(path)
    if not path.exists():
        return []
    rows = []
    for n, ln in enumerate(path.read_bytes().decode(errors="replace").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            logging.getLogger(__name__).warning("%s line %d is not a JSON object (cut short?); skipped.", path, n)
    return rows


def write_json(path: str, obj) -> None:
    """JSON write by process 0, local or gs://. Locally atomic (write then rename), so a
    reader never sees half a file; object stores replace whole objects anyway."""
    if jax.process_index() != 0:
        return
    text = json.dumps(obj, indent=2, sort_keys=True, default=_jsonable)
    path = epath.Path(path)
    if "://" in str(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        return np.asarray(x).tolist()
    raise TypeError(f"Not JSON serialisable: {type(x)}")
