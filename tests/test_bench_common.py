"""score_jax/bench/common.py (and a smoke test of bench/hf_reference.py). No timing asserts."""
import json
import math
import subprocess
import sys

import jax.numpy as jnp
import pytest

from configs import models
from score_jax import model
from score_jax.bench import common
from score_jax.bench import hf_reference


def test_time_fn_counts_calls_and_returns_repeats():
    calls = []
    times = common.time_fn(lambda: calls.append(1) or jnp.ones(3), warmup=2, repeats=4)
    assert len(calls) == 6
    assert len(times) == 4
    assert all(isinstance(t, float) and t >= 0 for t in times)


def test_time_fn_rejects_zero_repeats():
    with pytest.raises(ValueError, match="repeats >= 1"):
        common.time_fn(lambda: None, warmup=0, repeats=0)


def test_print_json_emits_one_parseable_line(capsys):
    obj = {"tokens_per_s": 545.5, "name": "train", "shape": {"d_model": 512}}
    common.print_json(obj)
    common.progress("working...")
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and out.endswith("\n")
    assert json.loads(out) == obj
    assert "working..." in err


@pytest.mark.parametrize("bad", [{"x": float("nan")}, [1, 2], {"x": math.inf}])
def test_print_json_refuses_invalid_json(bad, capsys):
    with pytest.raises(ValueError):
        common.print_json(bad)
    assert capsys.readouterr().out == ""


def test_matmul_peak_flops_is_positive_and_finite():
    flops = common.matmul_peak_flops(n=64, chain=2, repeats=2)
    assert isinstance(flops, float) and math.isfinite(flops) and flops > 0


def test_stream_bandwidth_is_positive_and_finite():
    bandwidth = common.stream_bandwidth_bytes(n=1 << 12, repeats=2)
    assert isinstance(bandwidth, float) and math.isfinite(bandwidth) and bandwidth > 0


def test_torch_available_is_a_bool():
    assert isinstance(common.torch_available(), bool)


def test_bench_preset_is_a_plain_llama_for_the_transformers_comparison():
    # hf_reference builds LlamaForCausalLM from the shape fields alone, so every other field of
    # the preset must keep the plain decoder's defaults, or the comparison is not like for like.
    preset = models.get("bench")
    assert hf_reference.shape_of(model.ModelConfig(**preset.to_dict()))["activation"] == "silu"
    numerics = ("param_dtype", "dtype", "remat", "scan_layers")  # not part of the architecture
    others = {k: v for k, v in models.DEFAULTS.items() if k not in hf_reference.SHAPE_FIELDS + numerics}
    assert {k: preset[k] for k in others} == others


def test_hf_reference_imports_without_torch():
    code = "import sys, score_jax.bench.hf_reference; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "False"


@pytest.mark.slow
def test_hf_reference_runs_on_a_tiny_llama():
    from score_jax.bench import hf_reference

    bench = model.ModelConfig(**models.get("bench").to_dict())
    shape = dict(hf_reference.shape_of(bench), vocab_size=128, num_layers=1, d_model=32, num_heads=2,
                 num_kv_heads=1, head_dim=16, mlp_dim=64)
    train = hf_reference.hf_train_tokens_per_s(shape, batch=2, seq_len=8, steps=1, warmup=1)
    generate = hf_reference.hf_generate_tokens_per_s(shape, batch=2, prompt_len=4,
                                                     new_tokens=3, repeats=1)
    assert train > 0 and generate > 0
    with pytest.raises(ValueError, match="gelu_tanh"):
        hf_reference.build_model(dict(shape, activation="gelu_tanh"), max_positions=8)


@pytest.mark.slow
def test_learner_benchmark_prints_one_json_object_with_its_keys():
    cmd = [sys.executable, "-m", "score_jax.bench.learner", "--preset=toy", "--episodes=8", "--prompt_len=8",
           "--new_tokens=8", "--steps=1", "--toy_steps=0"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout
    out = json.loads(lines[0])
    assert out["tokens_per_update"] == 8 * (8 + 2 * 8) and out["episodes"] == 8
    # The ceiling is the higher of the two peak measurements, and the MFU is taken against it.
    assert out["matmul_peak_flops"] == max(out["matmul_peak_measurements"]) > 0
    assert out["mfu"] == pytest.approx(out["tokens_per_s"] * out["model_flops_per_token"] / out["matmul_peak_flops"])
    assert 0 < out["mfu"]


@pytest.mark.slow
def test_toy_step_peer_runs_the_real_rl_job_at_the_lengths_asked():
    cmd = [sys.executable, "-m", "score_jax.bench.learner", "--toy_only", "--toy_steps=2", "--toy_prompt_len=20",
           "--toy_new_tokens=10", "--toy_batch=8"]  # 8: the tests run on 8 fake devices
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout)
    assert (out["max_prompt_len"], out["max_new_tokens"], out["rows_per_step"]) == (20, 10, 8 * 4)
    assert out["steps_timed"] == 1 and out["episodes_per_s"] > 0
    assert sum(out["fraction"].values()) == pytest.approx(1.0)
