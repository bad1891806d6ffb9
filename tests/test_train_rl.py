"""End-to-end runs of the stage1 / stage2 jobs through `python -m score_jax.main`, as a user runs them."""

import json
import signal
import subprocess
import sys
import time

import pytest

import test_train_sft as sft_e2e

ROOT = sft_e2e.ROOT
DATA = ["--config.data.num_train=2000", "--config.data.num_test=200"]
RL = [*DATA, "--config.batch_size=4", "--config.rl.sampling.samples_per_prompt=2", "--config.rl.sampling.max_new_tokens=12",
      "--config.log_every=2", "--config.rl.samples_every=2", "--config.rl.samples_per_write=2"]


def _rl(job, workdir, data_dir, *overrides, check=True, preset="tiny"):
    cmd = [sys.executable, "-m", "score_jax.main", f"--config=configs/{job}.py:{preset}", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", *RL, *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=sft_e2e._env(), capture_output=True, text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"{job} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_dir):
    """A 10-step SFT run: the base model (policy init and reference) of every run below."""
    wd = tmp_path_factory.mktemp("base")
    sft_e2e._run(wd, data_dir, "--config.total_steps=10", "--config.checkpoint.every_steps=0")
    return wd / "export"


def _ref_flags(base):
    return [f"--config.rl.reference={base}", f"--config.init_from={base}"]


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, data_dir, base):
    wd = tmp_path_factory.mktemp("stage1")
    p = _rl("stage1", wd, data_dir, *_ref_flags(base), "--config.total_steps=6", "--config.checkpoint.every_steps=3")
    return wd, p


@pytest.mark.slow
def test_stage1_writes_every_artefact(stage1_run):
    wd, p = stage1_run
    s = json.loads((wd / "summary.json").read_text())
    assert s["step"] == 6 and not s["stopped_early"] and len(s["params_sha256"]) == 64
    assert s["prompts"] == {"used": 2000, "too_long": 0, "records": 2000}
    m = s["final_metrics"]
    for key in ("reward1", "reward2", "delta", "delta_i_to_c", "delta_c_to_i", "kl1", "kl2", "entropy1", "entropy2",
                "adv2_mean", "adv2_std", "len1", "len2", "truncated1", "truncated2", "edit_ratio", "grad_norm",
                "time_sample", "time_reward", "time_learn", "logp_gap", "revise_if_wrong", "revise_if_right",
                "fix_if_revised", "break_if_revised"):
        assert key in m, key
    assert m["stage"] == 1.0 and m["logp_gap"] < 1e-3
    assert (wd / "export" / "_CHECKPOINT_METADATA").exists()
    assert (wd / "best" / "_CHECKPOINT_METADATA").exists() and json.loads((wd / "best.json").read_text())["step"] > 0
    samples = [json.loads(ln) for ln in (wd / "samples.jsonl").read_text().splitlines()]
    assert [x["step"] for x in samples] == [2, 2, 4, 4, 6, 6]
    assert set(samples[0]) == {"step", "prompt", "answer", "y1", "y2", "r1", "r2"}
    rows = [json.loads(ln) for ln in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6] and "reward2" in rows[0]
    assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
    assert "step 6/6 | stage 1 | reward1" in p.stdout and "time_sample" in p.stdout


@pytest.mark.slow
def test_stage1_kill9_then_resume_is_bitwise_identical(tmp_path, data_dir, base, stage1_run):
    ref_wd, _ = stage1_run
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "score_jax.main", "--config=configs/stage1.py:tiny", f"--workdir={wd}",
           f"--config.data.data_dir={data_dir}", *RL, *_ref_flags(base), "--config.total_steps=6",
           "--config.checkpoint.every_steps=3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=sft_e2e._env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not sft_e2e._complete_steps(wd) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert sft_e2e._complete_steps(wd), "no checkpoint appeared before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not (wd / "summary.json").exists(), "the run finished before it could be killed"
    p = _rl("stage1", wd, data_dir, *_ref_flags(base), "--config.total_steps=6", "--config.checkpoint.every_steps=3")
    assert "Resumed from" in p.stderr
    assert json.loads((wd / "summary.json").read_text())["params_sha256"] == \
        json.loads((ref_wd / "summary.json").read_text())["params_sha256"]
    # The samples written before the kill are not duplicated by the resumed steps.
    assert [json.loads(ln)["step"] for ln in (wd / "samples.jsonl").read_text().splitlines()] == [2, 2, 4, 4, 6, 6]


@pytest.mark.slow
def test_stage2_starts_from_the_stage1_export_and_interleaves(tmp_path, data_dir, base, stage1_run):
    s1, _ = stage1_run
    wd = tmp_path / "s2"
    _rl("stage2", wd, data_dir, f"--config.rl.reference={base}", f"--config.init_from={s1 / 'export'}",
        "--config.total_steps=4", "--config.rl.schedule=21", "--config.rl.schedule_block_steps=2",
        "--config.checkpoint.every_steps=0")
    rows = [json.loads(ln) for ln in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [2.0, 1.0]  # steps 1-2 Stage II, steps 3-4 Stage I
    assert json.loads((wd / "summary.json").read_text())["step"] == 4


def test_missing_stage1_export_fails_at_once_naming_path_and_command(tmp_path, data_dir, base):
    wd = tmp_path / "s2"
    missing = tmp_path / "runs" / "stage1_tiny" / "export"
    p = _rl("stage2", wd, data_dir, f"--config.rl.reference={base}", f"--config.init_from={missing}", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "No stage-1 policy export" in p.stderr and f"found at {missing}" in p.stderr
    assert f"python -m score_jax.main --config=configs/stage1.py:tiny --workdir={missing.parent}" in p.stderr
    assert "Traceback" not in p.stderr and not (wd / "checkpoints").exists()  # before any work


@pytest.mark.slow
def test_stage1_policy_follows_the_reference_override(tmp_path, data_dir, base):
    """--config.rl.reference alone moves the policy too (stage 1's init_from is empty: "start
    as the reference"): the first step's KL to the reference is zero up to float rounding."""
    wd = tmp_path / "s1"
    _rl("stage1", wd, data_dir, f"--config.rl.reference={base}", "--config.total_steps=1",
        "--config.log_every=1", "--config.checkpoint.every_steps=0")
    first = json.loads((wd / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["kl1"]) < 1e-5 and abs(first["kl2"]) < 1e-5 and first["logp_gap"] < 1e-3
    assert json.loads((wd / "config.json").read_text())["init_from"] == ""


def test_missing_reference_fails_at_once(tmp_path, data_dir):
    p = _rl("stage1", tmp_path / "s1", data_dir, f"--config.rl.reference={tmp_path / 'nope'}", check=False)
    assert p.returncode == 2 and "No reference (base model) export" in p.stderr
    assert "configs/sft.py:tiny" in p.stderr


def test_bad_rl_config_fails_before_work(tmp_path, data_dir):
    p = _rl("stage2", tmp_path / "x", data_dir, "--config.rl.shaping=sigmoid", check=False)
    assert p.returncode == 2 and "rl.shaping='sigmoid'" in p.stderr
    p = _rl("stage1", tmp_path / "x", data_dir, "--config.rl.betta2=1.0", check=False)
    assert p.returncode == 2 and "Config error" in p.stderr and "beta2" in p.stderr


def test_prompts_over_the_limit_are_refused_by_default_and_counted_when_skipped(tmp_path, data_dir, base):
    # toy_arithmetic 2.0.0 prompts are at most 13 tokens with their markers; many are over 11.
    p = _rl("stage1", tmp_path / "a", data_dir, *_ref_flags(base), "--config.rl.sampling.max_prompt_len=11", check=False)
    assert p.returncode != 0 and "prompts are longer than max_prompt_len=11" in p.stderr
    assert "data.too_long" in p.stderr
