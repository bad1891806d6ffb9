"""Will a job fit a TPU slice? Compiles every jitted program of the job ahead of time for a real
TPU topology, on any machine (no TPU, nothing allocated), and prints one JSON object.

    python -m score_jax.plan --config=configs/stage2.py:gemma2-2b --topology=v5e-8 [--config.x=...]

``--topology`` is a slice name (``v5e-8``, ``v5e-32``, ``v5p-16``, ``v6e-8``: v5p counts
TensorCores, two per chip; v5e and v6e count chips) or JAX's form (``v5e:4x8``). The job's mesh
(``config.mesh``) is laid over the slice's chips. Programs: the train step (sft); the sampler,
the reference's log-probs and the update step (stage1 / stage2); the sampler (eval). For each:
per-chip bytes of arguments, outputs, temporaries and its peak; for the job: the bytes that
stay resident between programs (train state, reference, KV cache), the peak against the chip's
HBM and ``fits``; model FLOPs per step and a roofline estimate of step time and MFU from the
compiled cost analysis; compile seconds. When it does not fit, ``advice`` says what to change.

Needs libtpu (requirements-plan.txt; never needed for training on CPU or GPU). On a machine
without TPUs install it beside the environment, not into it (there every JAX process would try
to start a TPU), and run with ``PYTHONPATH=<that dir> JAX_PLATFORMS=cpu``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time

from absl import app, flags

from score_jax import main as main_lib

_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e-8, v5e-32, v5p-16, v6e-8, or v5e:2x4.")
_SKIP = flags.DEFINE_list("skip", [], "Programs not to compile (e.g. sampler: its compile is the slow one, while "
                          "the update step's fit is being tuned); their resident bytes still count, and `fits` "
                          "is then null unless a compiled program does not fit.")
PROGRAMS = {"sft": ("train_step",), "stage1": ("sampler", "reference_logprobs", "update_step"),
            "stage2": ("sampler", "reference_logprobs", "update_step"), "eval": ("sampler",)}


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    peak_flops: float  # bf16 dense, per chip
    hbm_bandwidth: float  # bytes/s per chip
    dims: int  # torus dimensions of the slice's chip grid
    cores_per_chip: int  # what the slice name counts per chip


# Public Cloud TPU figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm).
CHIPS = {"v5e": Chip(16 * 2**30, 197e12, 819e9, 2, 1), "v5p": Chip(95 * 2**30, 459e12, 2765e9, 3, 2),
         "v6e": Chip(32 * 2**30, 918e12, 1640e9, 2, 1)}
# Chip grids of the slice sizes Cloud TPU sells.
GRIDS_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
GRIDS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8"}


class PlanError(ValueError):
    pass


def parse_topology(name: str) -> tuple[str, str, int]:
    """(family, JAX topology name, chips) of ``v5e-8`` / ``v5p-16`` / ``v5e:2x4``."""
    m = re.fullmatch(r"(v5e|v5p|v6e)[-:](.+)", name.strip().lower())
    if m:
        family, rest = m.groups()
        chip = CHIPS[family]
        if re.fullmatch(r"\d+(x\d+)+", rest):
            chips = math.prod(int(x) for x in rest.split("x"))
            if rest.count("x") + 1 != chip.dims:
                raise PlanError(f"--topology={name}: a {family} chip grid has {chip.dims} dimensions.")
            return family, f"{family}:{rest}", chips
        if rest.isdigit() and name[3] == "-":
            cores = int(rest)
            chips, grids = cores // chip.cores_per_chip, GRIDS_3D if chip.dims == 3 else GRIDS_2D
            if cores % chip.cores_per_chip == 0 and chips in grids:
                return family, f"{family}:{grids[chips]}", chips
            sizes = ", ".join(f"{family}-{c * chip.cores_per_chip}" for c in grids)
            raise PlanError(f"--topology={name} is not a {family} slice size; choose one of {sizes}.")
    raise PlanError(f"Unknown --topology={name!r}; use a slice name such as v5e-8, v5e-32, v5p-16, v6e-8, or "
                    "JAX's form such as v5e:2x4.")


def _devices(jax_name: str):
    import os
    # Compiling needs no chip: without the lock a plan runs beside another plan or a training job.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=jax_name).devices
    except Exception as e:  # noqa: BLE001 - libtpu missing or refusing: one line either way
        text = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        if "support not installed" in text or "Unknown backend" in text or "No module named" in text \
                or "not found" in text.lower():
            raise PlanError(f"Compiling for TPU needs libtpu ({text}); install it beside this environment with "
                            "`pip install --no-deps --target DIR -r requirements-plan.txt` and run with "
                            "PYTHONPATH=DIR JAX_PLATFORMS=cpu (only the plan needs it).") from e
        raise PlanError(f"libtpu could not describe topology {jax_name}: {text}") from e


def _per_device_bytes(tree) -> int:
    import jax
    import numpy as np
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def _abstract(tree, shardings):
    import jax
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def _compile(name: str, fn, args, chip: Chip, out: dict):
    t0 = time.perf_counter()
    print(f"plan: compiling {name}...", file=sys.stderr, flush=True)
    lowered = fn.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - XLA refuses a program whose temporaries exceed HBM
        text = str(e)
        if "HbmOom" not in text and "RESOURCE_EXHAUSTED" not in text:
            raise
        m = re.search(r"HLO temporaries \(([\d.]+)([KMGTP]?)\)", text)
        temp = int(float(m.group(1)) * 1024 ** "_KMGTP".index(m.group(2) or "_")) if m else chip.hbm_bytes + 1
        out[name] = {"argument_bytes": 0, "output_bytes": 0, "alias_bytes": 0, "temp_bytes": temp,
                     "peak_bytes": temp, "flops": 0.0, "bytes_accessed": 0.0, "roofline_seconds": 0.0,
                     "compile_seconds": round(time.perf_counter() - t0, 2),
                     "compiler_out_of_memory": text.splitlines()[0][:300]}
        return None
    seconds = time.perf_counter() - t0
    print(f"plan: {name} compiled in {seconds:.0f} s", file=sys.stderr, flush=True)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
    arg, res, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    out[name] = {"argument_bytes": arg, "output_bytes": res, "alias_bytes": alias, "temp_bytes": temp,
                 "peak_bytes": arg + res - alias + temp, "flops": flops, "bytes_accessed": accessed,
                 "roofline_seconds": max(flops / chip.peak_flops, accessed / chip.hbm_bandwidth),
                 "compile_seconds": round(seconds, 2)}
    return compiled


def _sampler_config(sampling, num_turns: int, task):
    """The job's SamplerConfig without a tokenizer: the correction instruction's length is
    bounded by its UTF-8 bytes (every token covers at least one byte), the stop and pad ids do
    not change a program's shapes."""
    from score_jax import chat
    from score_jax.jobs import inputs
    t = chat.get(task.chat_template)
    text = t.after_model_end + t.user_start + t._text(task.correction) + t.user_end + t.model_start
    return inputs.sampler_program(sampling, num_turns, len(text.encode()), stop_ids=(0,), pad_id=0)


def _sampler_programs(cfg, scfg, mesh, batch: int, chip: Chip, out: dict, skip=()) -> dict:
    import jax
    import jax.numpy as jnp
    from score_jax import learner, sampler as sampler_lib
    smp = sampler_lib.Sampler(cfg.model, scfg, mesh, batch)
    params = learner.abstract_params(cfg.model, mesh)
    cache = _abstract(smp._cache_shapes, smp.cache_shardings)
    s = jax.ShapeDtypeStruct
    args = (params, s((batch, scfg.max_prompt_len), jnp.int32), s((batch,), jnp.int32),
            s((scfg.instruction_len,), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)), cache)
    if "sampler" not in skip:
        _compile("sampler", smp, args, chip, out)
    tokens = smp.rows * (scfg.max_prompt_len + scfg.num_turns * (scfg.max_new_tokens + scfg.instruction_len))
    return {"kv_cache": _per_device_bytes(cache), "tokens": tokens}


def plan(cfg, topology: str, skip=()) -> dict:
    import jax
    import jax.numpy as jnp
    from score_jax import learner, model, optim, sharding
    family, jax_name, chips = parse_topology(topology)
    chip = CHIPS[family]
    unknown = sorted(set(skip) - set(PROGRAMS.get(cfg.job, ())))
    if unknown:
        raise PlanError(f"--skip={','.join(unknown)}: the {cfg.job} job's programs are "
                        f"{', '.join(PROGRAMS.get(cfg.job, ()))}.")
    devices = _devices(jax_name)
    try:
        mesh = sharding.make_mesh(cfg.mesh if hasattr(cfg, "mesh") else cfg.eval.mesh, devices=devices)
    except ValueError as e:
        raise PlanError(f"The config's mesh {dataclasses.asdict(cfg.mesh)} does not fit {topology}'s {chips} chips "
                        f"({e}); set --config.mesh.data / fsdp / tensor to a product of {chips}.") from None
    programs: dict = {}
    resident: dict = {}
    n_params = model.num_params(cfg.model)
    model_flops = 0.0
    if cfg.job in ("sft", "stage1", "stage2"):
        tx = optim.make(cfg.optim, cfg.total_steps, model.param_axes(cfg.model))
        state = learner.abstract_state(cfg.model, tx, mesh)
        resident["train_state"] = _per_device_bytes(state)
    if cfg.job == "sft":
        shapes = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.data.seq_len), jnp.int32)
                  for k in ("tokens", "loss_mask", "valid")}
        step = learner.make_sft_step(cfg.model, tx, mesh, shapes, cfg.loss_chunk)
        if "train_step" not in skip:
            _compile("train_step", step, (state, _abstract(shapes, learner.batch_shardings(mesh, shapes))), chip,
                     programs)
        model_flops = 6.0 * n_params * cfg.batch_size * cfg.data.seq_len
    elif cfg.job in ("stage1", "stage2"):
        rl = cfg.rl
        scfg = _sampler_config(rl.sampling, 2, cfg.task)
        sampled = _sampler_programs(cfg, scfg, mesh, cfg.batch_size, chip, programs, skip)
        resident["kv_cache"] = sampled["kv_cache"]
        resident["reference"] = _per_device_bytes(learner.abstract_params(cfg.model, mesh))
        shapes = learner.rl_batch_shapes(cfg.batch_size * rl.sampling.samples_per_prompt, scfg.episode_len(),
                                         rl.sampling.max_new_tokens)
        batch = _abstract(shapes, learner.batch_shardings(mesh, shapes))
        ref = learner.make_reference_logprobs(cfg.model, mesh, shapes, rl.sampling.max_new_tokens, cfg.loss_chunk)
        ref_args = (learner.abstract_params(cfg.model, mesh), {k: batch[k] for k in learner.REF_KEYS})
        if "reference_logprobs" not in skip:
            _compile("reference_logprobs", ref, ref_args, chip, programs)
        lp_sharding = sharding.batch_sharding(mesh, 2)
        lp = jax.ShapeDtypeStruct(shapes["mask1"].shape, jnp.float32, sharding=lp_sharding)
        stage = int(cfg.job[-1])
        step = learner.make_rl_step(cfg.model, rl, tx, mesh, shapes, stage, cfg.loss_chunk)
        if "update_step" not in skip:
            _compile("update_step", step, (state, batch, lp, lp), chip, programs)
        episode_tokens = shapes["tokens"].shape[0] * shapes["tokens"].shape[1]
        # Sampling (forward), the reference's forward, the policy's forward and backward.
        model_flops = 2.0 * n_params * sampled["tokens"] + 2.0 * n_params * episode_tokens \
            + 6.0 * n_params * episode_tokens
    elif cfg.job == "eval":
        ev = cfg.eval
        scfg = _sampler_config(ev.sampling, ev.num_attempts, cfg.task)
        sampled = _sampler_programs(cfg, scfg, mesh, ev.batch_size, chip, programs, skip)
        resident["kv_cache"] = sampled["kv_cache"]
        resident["params"] = _per_device_bytes(learner.abstract_params(cfg.model, mesh))
        model_flops = 2.0 * n_params * sampled["tokens"]
    else:
        raise PlanError(f"The plan covers the sft, stage1, stage2 and eval jobs, not {cfg.job!r}.")

    # A program's own arguments are resident buffers it reads (the train state, the reference,
    # the cache); the job's peak is the largest program's peak plus what stays resident and is
    # not among its arguments.
    total_resident = sum(resident.values())
    peak = max((p["peak_bytes"] + max(0, total_resident - p["argument_bytes"]) for p in programs.values()),
               default=total_resident)
    # A program XLA refused to compile (out of memory) or skipped has no cost analysis: the step
    # time and MFU are then unknown, not the other programs' alone.
    failed = bool(skip) or any("compiler_out_of_memory" in p for p in programs.values())
    step_seconds = None if failed else sum(p["roofline_seconds"] for p in programs.values())
    # With programs skipped, "fits" is known only when a compiled one does not fit.
    fits = False if peak > chip.hbm_bytes else (None if skip else True)
    out = {"job": cfg.job, "model_preset": cfg.model_preset, "num_params": n_params,
           "topology": {"name": topology, "jax": jax_name, "chips": chips,
                        "processes": len({d.process_index for d in devices}), "device_kind": devices[0].device_kind,
                        "hbm_bytes_per_chip": chip.hbm_bytes},
           "mesh": dict(mesh.shape), "programs": programs, "resident_bytes": resident,
           "peak_bytes": peak, "hbm_bytes": chip.hbm_bytes, "fits": fits, "skipped": sorted(skip),
           "model_flops_per_step": model_flops, "step_seconds_roofline": step_seconds,
           "mfu_roofline": (model_flops / (step_seconds * chip.peak_flops * chips) if step_seconds else
                            None if failed else 0.0)}
    if fits is False:
        out["advice"] = advice(cfg, programs, resident, chip.hbm_bytes)
    return out


def advice(cfg, programs: dict, resident: dict, hbm: int) -> str:
    """One line: which program does not fit and what to change."""
    gib = 2.0**30
    if not programs:  # every program skipped: the resident state alone is too large
        return (f"the resident state needs {sum(resident.values()) / gib:.1f} GiB per chip of {hbm / gib:.0f} GiB: "
                "raise --config.mesh.fsdp or use a larger slice.")
    worst = max(programs, key=lambda k: programs[k]["peak_bytes"])
    p = programs[worst]
    parts = []
    state = resident.get("train_state", 0) + resident.get("reference", 0) + resident.get("params", 0)
    if state > 0.5 * hbm:
        parts.append(f"weights and optimiser state take {state / gib:.1f} GiB per chip: raise --config.mesh.fsdp")
    if p["temp_bytes"] > 0.25 * hbm:
        if getattr(cfg, "model", None) is not None and cfg.model.remat == "none" and worst != "sampler":
            parts.append("set --config.model.remat=full")
        if getattr(cfg, "loss_chunk", 1) == 0 and worst != "sampler":
            parts.append("set --config.loss_chunk=256 (vocabulary projection in chunks)")
        parts.append("lower --config.batch_size (prompts per step) and raise --config.optim.grad_accum_steps"
                     if worst != "sampler" else "lower the prompts per sampler call")
    if resident.get("kv_cache", 0) > 0.25 * hbm:
        parts.append(f"the KV cache takes {resident['kv_cache'] / gib:.1f} GiB per chip: lower max_new_tokens, "
                     "samples_per_prompt or the batch")
    need = p["peak_bytes"] + max(0, sum(resident.values()) - p["argument_bytes"])
    return (f"{worst} needs {need / gib:.1f} GiB per chip of {hbm / gib:.0f} GiB: "
            + ("; ".join(parts) or "raise --config.mesh.fsdp or use a larger slice") + ".")


def main(argv):
    del argv
    config = main_lib._CONFIG.value
    if config is None or not _TOPOLOGY.value:
        raise app.UsageError("--config and --topology are required, e.g. --config=configs/stage2.py:gemma2-2b "
                             "--topology=v5e-8")
    builders = {"sft": main_lib._sft_config, "stage1": main_lib._rl_config, "stage2": main_lib._rl_config,
                "eval": main_lib._eval_config}
    if config.job not in builders:
        raise main_lib.ConfigError(f"The plan covers the jobs {', '.join(builders)}, not {config.job!r}.")
    cfg = builders[config.job](config)
    try:
        out = plan(cfg, _TOPOLOGY.value, tuple(_SKIP.value))
    except PlanError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(out, indent=2))
    if out["fits"] is False:
        print(f"Does not fit: {out['advice']}", file=sys.stderr)
    elif out["fits"] is None:
        print(f"Fits as far as compiled; not compiled: {', '.join(out['skipped'])}.", file=sys.stderr)


def entry():
    try:
        app.run(main, flags_parser=main_lib._parse_flags)
    except main_lib.ConfigError as e:
        main_lib._fail(str(e))


if __name__ == "__main__":
    entry()
