"""The demo pipeline end to end at CI size (configs/demo.py:tiny: every row, a few steps each)."""

import json
import subprocess
import sys
import time

import pytest

import test_train_sft as sft_e2e
from score_jax import demo

ROOT = sft_e2e.ROOT


def _demo(workdir, data_dir, *overrides):
    cmd = [sys.executable, "-m", "score_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=sft_e2e._env(), capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_tiny_demo_writes_every_artefact_and_resumes(tmp_path):
    wd, data_dir = tmp_path / "demo", tmp_path / "tfds"
    p = _demo(wd, data_dir)
    result = json.loads((wd / "results.json").read_text())
    assert set(result["rows"]) == set(demo.METHODS)
    for method, row in result["rows"].items():
        for key in ("acc_t1", "acc_t2", "delta_i_to_c", "delta_c_to_i"):
            assert 0.0 <= row[key] <= 1.0, (method, key)
        assert row["delta"] == pytest.approx(row["acc_t2"] - row["acc_t1"], abs=1e-9)
        assert row["delta"] == pytest.approx(row["delta_i_to_c"] - row["delta_c_to_i"], abs=1e-9)
        lo, hi = row["ci"]["delta"]
        assert lo <= row["delta"] <= hi
        assert len(row["per_seed"]["delta"]) == 1
    for png in ("training_rewards.png", "corrections.png"):
        assert (wd / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    seed = wd / "seed0"
    for method in demo.METHODS:
        ev = json.loads((seed / f"eval_{method}" / "eval.json").read_text())
        assert ev["num_problems"] == 16 and ev["samples_per_problem"] == 1 and ev["decoding"]["temperature"] == 0
        sampled = json.loads((seed / f"eval_{method}_sampled" / "eval.json").read_text())
        assert sampled["samples_per_problem"] == 2 and sampled["decoding"]["temperature"] == 1.0
        assert "sampled" in result["rows"][method]
    for run in ("pretrain", "base", "stage1", "score", "no_shaping", "no_stage1", "naive_rl"):
        assert (seed / run / "summary.json").exists(), run
    # Stage II runs start from the right place and keep the base model as the reference.
    score_cfg = json.loads((seed / "score" / "config.json").read_text())
    assert score_cfg["init_from"] == str(seed / "stage1" / "export")
    assert score_cfg["rl"]["reference"] == str(seed / "base" / "export") and score_cfg["rl"]["schedule"] == "2"
    no_stage1 = json.loads((seed / "no_stage1" / "config.json").read_text())
    assert no_stage1["init_from"] == str(seed / "base" / "export")
    assert json.loads((seed / "naive_rl" / "config.json").read_text())["rl"]["shaping"] == "none"
    assert "SCoRe" in p.stdout and "Acc@t1" in p.stdout
    # Everything is finished: a second run only reads the results back.
    t0 = time.time()
    again = _demo(wd, data_dir)
    assert "demo seed 0: score\n" not in again.stderr and time.time() - t0 < 120
    assert json.loads((wd / "results.json").read_text())["rows"] == result["rows"]
