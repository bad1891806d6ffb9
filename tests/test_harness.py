"""score_jax.jobs.harness: the mesh's batch check, the root key's inputs, and ``Run`` end to end
on a real tiny model, optimiser and Orbax manager with a hand-written step function: a new run's
steps, checkpoints, metrics rows, export and summary; resume from the last checkpoint with the
job's own progress; refusal to resume another seed's or run's checkpoint; the non-finite stop;
and the SIGTERM stop."""

import dataclasses
import json
import os
import pathlib
import re
import signal

import jax
import numpy as np
import pytest

from score_jax import checkpoints, learner, metrics, model, optim, settings, sharding
from score_jax.jobs import harness, keys

CFG = model.ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                        mlp_dim=48)
MESH_CFG = sharding.MeshConfig(data=2, fsdp=4)


def train_cfg(**kw) -> settings.TrainConfig:
    opt = optim.OptimConfig(learning_rate=1e-3, schedule="constant", warmup_steps=0, end_lr_fraction=1.0,
                            b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, clip_norm=0.0, grad_accum_steps=1,
                            max_nonfinite_steps=3)
    data = settings.TrainDataConfig(name="toy_arithmetic", data_dir="", manual_dir="", builder_seed=0,
                                    num_train=8, num_test=8, too_long="error", train_split="train")
    task = settings.TaskConfig(reward="toy", chat_template="toy", prompt_template="{prompt}", correction="again")
    base = dict(job="sft", seed=0, run=0, model_preset="test", model=CFG, mesh=MESH_CFG, data=data, task=task,
                optim=opt, checkpoint=checkpoints.CheckpointConfig(every_steps=2, keep=10, async_save=False),
                batch_size=8, total_steps=5, log_every=2, init_from="", tokenizer="", distributed=False,
                cpu_devices=0, compilation_cache_dir="", loss_chunk=0)
    return settings.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def mesh():
    return harness.make_mesh(MESH_CFG, 8)


def tx_of(cfg):
    return optim.make(cfg.optim, cfg.total_steps)


def init_of(cfg, mesh):
    return lambda: learner.init_state(cfg.model, tx_of(cfg), mesh, keys.key(harness.root_key(cfg), "init"))


def bump(state):
    """What the hand-written step does to the state: embed + 1, step + 1."""
    return {**state, "params": {**state["params"], "embed": state["params"]["embed"] + 1}, "step": state["step"] + 1}


class Steps:
    """A step function that records its calls; ``nonfinite(step)`` is what it reports."""

    def __init__(self, nonfinite=lambda step: 0, on_call=lambda step: None):
        self.calls, self.nonfinite, self.on_call = [], nonfinite, on_call

    def __call__(self, state, step):
        self.calls.append(step)
        self.on_call(step)
        return bump(state), {"nonfinite_consecutive": self.nonfinite(step), "tokens": 5, "loss": step}


def _rows(workdir):
    with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


def _leaves_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


# ----------------------------------------------------------------------------- mesh, key


def test_make_mesh_over_the_fake_devices():
    assert len(jax.devices()) == 8
    mesh = harness.make_mesh(sharding.MeshConfig(data=2, fsdp=4), 8)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1} and mesh.size == 8
    # Only data x fsdp split the batch: tensor=8 takes any batch size.
    assert dict(harness.make_mesh(sharding.MeshConfig(data=1, fsdp=1, tensor=8), 3).shape)["tensor"] == 8


def test_make_mesh_refuses_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match=re.escape("batch_size=6 must be divisible by data x fsdp = 4.")):
        harness.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2), 6)
    with pytest.raises(ValueError, match=re.escape("eval.batch_size=12 must be divisible by data x fsdp = 8.")):
        harness.make_mesh(sharding.MeshConfig(data=-1), 12, what="eval.batch_size")


def test_root_key_depends_on_seed_job_and_run():
    cfg = train_cfg(seed=4, job="stage1", run=2)
    data = lambda k: np.asarray(jax.random.key_data(k)).tolist()
    assert data(harness.root_key(cfg)) == data(keys.root(4, "stage1", 2))
    variants = [cfg, dataclasses.replace(cfg, seed=5), dataclasses.replace(cfg, job="stage2"),
                dataclasses.replace(cfg, run=3)]
    got = [tuple(data(harness.root_key(c))) for c in variants]
    assert len(set(got)) == 4


# ----------------------------------------------------------------------------- Run


def test_new_run_then_resume(tmp_path, mesh):
    cfg, workdir = train_cfg(), str(tmp_path)
    tx = tx_of(cfg)
    progress = {"next_index": 0}

    def extra_fn():
        return dict(progress)

    def step_fn(state, step):
        progress["next_index"] = (step + 1) * 8
        return steps(state, step)

    steps = Steps(nonfinite=lambda step: step % 2)  # 0, 1, 0, 1, 0: under max_nonfinite_steps=3
    with harness.Run(cfg, workdir, tx, mesh) as run:
        state0, extra = run.resume_or_init(init_of(cfg, mesh))
        assert (run.start, extra) == (0, {})
        out = run.loop(state0, step_fn, extra_fn)
        summary = run.finish(out, note="hello")

    assert steps.calls == [0, 1, 2, 3, 4]
    assert (out.step, out.stopped_early) == (5, False)
    want = state0
    for _ in range(5):
        want = bump(want)
    _leaves_equal(out.state, want)
    assert int(out.state["step"]) == 5

    # Periodic saves at every_steps=2, and the final one at total_steps=5.
    assert checkpoints.saved_steps(workdir) == [2, 4, 5]
    # Rows at log_every=2 and at the last step. The step_fn's loss is the step index it was given
    # (0..4), logged as its mean over the steps since the last row; nonfinite_consecutive is
    # logged as its value at the row's step (harness.LAST_VALUE_KEYS).
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [2, 4, 5]
    for r, loss, nonfinite in zip(rows, [0.5, 2.5, 4.0], [1.0, 1.0, 0.0]):
        assert set(r) == {"step", "loss", "tokens", "nonfinite_consecutive", "tokens_per_s"}
        assert (r["loss"], r["tokens"], r["nonfinite_consecutive"]) == (loss, 5.0, nonfinite)
        assert r["tokens_per_s"] > 0
    assert out.metrics == {k: v for k, v in rows[-1].items() if k != "step"}

    # Export and summary.
    digest = checkpoints.params_digest(want["params"])
    assert summary == {"step": 5, "final_metrics": out.metrics, "stopped_early": False, "params_sha256": digest,
                       "num_params": model.num_params(CFG), "note": "hello"}
    with open(tmp_path / "summary.json") as f:
        assert json.load(f) == summary
    exported = checkpoints.load_params(str(tmp_path / checkpoints.EXPORT_DIR), learner.abstract_params(CFG, mesh))
    _leaves_equal(exported, want["params"])
    assert checkpoints.params_digest(exported) == digest

    # A second Run on the same workdir resumes at the end: nothing to run, the job's progress back.
    def no_init():
        raise AssertionError("a resumed run must not initialise")

    again = Steps()
    with harness.Run(cfg, workdir, tx, mesh) as run:
        state, extra = run.resume_or_init(no_init)
        assert run.start == 5
        assert extra == {"next_index": 40}
        _leaves_equal(state, want)
        out2 = run.loop(state, again, extra_fn)
    assert again.calls == []
    assert (out2.step, out2.stopped_early) == (5, False)
    _leaves_equal(out2.state, want)
    assert [r["step"] for r in _rows(workdir)] == [2, 4, 5]  # the resumed writer keeps rows <= its start
    assert checkpoints.saved_steps(workdir) == [2, 4, 5]
    # Finishing again (a crash between the last checkpoint and summary.json) keeps the final metrics.
    with harness.Run(cfg, workdir, tx, mesh) as run:
        assert run.finish(out2, note="hello") == summary


def test_resume_continues_from_a_mid_run_checkpoint(tmp_path, mesh):
    cfg, workdir = train_cfg(total_steps=4), str(tmp_path)
    tx = tx_of(cfg)
    with harness.Run(cfg, workdir, tx, mesh) as run:
        state0, _ = run.resume_or_init(init_of(cfg, mesh))
        run.loop(state0, Steps(), lambda: {"at": "first"})
    # Same workdir, longer run: resumes at 4 and runs only steps 5..6.
    longer = dataclasses.replace(cfg, total_steps=6)
    steps = Steps()
    with harness.Run(longer, workdir, tx, mesh) as run:
        state, extra = run.resume_or_init(init_of(longer, mesh))
        assert (run.start, extra) == (4, {"at": "first"})
        out = run.loop(state, steps, lambda: {"at": "second"})
    assert steps.calls == [4, 5]
    want = state0
    for _ in range(6):
        want = bump(want)
    _leaves_equal(out.state, want)
    assert checkpoints.saved_steps(workdir) == [2, 4, 6]
    assert [r["step"] for r in _rows(workdir)] == [2, 4, 6]


def _finished_run(cfg, workdir, mesh):
    with harness.Run(cfg, workdir, tx_of(cfg), mesh) as run:
        state0, _ = run.resume_or_init(init_of(cfg, mesh))
        run.finish(run.loop(state0, Steps(), dict))


def _snapshot(workdir):
    """Every file under workdir with its bytes (what a refused start must leave as it was)."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(pathlib.Path(workdir).rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("change, difference", [
    (dict(seed=1), "seed: 0 there, 1 here"),
    (dict(run=2), "run: 0 there, 2 here"),
    (dict(job="stage1"), "job: 'sft' there, 'stage1' here"),
    (dict(model_preset="tiny"), "model_preset: 'test' there, 'tiny' here"),
    (dict(model=dataclasses.replace(CFG, d_model=64)), "model.d_model: 32 there, 64 here"),
    (dict(data=dataclasses.replace(train_cfg().data, num_train=16)), "data.num_train: 8 there, 16 here"),
    (dict(optim=dataclasses.replace(train_cfg().optim, grad_accum_steps=2)),
     "optimizer: 'apply_if_finite(chain(adamw))' there, 'MultiSteps(apply_if_finite(chain(adamw)), every 2)' here"),
])
def test_another_run_refuses_the_workdir_and_keeps_its_work(tmp_path, mesh, change, difference):
    cfg, workdir = train_cfg(total_steps=2), str(tmp_path)
    _finished_run(cfg, workdir, mesh)
    assert json.loads((tmp_path / harness.IDENTITY_FILE).read_text()) == harness.identity(cfg)
    before = _snapshot(workdir)
    other = dataclasses.replace(cfg, **change)
    msg = (f"{workdir} holds the work of another run ({difference}); use a new --workdir, or the settings it "
           "was written with.")
    with pytest.raises(harness.WorkdirError, match=re.escape(msg)):
        harness.start(other, workdir, {"changed": True})  # what main calls before anything else
    with harness.Run(other, workdir, tx_of(other), mesh) as run:
        with pytest.raises(harness.WorkdirError, match=re.escape(msg)):
            run.resume_or_init(init_of(other, mesh))
    assert _snapshot(workdir) == before  # nothing renamed, rewritten or deleted
    assert checkpoints.saved_steps(workdir) == [2]


def test_checkpoint_of_another_optimiser_is_a_mismatch_not_corrupt(tmp_path, mesh):
    """A workdir from before identity.json: the checkpoint's own arrays tell it apart."""
    cfg, workdir = train_cfg(total_steps=2), str(tmp_path)
    _finished_run(cfg, workdir, mesh)
    (tmp_path / harness.IDENTITY_FILE).unlink()
    before = _snapshot(workdir)
    for change in (dict(optim=dataclasses.replace(cfg.optim, grad_accum_steps=2)),
                   dict(model=dataclasses.replace(CFG, mlp_dim=64))):
        other = dataclasses.replace(cfg, **change)
        with harness.Run(other, workdir, tx_of(other), mesh) as run:
            with pytest.raises(checkpoints.MismatchError, match="holds another model or optimiser"):
                run.resume_or_init(init_of(other, mesh))
        assert _snapshot(workdir) == before
    # The same config still resumes it, and claims the workdir again.
    with harness.Run(cfg, workdir, tx_of(cfg), mesh) as run:
        run.resume_or_init(init_of(cfg, mesh))
    assert run.start == 2 and (tmp_path / harness.IDENTITY_FILE).exists()


def test_start_refuses_a_file_and_writes_config_only_when_accepted(tmp_path):
    cfg = train_cfg()
    (tmp_path / "f").write_text("x")
    with pytest.raises(harness.WorkdirError, match="is a file, not a directory"):
        harness.start(cfg, str(tmp_path / "f"), {})
    harness.start(cfg, str(tmp_path / "new" / "run"), {"a": 1})
    assert json.loads((tmp_path / "new" / "run" / "config.json").read_text()) == {"a": 1}
    assert not (tmp_path / "new" / "run" / harness.IDENTITY_FILE).exists()  # claimed by the first checkpoint


def test_nonfinite_stop_saves_then_raises(tmp_path, mesh):
    cfg, workdir = train_cfg(total_steps=10), str(tmp_path)
    tx = tx_of(cfg)
    steps = Steps(nonfinite=lambda step: step)  # steps 1, 2, 3 report 0, 1, 2; step 4 reports 3
    msg = ("3 consecutive steps had non-finite gradients (optim.max_nonfinite_steps=3); the last good weights "
           "are saved at step 4. Lower optim.learning_rate or check the data.")
    with harness.Run(cfg, workdir, tx, mesh) as run:
        state0, _ = run.resume_or_init(init_of(cfg, mesh))
        with pytest.raises(harness.NonFiniteError, match=re.escape(msg)):
            run.loop(state0, steps, lambda: {"k": 1})
    assert steps.calls == [0, 1, 2, 3]
    assert checkpoints.saved_steps(workdir) == [2, 4]
    with harness.Run(cfg, workdir, tx, mesh) as run:
        state, extra = run.resume_or_init(init_of(cfg, mesh))
    assert (run.start, extra) == (4, {"k": 1})
    want = state0
    for _ in range(4):
        want = bump(want)
    _leaves_equal(state, want)


def test_sigterm_saves_and_stops_early(tmp_path, mesh):
    # every_steps=3, so the checkpoint at step 2 can only be the stop's own save.
    cfg = train_cfg(total_steps=6, log_every=5,
                    checkpoint=checkpoints.CheckpointConfig(every_steps=3, keep=10, async_save=False))
    workdir, tx = str(tmp_path), tx_of(cfg)

    def term_during_step_2(step):
        if step == 1:  # the call that finishes step 2
            os.kill(os.getpid(), signal.SIGTERM)

    steps = Steps(on_call=term_during_step_2)
    before = signal.getsignal(signal.SIGTERM)
    with harness.Run(cfg, workdir, tx, mesh) as run:
        state0, _ = run.resume_or_init(init_of(cfg, mesh))
        out = run.loop(state0, steps, lambda: {"k": 2})
        summary = run.finish(out)
    assert signal.getsignal(signal.SIGTERM) == before
    assert steps.calls == [0, 1]
    assert (out.step, out.stopped_early) == (2, True)
    assert summary == {"step": 2, "stopped_early": True}
    assert not (tmp_path / "summary.json").exists()
    assert not (tmp_path / checkpoints.EXPORT_DIR).exists()
    assert checkpoints.saved_steps(workdir) == [2]
    # The stop logs its step even off the log_every grid.
    assert [r["step"] for r in _rows(workdir)] == [2]
    assert out.metrics["loss"] == 0.5  # the mean over steps 1-2 (losses 0 and 1)
    with harness.Run(cfg, workdir, tx, mesh) as run:
        state, extra = run.resume_or_init(init_of(cfg, mesh))
    assert (run.start, extra) == (2, {"k": 2})
    _leaves_equal(state, bump(bump(state0)))


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(tmp_path, mesh, monkeypatch):
    cfg, workdir = train_cfg(total_steps=6), str(tmp_path)
    real = checkpoints.shutil.disk_usage

    def full_after_step_2(path):  # free space runs out once the first checkpoint is written
        usage = real(path)
        return usage._replace(free=0) if checkpoints.saved_steps(workdir) else usage
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", full_after_step_2)
    steps = Steps()
    with pytest.raises(checkpoints.SaveError) as e:
        with harness.Run(cfg, workdir, tx_of(cfg), mesh) as run:
            state0, _ = run.resume_or_init(init_of(cfg, mesh))
            run.loop(state0, steps, dict)
    assert re.fullmatch(r"Not enough disk space for the checkpoint of step 4 in \S+/checkpoints \(needs about "
                        r"[0-9.]+ MB, 0.0 MB free\); free space or move --workdir, then rerun the same command: it "
                        r"resumes from step 2, the last complete checkpoint.", str(e.value)), str(e.value)
    assert steps.calls == [0, 1, 2, 3] and checkpoints.saved_steps(workdir) == [2]
    monkeypatch.undo()
    with harness.Run(cfg, workdir, tx_of(cfg), mesh) as run:
        run.resume_or_init(init_of(cfg, mesh))
    assert run.start == 2


def test_without_identity_json_config_json_waits_for_the_checkpoint_check(tmp_path, mesh):
    cfg, workdir = train_cfg(total_steps=2), str(tmp_path)
    harness.start(cfg, workdir, {"first": True})
    _finished_run(cfg, workdir, mesh)
    (tmp_path / harness.IDENTITY_FILE).unlink()  # a workdir written before identity.json
    other = dataclasses.replace(cfg, seed=1)
    harness.start(other, workdir, {"second": True})
    with harness.Run(other, workdir, tx_of(other), mesh) as run:
        with pytest.raises(harness.WorkdirError, match="seed: 0 there, 1 here"):
            run.resume_or_init(init_of(other, mesh))
    assert json.loads((tmp_path / "config.json").read_text()) == {"first": True}
    harness.start(cfg, workdir, {"third": True})  # the same run: written once its checkpoint is found
    with harness.Run(cfg, workdir, tx_of(cfg), mesh) as run:
        run.resume_or_init(init_of(cfg, mesh))
    assert json.loads((tmp_path / "config.json").read_text()) == {"third": True}


@pytest.mark.parametrize("content", ["[1, 2]", "3", "not json"])
def test_an_identity_json_that_is_not_an_object_is_unreadable(tmp_path, content):
    (tmp_path / harness.IDENTITY_FILE).write_text(content)
    with pytest.raises(harness.WorkdirError, match="identity.json is unreadable"):
        harness.check_workdir(train_cfg(), str(tmp_path))


def test_a_metrics_line_cut_short_does_not_stop_a_resume(tmp_path, mesh):
    cfg, workdir = train_cfg(total_steps=4, log_every=1), str(tmp_path)
    _finished_run(cfg, workdir, mesh)
    path = tmp_path / metrics.METRICS_FILE
    path.write_text(path.read_text()[:-20])  # the last row half-written
    assert [r["step"] for r in metrics.read_jsonl(str(path))] == [1, 2, 3]
    with harness.Run(cfg, workdir, tx_of(cfg), mesh) as run:
        state, _ = run.resume_or_init(init_of(cfg, mesh))
        summary = run.finish(run.loop(state, Steps(), dict))
    assert summary["step"] == 4
    metrics.Writer(workdir, 8, first_step=2).close()  # a resume from step 2 rewrites the file whole
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2]
