"""The demo pipeline end to end at CI size (configs/demo.py:tiny: every row, a few steps each)."""

import json
import shutil
import subprocess
import sys

import pytest

import test_train_sft as sft_e2e
from score_jax.jobs import demo, demo_report

ROOT = sft_e2e.ROOT


def _demo(workdir, data_dir, *overrides, returncode=0, timeout=1200):
    cmd = [sys.executable, "-m", "score_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=sft_e2e._env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == returncode, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
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
        assert 0.0 <= row["revise"]["revise_if_wrong"] <= 1.0 and 0.0 <= row["revise"]["revise_if_right"] <= 1.0
    for png in ("training_rewards.png", "corrections.png", "revise_rates.png"):
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
    assert "over 2 devices" in p.stderr  # the demo's cpu_devices, whatever XLA_FLAGS says
    # Everything is finished: a second run only reads the results back (no sub-run starts).
    again = _demo(wd, data_dir)
    started = [line for line in again.stderr.splitlines()
               if any(line.endswith(f"demo seed 0: {name}") for name in (*demo.METHODS, "pretrain", "base", "stage1"))]
    assert not started, started
    assert json.loads((wd / "results.json").read_text())["rows"] == result["rows"]
    # An override of a finished run's settings is refused, not ignored, and nothing is rerun.
    refused = _demo(wd, data_dir, "--config.stage1.optim.learning_rate=0.0002", returncode=2)
    last = refused.stderr.strip().splitlines()[-1]
    assert "stage1 is a finished run made with other settings" in last and "optim.learning_rate" in last, last
    assert json.loads((wd / "results.json").read_text())["rows"] == result["rows"]
    # A moved workdir is reused as it is: the per-run paths in its config.json name the old place.
    moved = tmp_path / "moved"
    shutil.copytree(wd, moved)
    again = _demo(moved, data_dir)
    started = [line for line in again.stderr.splitlines() if line.endswith("demo seed 0: stage1")]
    assert not started and json.loads((moved / "results.json").read_text())["rows"] == result["rows"]


@pytest.mark.slow
def test_seeds_in_parallel_processes_share_the_base_model(tmp_path):
    """demo.shared_base with demo.only_seed: seed 0's runs, then seed 1's (on seed 0's base model),
    each alone; then the whole command finds both finished and writes the table over both seeds."""
    wd, data_dir, md = tmp_path / "demo", tmp_path / "tfds", tmp_path / "RESULTS.md"
    common = ("--config.demo.rows=base,stage1_only", "--config.demo.seeds=2", "--config.demo.shared_base=True",
              "--config.demo.sampled_samples=0", f"--config.demo.results_md={md}")
    seed0, seed1 = wd / "seed0", wd / "seed1"
    # Seed 1 needs seed 0's base model: refused, naming what to run, before any work.
    early = _demo(wd, data_dir, *common, "--config.demo.only_seed=1", returncode=2, timeout=300)
    assert "--config.demo.only_seed=0 first" in early.stderr, early.stderr[-2000:]
    assert not (seed1 / "stage1").exists()

    p = _demo(wd, data_dir, *common, "--config.demo.only_seed=0")
    assert "demo seed 0 finished" in p.stderr and not (wd / "results.json").exists()
    p = _demo(wd, data_dir, *common, "--config.demo.only_seed=1")
    assert "demo seed 1 finished" in p.stderr and not (wd / "results.json").exists()
    assert (seed0 / "base" / "summary.json").exists() and not (seed1 / "base").exists()
    assert not (seed1 / "eval_base").exists()  # the base row is evaluated once, under seed 0
    cfg = json.loads((seed1 / "stage1" / "config.json").read_text())
    assert cfg["rl"]["reference"] == cfg["init_from"] == str(seed0 / "base" / "export")
    assert cfg["seed"] == 0 and cfg["run"] == demo.run_index("seed1/stage1")

    final = _demo(wd, data_dir, *common)
    assert "demo seed 0: stage1\n" not in final.stderr and "demo seed 1: stage1\n" not in final.stderr
    rows = json.loads((wd / "results.json").read_text())["rows"]
    assert len(rows["base"]["per_seed"]["delta"]) == 1 and len(rows["stage1_only"]["per_seed"]["delta"]) == 2
    base_eval = json.loads((seed0 / "eval_base" / "eval.json").read_text())
    assert rows["base"]["ci"]["delta"] == [base_eval["delta"]["ci_low"], base_eval["delta"]["ci_high"]]
    text = md.read_text()
    assert "| Base model | " in text and "(seed 0's)" in text and "shared by every seed" in text
    assert "minutes of wall clock" in text and "only_seed" in text


def test_only_seed_out_of_range_is_refused(tmp_path):
    p = _demo(tmp_path, tmp_path / "tfds", "--config.demo.seeds=2", "--config.demo.only_seed=2", returncode=2,
              timeout=300)
    assert "demo.only_seed=2 but demo.seeds=2" in p.stderr, p.stderr[-2000:]


def test_wall_span_reads_the_runs_files_and_skips_seeds_without_runs(tmp_path):
    import os

    for name, files, t in (("stage1", ("config.json", "summary.json"), (100.0, 400.0)),
                           ("eval_score", ("config.json", "eval.json"), (450.0, 500.0))):
        (tmp_path / "seed0" / name).mkdir(parents=True)
        for f, when in zip(files, t):
            path = tmp_path / "seed0" / name / f
            path.write_text("{}")
            os.utime(path, (when, when))
    assert demo_report._wall_span(str(tmp_path / "seed0")) == (100.0, 500.0)
    assert demo_report._wall_span(str(tmp_path / "seed1")) is None  # only untrained rows: no runs of its own
    (tmp_path / "seed2" / "stage1").mkdir(parents=True)
    (tmp_path / "seed2" / "stage1" / "config.json").write_text("{}")  # started, never finished
    assert demo_report._wall_span(str(tmp_path / "seed2")) is None


@pytest.mark.parametrize("override", ["--config.stage1.model.d_model=64", "--config.stage1.task.correction=x",
                                      "--config.pretrain.data.num_train=5", "--config.eval.seed=3",
                                      "--config.stage2.init_from=/x", "--config.eval.eval.params=/x"])
def test_overrides_of_what_the_demo_sets_itself_are_refused(tmp_path, override):
    """The sub-jobs hold only their own settings: an override of what the demo sets for them
    (shared at the top level, or per run) fails like any unknown key, before any work."""
    p = _demo(tmp_path, tmp_path / "tfds", override, returncode=2, timeout=300)
    assert "Config error" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "tfds").exists()


def _table():
    from configs import demo as demo_config
    from score_jax import main as main_lib
    return main_lib._demo_config(demo_config.get_config("table"))


def test_the_sub_jobs_take_the_top_level_settings_and_their_own():
    import dataclasses
    from configs import demo as demo_config
    from score_jax import main as main_lib
    c = demo_config.get_config("table")
    with c.unlocked():
        c.model.d_model, c.data.num_train, c.pretrain.data.seq_len, c.stage1.rl.beta2 = 96, 777, 100, 0.5
    cfg = main_lib._demo_config(c)
    for sub in (cfg.pretrain, cfg.sft, cfg.stage1, cfg.stage2, cfg.eval):
        assert sub.model.d_model == 96 and sub.data.num_train == 777 and sub.task == cfg.stage1.task
    assert (cfg.pretrain.data.seq_len, cfg.sft.data.seq_len) == (100, c.sft.data.seq_len)
    assert cfg.stage1.rl.beta2 == 0.5 and cfg.stage2.rl.beta2 == c.stage2.rl.beta2
    assert not hasattr(cfg.eval.data, "train_split") and dataclasses.is_dataclass(cfg.eval.data)


def test_no_two_runs_of_the_table_share_a_sampling_key_or_a_data_order():
    import dataclasses
    import math

    import jax
    import numpy as np

    from score_jax import main as main_lib
    from score_jax import settings
    from score_jax.jobs import harness, keys

    cfg = _table()
    runs = demo.plan(cfg, "runs/table")
    paths = [p for p, _ in runs]
    assert len(set(paths)) == len(paths)
    # Seed 0: pretrain, base, stage1, four Stage II runs, 2 STaR rounds, Pair-SFT, and each of the
    # 9 rows evaluated greedy and sampled; seeds 1, 2 (on seed 0's base): 8 runs and 7 rows each.
    assert len(runs) == (10 + 2 * 9) + 2 * (8 + 2 * 7)
    owner: dict[tuple, str] = {}
    data_seeds: dict[int, str] = {}
    for path, c in runs:
        # Every per-run field is set by the demo (init_from, rl.reference, eval.params).
        assert main_lib._SET_PER_RUN not in json.dumps(dataclasses.asdict(c)), path
        root = harness.root_key(c)
        if isinstance(c, settings.RLTrainConfig):
            purpose, n = "sampling", c.total_steps
        elif isinstance(c, settings.EvalJobConfig):
            purpose, n = "eval", math.ceil(c.eval.num_problems / c.eval.batch_size)
        elif "star" in path or "pair" in path:
            purpose, n = "self_samples", math.ceil(cfg.demo.star_prompts / cfg.eval.eval.batch_size)
        else:
            purpose, n = None, 0  # pretrain, base: no sampling
        if purpose:
            base = keys.key(root, purpose)
            for i in range(n):
                kd = tuple(np.asarray(jax.random.key_data(jax.random.fold_in(base, i))).tolist())
                assert kd not in owner, f"{path} step/batch {i} samples with {owner.get(kd)}'s key"
                owner[kd] = path
        if not isinstance(c, settings.EvalJobConfig):
            s = keys.seed(root, "data")
            assert s not in data_seeds, f"{path} has {data_seeds.get(s)}'s data order"
            data_seeds[s] = path
    assert len(data_seeds) == 10 + 2 * 8


def test_rows_trained_from_the_base_get_scores_whole_rl_budget():
    cfg = _table()
    steps = {p: c.total_steps for p, c in demo.plan(cfg, "runs/table") if hasattr(c, "total_steps")}
    s1, s2 = cfg.stage1.total_steps, cfg.stage2.total_steps
    assert steps["seed1/stage1"] == s1 and steps["seed1/score"] == s2 and steps["seed1/no_shaping"] == s2
    assert steps["seed1/naive_rl"] == steps["seed1/no_stage1"] == s1 + s2
    # STaR and Pair-SFT train on whole sampled episodes, longer than the base SFT's data.
    seq = {p: c.data.seq_len for p, c in demo.plan(cfg, "runs/table")
           if p.split("/")[-1].startswith(("star_r", "pair_sft"))}
    assert seq and set(seq.values()) == {cfg.demo.baseline_seq_len} and cfg.demo.baseline_seq_len > cfg.sft.data.seq_len


def test_star_and_pair_sft_fine_tune_at_their_own_learning_rate():
    from configs import demo as demo_config
    from score_jax import main as main_lib

    def rates(**demo_changes):
        c = demo_config.get_config("table")
        with c.unlocked():
            c.demo.update(demo_changes)
        cfg = main_lib._demo_config(c)
        return cfg, {p.split("/")[-1]: c.optim.learning_rate for p, c in demo.plan(cfg, "runs/table")
                     if p.startswith("seed0/") and hasattr(c, "optim")}

    cfg, lr = rates()  # the dev split's choice (configs/demo.py)
    assert lr["star_r0"] == lr["star_r1"] == lr["pair_sft"] == cfg.demo.baseline_learning_rate == 1e-4
    cfg, lr = rates(baseline_learning_rate=0.0)  # 0: the base SFT's rate
    assert lr["star_r0"] == lr["star_r1"] == lr["pair_sft"] == lr["base"] == cfg.sft.optim.learning_rate
    cfg, lr = rates(baseline_learning_rate=3e-5)
    assert lr["star_r0"] == lr["star_r1"] == lr["pair_sft"] == 3e-5
    assert lr["base"] == cfg.sft.optim.learning_rate != 3e-5 and lr["stage1"] == cfg.stage1.optim.learning_rate


def _row(t1, t2, c_to_i, lo=None):
    d = t2 - t1
    return {"acc_t1": t1, "acc_t2": t2, "delta": d, "delta_c_to_i": c_to_i,
            "ci": {"delta": (d - 0.02 if lo is None else lo, d + 0.02)}}


def test_the_reports_checks_are_the_issues_outcomes_computed_from_the_rows():
    rows = {"base": _row(0.56, 0.43, 0.31), "naive_rl": _row(0.97, 0.93, 0.05),
            "stage1_only": _row(0.59, 0.91, 0.03), "score": _row(0.71, 0.94, 0.02)}
    lines = demo_report._md_checks(rows, list(rows))
    text = "\n".join(lines)
    assert "Delta above 0 with its interval above 0: **True** (Delta 23.0, interval 21.0 to 25.0)" in text
    assert "Delta above the base model's: **True** (23.0 vs -13.0)" in text
    assert "Delta c->i below the base model's: **True** (2.0 vs 31.0)" in text
    assert "Acc@t2 above the base model's Acc@t1: **True** (94.0 vs 56.0)" in text
    assert "Acc@t2 the highest of all rows: **True** (94.0; the highest other: Naive multi-turn RL, 93.0)" in text
    assert "Delta above Naive multi-turn RL's: **True** (23.0 vs -4.0)" in text
    assert "Delta above Stage I only's: **False** (23.0 vs 32.0)" in text
    assert "Acc@t1 97.0 (base 56.0), Delta -4.0 [-6.0, -2.0]" in text
    rows["score"] = _row(0.60, 0.62, 0.02, lo=-0.01)  # an interval reaching below 0
    assert "interval above 0: **False**" in "\n".join(demo_report._md_checks(rows, list(rows)))


def test_the_revise_table_escapes_the_bars_of_its_headers():
    rows = {m: {"revise": {k: 0.5 for k in demo_report.REVISE_LABELS}} for m in ("base", "score")}
    header, rule, *body = demo_report._md_revise(rows, ["base", "score"])
    cells = lambda line: line.strip("|").replace("\\|", "").split("|")  # noqa: E731
    assert len(cells(header)) == len(cells(rule)) == len(cells(body[0])) == 1 + len(demo_report.REVISE_LABELS)
    assert "P(y2 != y1 \\| y1 wrong)" in header
