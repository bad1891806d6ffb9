"""Benchmark of the SCoRe update: ``python -m score_jax.bench.learner``.

Prints one JSON object:
  * the RL update (the reference's forward over both turns, then the policy's forward and
    backward and one clip + AdamW update: ``learner.make_reference_logprobs`` +
    ``learner.make_rl_step``, Stage II) for the ``bench`` preset (f32) at 16 episodes of
    64 prompt + 2 x 128 response tokens: ``tokens_per_s`` and ``mfu`` = model FLOP/s over the
    matmul peak measured in the same run (``common.matmul_peak_flops``, before and after the
    update; the higher of the two);
  * a real toy RL step (``score_jax.jobs.rl`` stage 2 on the toy task for a few steps, from a
    randomly initialised toy model, so every attempt runs to max_new_tokens): ``toy_step`` =
    per peer (``--toy_peers``: CPU devices and optionally prompt / new-token lengths and prompts
    per step; default the toy lengths before toy_arithmetic 2.0.0, 24 + 72, against today's),
    each in its own process in this run, the mean seconds of sampling, rewards and learning
    from the job's own metrics, whole-step ``episodes_per_s``, and the ``speedup`` over the
    first peer.

Model FLOPs count matmuls and attention (no causal discount): per token, the policy's forward
and backward cost 6 x (matmul parameters) + 12 x layers x heads x head_dim x T and the
reference's forward a third of that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import numpy as np

from score_jax import checkpoints, learner, model, optim, settings, sharding
from score_jax.bench import common
from score_jax.bench import train as train_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from configs import models as model_presets  # noqa: E402


def rl_config(k: int) -> settings.RLConfig:
    sampling = settings.SamplingConfig(max_prompt_len=64, max_new_tokens=128, temperature=1.0, top_k=0, top_p=1.0,
                                       samples_per_prompt=k, chunk_len=64)
    return settings.RLConfig(schedule="2", schedule_block_steps=0, alpha=10.0, shaping="difference", beta1=0.01,
                             beta2=0.1, baseline="loo", kl_estimator="k2", kl_in_reward=False, normalize="constant",
                             sampling=sampling, reference="-", keep_best=False, samples_every=0, samples_per_write=0)


def update_tokens_per_s(cfg: model.ModelConfig, episodes: int, prompt: int, new: int, steps: int) -> dict:
    """Times reference forward + policy update over ``episodes`` packed episodes."""
    T = prompt + 2 * new
    rl = rl_config(k=4)
    opt = optim.OptimConfig(learning_rate=1e-5, schedule="constant", warmup_steps=0, end_lr_fraction=1.0, b1=0.9,
                            b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0, grad_accum_steps=1,
                            max_nonfinite_steps=10)
    tx = optim.make(opt, 1000, model.param_axes(cfg))
    mesh = sharding.make_mesh(sharding.MeshConfig())
    shapes = learner.rl_batch_shapes(episodes, T, new)
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, cfg.vocab_size, (episodes, T), dtype=np.int32),
        "valid": np.ones((episodes, T), bool),
        "start1": np.full((episodes,), prompt, np.int32), "start2": np.full((episodes,), prompt + new, np.int32),
        "mask1": np.ones((episodes, new), bool), "mask2": np.ones((episodes, new), bool),
        "logp1_sampler": np.zeros((episodes, new), np.float32), "logp2_sampler": np.zeros((episodes, new), np.float32),
        "truncated1": np.ones((episodes,), bool), "truncated2": np.ones((episodes,), bool),
        "r1": rng.integers(0, 2, episodes).astype(np.float32), "r2": rng.integers(0, 2, episodes).astype(np.float32),
        "edit_ratio": np.zeros((episodes,), np.float32),
    }
    batch = {k: jax.device_put(v, learner.batch_shardings(mesh, shapes)[k]) for k, v in batch.items()}
    params = model.init_params(cfg, jax.random.key(0), mesh)
    ref_params = model.init_params(cfg, jax.random.key(1), mesh)
    state = learner.init_state(cfg, tx, mesh, jax.random.key(0), params)
    ref = learner.make_reference_logprobs(cfg, mesh, shapes, new, loss_chunk=0)
    step = learner.make_rl_step(cfg, rl, tx, mesh, shapes, stage=2, loss_chunk=0)
    holder = {"state": state}

    def one():
        lp = ref(ref_params, batch)
        holder["state"], m = step(holder["state"], batch, *lp)
        return m["loss"]

    times = common.time_fn(one, warmup=2, repeats=steps)
    policy = train_bench.train_flops_per_token(cfg, T)
    flops_per_token = policy * 4 / 3  # + the reference forward (a third of forward + backward)
    tps = episodes * T / float(np.median(times))
    return {"tokens_per_s": tps, "seconds_per_update": float(np.median(times)), "all_seconds": times,
            "model_flops_per_token": flops_per_token, "tokens_per_update": episodes * T}


def toy_step_split(steps: int, prompt_len: int = 0, new_tokens: int = 0, batch: int = 0) -> dict:
    """Runs the real stage2 job on the toy task for ``steps`` steps in this process (its devices);
    mean time split per step and whole-step episodes per second. Nonzero ``prompt_len``,
    ``new_tokens`` (rl.sampling's) and ``batch`` (prompts per step) replace the toy config's."""
    from configs import stage2 as stage2_config
    from score_jax import main as main_lib
    from score_jax.jobs import rl

    with tempfile.TemporaryDirectory() as tmp:
        cd = stage2_config.get_config("toy")
        with cd.unlocked():
            cd.data.data_dir = os.path.join(tmp, "tfds")
            cd.total_steps, cd.log_every = steps, 1
            cd.checkpoint.every_steps = 0
            cd.rl.keep_best, cd.rl.samples_every = False, 0
            cd.rl.reference = os.path.join(tmp, "base", "export")
            cd.init_from = ""  # the policy starts as the reference
            cd.compilation_cache_dir = ""
            if prompt_len:
                cd.rl.sampling.max_prompt_len = prompt_len
            if new_tokens:
                cd.rl.sampling.max_new_tokens = new_tokens
            if batch:
                cd.batch_size = batch
        cfg = main_lib.build(settings.RLTrainConfig, cd)
        mesh = sharding.make_mesh(cfg.mesh)
        checkpoints.export_params(cfg.rl.reference, model.init_params(cfg.model, jax.random.key(0), mesh))
        rl.run(cfg, os.path.join(tmp, "run"))
        with open(os.path.join(tmp, "run", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f][1:]  # the first step includes compilation
    split = {k: float(np.mean([r[k] for r in rows])) for k in ("time_sample", "time_reward", "time_learn")}
    total = sum(split.values())
    rows_per_step = cfg.batch_size * cfg.rl.sampling.samples_per_prompt
    return {"seconds": split, "fraction": {k: v / total for k, v in split.items()}, "steps_timed": len(rows),
            "rows_per_step": rows_per_step, "episodes_per_s": rows_per_step / total, "devices": jax.device_count(),
            "max_prompt_len": cfg.rl.sampling.max_prompt_len, "max_new_tokens": cfg.rl.sampling.max_new_tokens}


def toy_step_peers(steps: int, peers: str) -> dict:
    """``toy_step_split`` in one subprocess per peer, one after the other in this run. ``peers``:
    comma-separated ``devices[:prompt_len:new_tokens[:batch]]`` (0 = the toy config's value),
    e.g. ``1,2`` (CPU device counts) or ``1:24:72,1`` (the toy lengths before toy 2.0.0, then now).
    ``speedup`` is each peer's episodes per second over the first's."""
    out = {}
    for i, peer in enumerate(peers.split(",")):
        n, *rest = (int(v) for v in peer.split(":"))
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        env = dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={n}".strip())
        shape = [f"--toy_{k}={v}" for k, v in zip(("prompt_len", "new_tokens", "batch"), rest)]
        p = subprocess.run([sys.executable, "-m", "score_jax.bench.learner", "--toy_only", f"--toy_steps={steps}",
                            *shape], env=env, capture_output=True, text=True, check=False)
        if p.returncode:
            raise RuntimeError(f"toy step peer {peer} failed:\n{p.stderr[-2000:]}")
        out[f"peer{i}_{peer}"] = json.loads(p.stdout)  # the index: a peer may be repeated (alternation)
    first = next(iter(out.values()))["episodes_per_s"]
    out["speedup"] = {k: v["episodes_per_s"] / first for k, v in out.items()}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="bench")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--toy_steps", type=int, default=6)
    p.add_argument("--toy_peers", default="1:24:72,1",
                   help="toy-step peers, devices[:prompt_len:new_tokens[:batch]] each (see toy_step_peers)")
    p.add_argument("--toy_only", action="store_true", help="only the toy step, in this process (JSON)")
    p.add_argument("--toy_prompt_len", type=int, default=0)
    p.add_argument("--toy_new_tokens", type=int, default=0)
    p.add_argument("--toy_batch", type=int, default=0)
    args = p.parse_args(argv)
    if args.toy_only:
        with contextlib.redirect_stdout(sys.stderr):
            split = toy_step_split(args.toy_steps, args.toy_prompt_len, args.toy_new_tokens, args.toy_batch)
        common.print_json(split)
        return
    cfg = model.ModelConfig(**model_presets.get(args.preset).to_dict())
    common.progress("measuring the matmul peak")
    peak = common.matmul_peak_flops()
    common.progress(f"timing the RL update ({args.preset}, {args.episodes} x {args.prompt_len}+2x{args.new_tokens})")
    upd = update_tokens_per_s(cfg, args.episodes, args.prompt_len, args.new_tokens, args.steps)
    # Measured again after the update: on a shared machine one measurement can land in a busy
    # moment, and a low peak would flatter the MFU. The higher of the two is the ceiling.
    peaks = [peak, common.matmul_peak_flops()]
    peak = max(peaks)
    out = {"benchmark": "rl_update", "preset": args.preset, "dtype": cfg.dtype, "episodes": args.episodes,
           "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "devices": jax.device_count(),
           "backend": jax.default_backend(), "matmul_peak_flops": peak, "matmul_peak_measurements": peaks, **upd,
           "mfu": upd["tokens_per_s"] * upd["model_flops_per_token"] / peak}
    if args.toy_steps > 1:
        common.progress(f"timing {args.toy_steps} toy RL steps (sampling / rewards / learning)")
        out["toy_step"] = toy_step_peers(args.toy_steps, args.toy_peers)
    common.print_json(out)


if __name__ == "__main__":
    main()
