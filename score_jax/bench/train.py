"""Benchmark of the SFT train step: ``python -m score_jax.bench.train``.

Prints one JSON object: our tokens/s and model-FLOPs utilisation for the ``bench`` preset at
batch 16 x 256 tokens (f32) with the full optax chain (clip + AdamW), the matmul peak measured
in the same process, and, when torch and transformers are installed, the same step for
transformers' LlamaForCausalLM of the same shape with AdamW; ``ratio`` = ours / transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import jax
import numpy as np

from score_jax import learner, model, optim, sharding
from score_jax.bench import common

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from configs import models as model_presets  # noqa: E402


def train_flops_per_token(cfg: model.ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3 x forward): 6 per matmul
    parameter (the embedding lookup is not a matmul; the output projection is), plus attention
    scores and values, 12 * layers * heads * head_dim * seq_len (no causal discount)."""
    shapes = model.param_shapes(cfg)
    n = model.num_params(cfg) - int(np.prod(shapes["embed"].shape))
    if cfg.tie_embeddings:
        n += int(np.prod(shapes["embed"].shape))  # the tied embedding is the output matmul
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def ours_tokens_per_s(cfg: model.ModelConfig, batch: int, seq_len: int, steps: int) -> float:
    opt = optim.OptimConfig(learning_rate=1e-4, schedule="constant", warmup_steps=0, end_lr_fraction=1.0,
                            b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, clip_norm=1.0,
                            grad_accum_steps=1, max_nonfinite_steps=10)
    tx = optim.make(opt, 1000, model.param_axes(cfg))
    mesh = sharding.make_mesh(sharding.MeshConfig())
    state = learner.init_state(cfg, tx, mesh, jax.random.key(0))
    shapes = {k: jax.ShapeDtypeStruct((batch, seq_len), np.int32) for k in ("tokens", "loss_mask", "valid")}
    step = learner.make_sft_step(cfg, tx, mesh, shapes, loss_chunk=0)  # the whole vocabulary at once
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, cfg.vocab_size, (batch, seq_len), dtype=np.int32),
                "loss_mask": np.ones((batch, seq_len), np.int32),
                "valid": np.ones((batch, seq_len), np.int32)} for _ in range(2)]
    holder = {"state": state, "i": 0}

    def one():
        holder["state"], m = step(holder["state"], batches[holder["i"] % 2])
        holder["i"] += 1
        return m["loss"]

    times = common.time_fn(one, warmup=2, repeats=steps)
    return batch * seq_len / float(np.median(times))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--preset", default="bench")
    p.add_argument("--scan_layers", choices=("preset", "true", "false"), default="preset")
    p.add_argument("--remat", default="preset")
    p.add_argument("--no_reference", action="store_true", help="skip the transformers run")
    args = p.parse_args(argv)

    cfg = model.ModelConfig(**model_presets.get(args.preset).to_dict())
    if args.scan_layers != "preset":
        cfg = dataclasses.replace(cfg, scan_layers=args.scan_layers == "true")
    if args.remat != "preset":
        cfg = dataclasses.replace(cfg, remat=args.remat)
    common.progress("measuring the matmul peak")
    peak = common.matmul_peak_flops()
    common.progress(f"timing our train step ({args.preset}, {args.batch}x{args.seq_len})")
    ours = ours_tokens_per_s(cfg, args.batch, args.seq_len, args.steps)
    fpt = train_flops_per_token(cfg, args.seq_len)
    out = {"benchmark": "sft_train_step", "preset": args.preset, "batch": args.batch,
           "seq_len": args.seq_len, "dtype": cfg.dtype, "scan_layers": cfg.scan_layers, "remat": cfg.remat,
           "devices": jax.device_count(), "backend": jax.default_backend(),
           "tokens_per_s": ours, "model_flops_per_token": fpt, "matmul_peak_flops": peak,
           "mfu": ours * fpt / peak}
    if not args.no_reference and common.torch_available():
        from score_jax.bench import hf_reference
        common.progress("timing transformers' LlamaForCausalLM train step")
        hf = hf_reference.hf_train_tokens_per_s(hf_reference.shape_of(cfg), args.batch, args.seq_len, steps=args.steps)
        out.update(transformers_tokens_per_s=hf, ratio=ours / hf)
    else:
        out.update(transformers_tokens_per_s=None, ratio=None)
    common.print_json(out)


if __name__ == "__main__":
    main()
