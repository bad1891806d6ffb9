"""Benchmark of the two-turn sampler: ``python -m score_jax.bench.sampler``.

Prints one JSON object: our generated tokens/s (both turns counted) for the ``bench`` preset
(f32, prompts of 64 tokens, 128 new tokens per turn, greedy, no stop tokens so every row
decodes all 256 tokens, a 32-token instruction between the turns) at batch 16 and 64; in the
same run transformers' ``generate`` (LlamaForCausalLM of the same shape, KV cache, one turn of
128 new tokens) at the same batch sizes, ``ratio_b<B>`` = ours / transformers; the fraction
of the memory-bandwidth roofline at batch 16 and of the matmul peak at batch 64.

How we run (the defaults; each is a flag): the machine's two cores as two XLA CPU devices and
the sampler tensor-parallel over them (mesh data=1, fsdp=1, tensor=2), and XLA's Eigen
matmuls instead of its YNNPACK fusions (``xla_cpu_experimental_ynn_fusion_type=""``). XLA:CPU
runs a batched attention matmul on one thread, so on one device attention reads the cache at
one core's bandwidth; split over two devices each core reads half the heads. Measured on the
2-core machine, generated tokens/s at batch 16 / 64: one device with YNNPACK (XLA's default)
~280 / ~450 (noisy), one device with Eigen 279 / 456, two devices tensor=2 with YNNPACK
329 / 535, with Eigen 390 / 572 (data=2 instead: 250 / 542).

Roofline: every decode step must read the layer and output-projection weights and the keys
and values of every token already in the context (the filled cache, not the empty slots);
``roofline_fraction_b16`` = that many bytes over ``common.stream_bandwidth_bytes`` (measured
here), divided by our measured time. ``matmul_peak_fraction_b64`` = the model FLOPs of the
call (matmuls and attention over the filled context, prefills included) per second over
``common.matmul_peak_flops`` (measured here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

from score_jax import model, sampler, sharding
from score_jax.bench import common

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from configs import models as model_presets  # noqa: E402


# XLA:CPU compiler option: Eigen matmuls instead of YNNPACK fusions (faster here, see above).
EIGEN_MATMULS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def matmul_params(cfg: model.ModelConfig) -> int:
    """Parameters used as matmul weights per token (layers and the output projection)."""
    shapes = model.param_shapes(cfg)
    n = model.num_params(cfg) - int(np.prod(shapes["embed"].shape))
    return n + (int(np.prod(shapes["embed"].shape)) if cfg.tie_embeddings else 0)


def episode_work(cfg: model.ModelConfig, scfg: sampler.SamplerConfig, rows: int, prompts: int) -> dict:
    """Bytes read by decode steps (weights + filled cache) and model FLOPs of one call in which
    every row decodes every token (no stops) and every prompt is max_prompt_len long."""
    P, N, I, T = scfg.max_prompt_len, scfg.max_new_tokens, scfg.instruction_len, scfg.num_turns
    w = matmul_params(cfg)
    itemsize = np.dtype(cfg.dtype).itemsize
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim  # elements
    attn_per_pair = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # FLOPs per (query, key)
    ctx = []  # context length seen by each decode step
    for t in range(T):
        base = P + t * (N + I)
        ctx += [base + s for s in range(N)]  # the step's input token attends to base + s keys
    ctx = np.asarray(ctx) + 1
    decode_bytes = len(ctx) * w * itemsize + rows * kv_per_token * itemsize * ctx.sum()
    flops = 2.0 * w * rows * len(ctx) + attn_per_pair * rows * ctx.sum()
    flops += 2.0 * w * prompts * P + attn_per_pair * prompts * P * (P + 1) / 2  # prompt prefill
    for t in range(T - 1):  # instruction prefills
        base = P + (t + 1) * N + t * I
        flops += 2.0 * w * rows * I + attn_per_pair * rows * (base * I + I * (I + 1) / 2)
    return {"decode_steps": len(ctx), "decode_bytes": float(decode_bytes), "flops": float(flops),
            "mean_context": float(ctx.mean())}


def ours(cfg, scfg, batch, repeats, mesh_cfg: sharding.MeshConfig, compiler_options=None) -> dict:
    mesh = sharding.make_mesh(mesh_cfg)
    params = model.init_params(cfg, jax.random.key(0), mesh)
    t0 = time.perf_counter()
    s = sampler.Sampler(cfg, scfg, mesh, batch, compiler_options=compiler_options)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (batch, scfg.max_prompt_len), dtype=np.int32)
    lens = np.full((batch,), scfg.max_prompt_len, np.int32)
    instruction = rng.integers(0, cfg.vocab_size, (scfg.instruction_len,), dtype=np.int32)
    out = jax.block_until_ready(s(params, prompts, lens, instruction, jax.random.key(0)))
    first = time.perf_counter() - t0
    steps = np.asarray(out["steps"])
    if (steps != scfg.max_new_tokens).any():
        raise RuntimeError(f"a turn stopped early ({steps}); the benchmark needs full turns")
    times = common.time_fn(lambda: s(params, prompts, lens, instruction, jax.random.key(1)), warmup=0,
                           repeats=repeats)
    best = min(times)
    generated = s.rows * scfg.num_turns * scfg.max_new_tokens
    return {"tokens_per_s": generated / best, "seconds": best, "all_seconds": times,
            "compile_and_first_call_s": first, "cache_bytes": s.cache_bytes()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="bench")
    p.add_argument("--batches", default="16,64")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--instruction_len", type=int, default=32)
    p.add_argument("--chunk_len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--hf_repeats", type=int, default=2)
    p.add_argument("--no_reference", action="store_true", help="skip the transformers runs")
    p.add_argument("--host_devices", type=int, default=2,
                   help="XLA CPU devices to split the cores into (set before JAX starts)")
    p.add_argument("--mesh", default="1,1,2", help="data,fsdp,tensor sizes over those devices")
    p.add_argument("--xla_options", default=json.dumps(EIGEN_MATMULS),
                   help="JSON dict of XLA compiler options for the sampler program")
    args = p.parse_args(argv)
    if args.host_devices > 1:  # read when JAX starts its CPU backend, i.e. at the first device query
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.host_devices}")
    if jax.device_count() != args.host_devices:
        raise RuntimeError(f"asked for {args.host_devices} host devices, JAX has {jax.device_count()}.")
    mesh_cfg = sharding.MeshConfig(*(int(v) for v in args.mesh.split(",")))
    xla_options = json.loads(args.xla_options) or None

    cfg = model.ModelConfig(**model_presets.get(args.preset).to_dict())
    scfg = sampler.SamplerConfig(max_prompt_len=args.prompt_len, max_new_tokens=args.new_tokens,
                                 instruction_len=args.instruction_len, num_turns=2, temperature=0.0,
                                 chunk_len=args.chunk_len)
    batches = [int(b) for b in args.batches.split(",")]
    common.progress("measuring the streaming bandwidth and the matmul peak")
    bandwidth, peak = common.stream_bandwidth_bytes(), common.matmul_peak_flops()
    out = {"benchmark": "sampler", "preset": args.preset, "dtype": cfg.dtype, "devices": jax.device_count(),
           "mesh": dict(zip(sharding.MESH_AXES, sharding.resolve_shape(mesh_cfg, jax.device_count()))),
           "xla_options": xla_options or {}, "cpu_count": os.cpu_count(),
           "backend": jax.default_backend(), "sampler_config": dataclasses.asdict(scfg),
           "stream_bandwidth_bytes": bandwidth, "matmul_peak_flops": peak}
    for b in batches:
        common.progress(f"timing our sampler at batch {b}")
        r = ours(cfg, scfg, b, args.repeats, mesh_cfg, xla_options)
        work = episode_work(cfg, scfg, b, b)
        out[f"tokens_per_s_b{b}"] = r["tokens_per_s"]
        out[f"ours_b{b}"] = dict(r, **work)
        out[f"roofline_fraction_b{b}"] = work["decode_bytes"] / bandwidth / r["seconds"]
        out[f"matmul_peak_fraction_b{b}"] = work["flops"] / r["seconds"] / peak
    if not args.no_reference and common.torch_available():
        from score_jax.bench import hf_reference
        shape = hf_reference.shape_of(cfg)
        for b in batches:
            common.progress(f"timing transformers' generate at batch {b}")
            hf = hf_reference.hf_generate_tokens_per_s(shape, b, args.prompt_len, args.new_tokens,
                                                       repeats=args.hf_repeats)
            out[f"transformers_tokens_per_s_b{b}"] = hf
            out[f"ratio_b{b}"] = out[f"tokens_per_s_b{b}"] / hf
    common.print_json(out)


if __name__ == "__main__":
    main()
