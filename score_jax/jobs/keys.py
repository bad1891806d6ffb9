"""Every random key of every run, from one table of purposes.

    root(seed, job, run) = fold_in(fold_in(key(seed), JOBS[job]), run)
    key(root, purpose, i) = fold_in(fold_in(root, PURPOSES[purpose]), i)

``run`` is the run's index in a pipeline of runs that share a seed (``config.run``; the demo
gives each of its runs its own, see score_jax/jobs/demo.py ``run_index``), so two runs never
draw the same keys: Stage II does not replay Stage I's prompt order and samples, and two rows
of the demo's table do not sample identical episodes. ``i`` is the step (sampling), the batch
(evaluation) or the round. Integer seeds for numpy and grain (the data order) are drawn from a
key of the same table (``seed``), so they follow the same rule.
"""

from __future__ import annotations

import jax
import numpy as np

JOBS = {"sft": 1, "stage1": 2, "stage2": 3, "eval": 4}

PURPOSES = {
    "init": 0,  # random parameter init
    "data": 1,  # the order of training examples / prompts
    "sampling": 2,  # RL rollouts, index = step
    "eval": 3,  # evaluation decoding, index = batch
    "scaling": 4,  # the inference-scaling study's samples, index = batch
    "self_samples": 5,  # STaR / Pair-SFT: the model's own episodes on training prompts, index = batch
}


def root(seed: int, job: str, run: int) -> jax.Array:
    """The root key of one run (see the module docstring)."""
    if job not in JOBS:
        raise ValueError(f"No key table entry for job {job!r}; add it to keys.JOBS.")
    if not 0 <= run < 2**31:
        raise ValueError(f"run={run} must be in [0, 2**31).")
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), JOBS[job]), run)


def key(root_key: jax.Array, purpose: str, index: int = 0) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(root_key, PURPOSES[purpose]), index)


def seed(root_key: jax.Array, purpose: str, index: int = 0) -> int:
    """A 31-bit integer seed (numpy, grain) drawn from ``key(root_key, purpose, index)``."""
    bits = np.asarray(jax.random.key_data(key(root_key, purpose, index)), np.uint32)
    return int(bits[-1] & 0x7FFFFFFF)
