"""The eval job end to end on a tiny export: N attempts, samples, the scaling study, artefacts."""

import json
import subprocess
import sys

import pytest

import test_train_sft as sft_e2e

ROOT = sft_e2e.ROOT


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    wd = tmp_path_factory.mktemp("base")
    sft_e2e._run(wd, data_dir, "--config.total_steps=5", "--config.checkpoint.every_steps=0")
    return data_dir, wd / "export"


def _eval_cmd(workdir, data_dir, params, *overrides):
    return [sys.executable, "-m", "score_jax.main", "--config=configs/eval.py:tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.data.num_train=2000", "--config.data.num_test=200",
            f"--config.eval.params={params}", "--config.eval.sampling.max_new_tokens=10", *overrides]


def _eval(workdir, data_dir, params, *overrides, check=True):
    p = subprocess.run(_eval_cmd(workdir, data_dir, params, *overrides), cwd=ROOT, env=sft_e2e._env(), capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.mark.slow
def test_eval_writes_metrics_episodes_and_the_scaling_study(tmp_path, setup):
    data_dir, params = setup
    wd = tmp_path / "eval"
    p = _eval(wd, data_dir, params, "--config.eval.num_problems=10", "--config.eval.batch_size=4",
              "--config.eval.num_attempts=3", "--config.eval.sampling.temperature=1.0", "--config.eval.sampling.samples_per_prompt=2",
              "--config.eval.scaling_samples=4")
    ev = json.loads((wd / "eval.json").read_text())
    assert (ev["num_problems"], ev["samples_per_problem"], ev["num_attempts"]) == (10, 2, 3)
    assert len(ev["acc_by_attempt"]) == 3 and len(ev["mean_length"]) == 3
    for key in ("acc_t1", "acc_t2", "delta", "delta_i_to_c", "delta_c_to_i"):
        assert set(ev[key]) == {"mean", "ci_low", "ci_high", "se"}
    assert 0.0 <= ev["edit_ratio"] <= 1.0
    # The revise rates, recomputed by hand from the episodes (attempts 1 and 2).
    lines = [json.loads(ln) for ln in (wd / "episodes.jsonl").read_text().splitlines()]
    wrong = [x for x in lines if x["correct"][0] == 0]
    rev_wrong = [x for x in wrong if x["attempts"][1] != x["attempts"][0]]
    rv = ev["revise"]
    assert (rv["n_wrong1"], rv["n_revised_wrong"]) == (len(wrong), len(rev_wrong))
    assert rv["n_right1"] == len(lines) - len(wrong)
    assert rv["revise_if_wrong"] == pytest.approx(len(rev_wrong) / max(len(wrong), 1))
    assert rv["fix_if_revised"] == pytest.approx(sum(x["correct"][1] for x in rev_wrong) / max(len(rev_wrong), 1))
    sc = ev["inference_scaling"]
    assert sc["budgets"] == [2, 4] and sc["samples_used"] == {"parallel": [2, 4], "sequential": [2, 4]}
    assert (wd / "inference_scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert len(lines) == 20 and all(len(x["attempts"]) == 3 for x in lines)
    # The last batch wraps around to fill 4 rows; the extra rows are not counted.
    assert [x["problem"] for x in lines[::2]] == [x["problem"] for x in lines[1::2]]
    assert "Acc@t1" in p.stdout


def test_eval_without_params_fails_at_once(tmp_path, setup):
    data_dir, _ = setup
    p = _eval(tmp_path / "e", data_dir, tmp_path / "nope", check=False)
    assert p.returncode == 2 and "No params export" in p.stderr and "Traceback" not in p.stderr


def _metrics(wd):
    ev = json.loads((wd / "eval.json").read_text())
    ev.pop("seconds")
    return ev


@pytest.mark.slow
def test_a_stopped_eval_resumes_at_its_next_batch_with_the_same_results(tmp_path, setup):
    data_dir, params = setup
    how = ["--config.eval.num_problems=40", "--config.eval.batch_size=4", "--config.eval.sampling.temperature=1.0"]
    ref = tmp_path / "ref"
    _eval(ref, data_dir, params, *how)
    wd = tmp_path / "eval"
    rc, out = sft_e2e.signal_after(_eval_cmd(wd, data_dir, params, *how),
                                   lambda line: "eval: 8/40 problems sampled" in line)
    assert rc == 0, out[-2000:]
    assert "Stopped on request" in out.strip().splitlines()[-1] and "Traceback" not in out, out[-2000:]
    assert not (wd / "eval.json").exists()
    saved = (wd / "eval_progress" / "eval.p0.jsonl").read_text().splitlines()
    assert 3 <= len(saved) <= 11  # the header and the batches finished before the stop
    p = _eval(wd, data_dir, params, *how)
    assert f"resuming after {len(saved) - 1} saved batches" in p.stderr
    assert _metrics(wd) == _metrics(ref)
    assert (wd / "episodes.jsonl").read_text() == (ref / "episodes.jsonl").read_text()
    assert not (wd / "eval_progress").exists()
    # Another evaluation in the same workdir is refused before any work.
    p = _eval(wd, data_dir, params, "--config.eval.num_problems=20", "--config.eval.batch_size=4", check=False)
    assert p.returncode == 2 and "eval.num_problems: 40 there, 20 here" in p.stderr, p.stderr[-2000:]
    assert _metrics(wd) == _metrics(ref)
