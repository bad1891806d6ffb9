"""Host values across the processes of a multi-process run (``jax.distributed``): every
process's rows of different lengths, and JSON-ready objects, gathered to every process. With
one process each is the identity, without a collective."""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils


def gather_rows(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Every process's ``x`` concatenated along ``axis`` in process order; the processes' sizes
    along ``axis`` may differ (the others must agree)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    axis = axis % x.ndim
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(x.shape[axis])))
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, int(sizes.max()) - x.shape[axis])
    parts = np.asarray(multihost_utils.process_allgather(np.pad(x, pad)))  # [n_proc, ...]
    return np.concatenate([np.take(p, np.arange(n), axis=axis) for p, n in zip(parts, sizes)], axis=axis)


def gather_objects(obj) -> list:
    """[process 0's ``obj``, process 1's, ...]: any JSON-serialisable value of each process."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    gathered = gather_rows(data[None, :], axis=1)  # [1, total bytes] in process order
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(data.size)))
    ends = np.cumsum(sizes)
    return [json.loads(gathered[0, e - n:e].tobytes().decode()) for e, n in zip(ends, sizes)]
