"""The device mesh and the one table that maps logical axis names to mesh axes.

Model code names logical axes only (``embed``, ``mlp``, ``heads`` ...). This module is
the only place that knows the mesh axes (``data``, ``fsdp``, ``tensor``):

* ``data``   pure data parallelism: parameters replicated, batch split.
* ``fsdp``   batch split *and* parameters sharded along their ``embed`` axis (ZeRO-3 style);
             XLA inserts the all-gathers.
* ``tensor`` Megatron-style tensor parallelism over heads, MLP width and vocabulary.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The one rules table. A logical name maps to a mesh axis, a tuple of mesh axes, or None
# (replicated). Parameters and activations share names where they share a layout.
RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "layers": None,
    "norm": None,
    # activations
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # KV cache
    "cache_batch": BATCH_AXES,
    "cache_length": None,
    "cache_kv_heads": "tensor",
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def resolve_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Returns (data, fsdp, tensor) sizes whose product is ``num_devices``."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"Mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"Cannot fill mesh {dict(zip(MESH_AXES, sizes))} on {num_devices} devices: "
                f"{num_devices} is not divisible by {known}; change the mesh sizes in the config."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; set one axis to -1 or fix the sizes."
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a (data, fsdp, tensor) mesh; device order follows the physical topology."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_shape(cfg, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
        # Fake CPU devices and odd slices have no topology to follow.
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """Maps logical axis names to a PartitionSpec through ``RULES``.

    With ``shape`` and ``mesh`` given, a mesh axis that does not divide its dimension (or
    that an earlier dimension already uses) is dropped, so the dimension is replicated
    instead of failing: MQA's single KV head on a tensor axis of 4 is the usual case.
    """
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is not None and name not in RULES:
            raise KeyError(f"Logical axis {name!r} has no rule in score_jax.sharding.RULES.")
        rule = RULES.get(name) if name is not None else None
        axes = () if rule is None else ((rule,) if isinstance(rule, str) else tuple(rule))
        kept = []
        for ax in axes:
            if ax in used:
                continue
            if mesh is not None:
                size = mesh.shape[ax]
                if size == 1:
                    continue
                if shape is not None and shape[i] % (size * math.prod(mesh.shape[a] for a in kept)):
                    logging.debug("Replicating dim %d (%s) of %s over %s.", i, name, shape, ax)
                    continue
            kept.append(ax)
        used.update(kept)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*out)


def named(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def tree_shardings(mesh: Mesh, axes_tree: Any, shapes_tree: Any) -> Any:
    """NamedShardings for a pytree, from matching trees of logical names and shapes."""
    return jax.tree.map(
        lambda names, shaped: named(mesh, names, shaped.shape),
        axes_tree, shapes_tree, is_leaf=lambda x: isinstance(x, tuple),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over (data, fsdp), the rest replicated."""
    return named(mesh, ("batch",) + (None,) * (ndim - 1))


def on_mesh(mesh: Mesh, fn: Callable) -> Callable:
    """``fn`` as a callable that calls it inside ``jax.set_mesh(mesh)``, so that ``constrain``
    (and jit's abstract mesh) see ``mesh``: how a jit step is run."""

    def run(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    def lower(*args, **kwargs):  # ahead of time (score_jax.plan): abstract arguments, nothing run
        with jax.set_mesh(mesh):
            return fn.lower(*args, **kwargs)

    run.lower = lower
    return run


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names, under the mesh set by ``jax.set_mesh``.

    Outside a mesh context (plain single-device calls) it is the identity.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))
