"""What every benchmark shares: timing, hardware ceilings, JSON out.

The benchmark model shape is the `bench` preset of configs/models.py.

Benchmarks print exactly one JSON object on stdout (`print_json`); progress goes to stderr.
`matmul_peak_flops` and `stream_bandwidth_bytes` measure what this process can reach on the
default JAX device, so a benchmark can report its model FLOP/s as a fraction of an achievable
ceiling for this machine rather than of a datasheet number.
"""
import importlib.util
import json
import math
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

def time_fn(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5) -> list:
    """Calls `fn()` `warmup` times untimed, then `repeats` times timed.

    Each call is waited on (`jax.block_until_ready` on its result) before its clock stops,
    so asynchronous dispatch is not mistaken for speed. Returns `repeats` wall-clock
    durations in seconds, in call order.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"time_fn needs warmup >= 0 and repeats >= 1, got {warmup}, {repeats}.")
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def matmul_peak_flops(dtype=jnp.float32, n: int = 1024, chain: int = 4, repeats: int = 5) -> float:
    """Best dense-matmul FLOP/s reached on the default device, as a float.

    Times one jitted program of `chain` dependent (n, n) @ (n, n) products (2 n^3 FLOPs each;
    dependent so XLA cannot drop or merge them), warmed up, best of `repeats`. The defaults
    take about a second on two CPU cores; raise `n` on an accelerator.
    """
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    # Scaled so that repeated products keep their magnitude instead of overflowing.
    b = (jax.random.normal(key_b, (n, n), jnp.float32) / math.sqrt(n)).astype(dtype)

    @jax.jit
    def matmul_chain(x, w):
        for _ in range(chain):
            x = x @ w
        return x

    best = min(time_fn(lambda: matmul_chain(a, b), warmup=1, repeats=repeats))
    return 2.0 * n**3 * chain / best


def stream_bandwidth_bytes(n: int = 1 << 25, dtype=jnp.float32, repeats: int = 10) -> float:
    """Best memory-streaming bandwidth on the default device, in bytes/s.

    Times a jitted scale-and-add (`x = x / 2 + 1`, stable under repetition) over `n`
    elements, far larger than CPU caches at the default (128 MiB for float32), and counts
    one read and one write of the array per call; best of `repeats` after a warm-up. The
    input buffer is donated and updated in place: a fresh 128 MiB output per call would
    measure page faults (about 6x slower on CPU), not streaming.
    """
    scale = jax.jit(lambda v: v * 0.5 + 1, donate_argnums=0)
    state = [jnp.ones((n,), dtype)]
    nbytes = state[0].nbytes

    def step():
        state[0] = scale(state[0])
        return state[0]

    best = min(time_fn(step, warmup=1, repeats=repeats))
    return 2.0 * nbytes / best


def print_json(obj: dict) -> None:
    """Writes `obj` as one JSON line on stdout; benchmarks print nothing else there.

    Raises ValueError for a non-dict or for NaN/inf values, which would not be valid JSON.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"print_json takes a dict (one JSON object), got {type(obj).__name__}.")
    line = json.dumps(obj, sort_keys=True, allow_nan=False)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def progress(message: str) -> None:
    """Progress for humans: stderr, so stdout stays one JSON object."""
    print(message, file=sys.stderr, flush=True)


def torch_available() -> bool:
    """True if PyTorch can be imported (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None
