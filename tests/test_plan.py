"""score_jax.plan: ahead-of-time compiles of every program of a job for a real TPU topology
(libtpu, no TPU), checked against the bytes of the parameters and optimiser state computed by
hand, and its one-line errors."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBTPU = ROOT / ".venv" / "libtpu"  # launch/setup_local.sh --test installs it there

# tiny preset (configs/models.py): vocab 256, 2 layers, d_model 64, 4 heads of 16, 2 kv heads, mlp 128, tied.
TINY_PARAMS = 90432


def _plan(config, topology, *overrides, libtpu=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + str(LIBTPU) if libtpu else ""), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the plan's devices are the topology's, not fake CPU ones
    return subprocess.run([sys.executable, "-m", "score_jax.plan", f"--config={config}", f"--topology={topology}",
                           *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def libtpu():
    assert (LIBTPU / "libtpu").is_dir(), f"libtpu is missing at {LIBTPU}: run bash launch/setup_local.sh --test"


def _json(p):
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def test_tiny_model_count_is_the_hand_count():
    from configs import models
    from score_jax import model
    cfg = model.ModelConfig(**models.get("tiny").to_dict())
    V, L, D, H, K, Dh, F = 256, 2, 64, 4, 2, 16, 128
    per_layer = D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F + 2 * D  # q, k+v, o, gate+up+down, 2 norms
    assert model.num_params(cfg) == V * D + L * per_layer + D == TINY_PARAMS


@pytest.mark.slow
def test_sft_plan_on_v5e_8_counts_the_state_by_hand(libtpu):
    out = _json(_plan("configs/sft.py:tiny", "v5e-8", "--config.batch_size=16", "--config.data.seq_len=96"))
    assert out["topology"] == {"name": "v5e-8", "jax": "v5e:2x4", "chips": 8, "processes": out["topology"]["processes"],
                               "device_kind": "TPU v5 lite", "hbm_bytes_per_chip": 16 * 2**30}
    assert out["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    P = 4 * TINY_PARAMS  # float32 params, replicated on a data-only mesh
    # AdamW's mu and nu (float32, like the params) plus a few scalar counters.
    assert 3 * P <= out["resident_bytes"]["train_state"] <= 3 * P + 64
    step = out["programs"]["train_step"]
    batch = 3 * (16 // 8) * 96 * 4  # tokens, loss_mask, valid: int32 rows of this chip
    assert step["argument_bytes"] >= out["resident_bytes"]["train_state"] + batch
    assert step["alias_bytes"] >= 3 * P  # the donated state is updated in place
    assert step["flops"] > 6 * TINY_PARAMS * 2 * 96  # at least 6 N D for this chip's 2 rows
    assert out["fits"] and 0 < out["mfu_roofline"] < 1 and step["compile_seconds"] > 0


@pytest.mark.slow
def test_fsdp_shards_the_state_and_stage2_plans_three_programs(libtpu):
    out = _json(_plan("configs/stage2.py:tiny", "v5e:2x4", "--config.mesh.data=1", "--config.mesh.fsdp=8",
                      "--config.rl.reference=unused", "--config.init_from=unused"))
    assert set(out["programs"]) == {"sampler", "reference_logprobs", "update_step"}
    P = 4 * TINY_PARAMS
    # Sharded over 8 chips along the embed axis; norms (64 values per layer) may stay replicated.
    assert 3 * P / 8 <= out["resident_bytes"]["train_state"] <= 3 * P / 8 + 3 * 4 * 5 * 64 + 64
    assert P / 8 <= out["resident_bytes"]["reference"] <= P / 8 + 4 * 5 * 64
    assert out["resident_bytes"]["kv_cache"] > 0 and out["peak_bytes"] >= sum(out["resident_bytes"].values())


def test_skipped_programs_are_not_compiled_and_leave_fits_unknown(libtpu):
    out = _json(_plan("configs/stage2.py:tiny", "v5e:2x4", "--skip=sampler", "--config.mesh.data=1",
                      "--config.mesh.fsdp=8", "--config.rl.reference=unused", "--config.init_from=unused"))
    assert set(out["programs"]) == {"reference_logprobs", "update_step"} and out["skipped"] == ["sampler"]
    assert out["resident_bytes"]["kv_cache"] > 0  # the sampler's cache still counts
    assert out["fits"] is None and out["mfu_roofline"] is None and out["step_seconds_roofline"] is None
    p = _plan("configs/stage2.py:tiny", "v5e:2x4", "--skip=sampler,decoder", "--config.rl.reference=unused",
              "--config.init_from=unused")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        "Error: --skip=decoder: the stage2 job's programs are sampler, reference_logprobs, update_step.")


@pytest.mark.slow
def test_a_program_that_does_not_fit_says_what_to_change(libtpu):
    p = _plan("configs/sft.py:tiny", "v5e-8", "--config.batch_size=4096", "--config.data.seq_len=8192")
    out = _json(p)
    assert not out["fits"]
    assert out["advice"].startswith("train_step needs ") and "--config." in out["advice"]
    # XLA refuses it at compile time: no cost analysis, so no roofline either (not a made-up MFU).
    assert "CompileTimeHbmOom" in out["programs"]["train_step"]["compiler_out_of_memory"]
    assert out["step_seconds_roofline"] is None and out["mfu_roofline"] is None
    assert p.stderr.strip().splitlines()[-1].startswith("Does not fit: train_step needs")


@pytest.mark.parametrize("topology, overrides, expected", [
    ("v7x-8", [], "Unknown --topology='v7x-8'; use a slice name such as v5e-8"),
    ("v5e-6", [], "--topology=v5e-6 is not a v5e slice size; choose one of v5e-1, v5e-4, v5e-8"),
    ("v5p-8", ["--config.mesh.data=3"], "does not fit v5p-8's 4 chips"),
])
def test_bad_topologies_and_meshes_are_one_line(libtpu, topology, overrides, expected):
    p = _plan("configs/sft.py:tiny", topology, *overrides)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and expected in last, last


def test_without_libtpu_the_plan_says_how_to_install_it():
    p = _plan("configs/sft.py:tiny", "v5e-8", libtpu=False)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert "Compiling for TPU needs libtpu" in last and "requirements-plan.txt" in last, last
