"""End-to-end runs of `python -m score_jax.main` for the sft job, as a user runs them."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

import conftest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small dataset so building it is quick; one build shared by every run below.
COMMON = ["--config.data.num_train=2000", "--config.data.num_test=200", "--config.log_every=5",
          "--config.batch_size=16", "--config.data.seq_len=96"]


def _env():
    env = dict(os.environ)
    # One CPU device (the runs under test are single-device), fast compiles as in conftest.
    env["XLA_FLAGS"] = conftest.FAST_COMPILE_FLAGS
    env["PYTHONPATH"] = str(ROOT)
    return env


def _cmd(workdir, data_dir, *overrides):
    return [sys.executable, "-m", "score_jax.main", "--config=configs/sft.py:tiny",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *COMMON, *overrides]


def _run(workdir, data_dir, *overrides, check=True):
    p = subprocess.run(_cmd(workdir, data_dir, *overrides), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"run failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _summary(workdir):
    return json.loads((pathlib.Path(workdir) / "summary.json").read_text())


def _complete_steps(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted 30-step run."""
    wd = tmp_path_factory.mktemp("ref")
    p = _run(wd, data_dir, "--config.total_steps=30", "--config.checkpoint.every_steps=10")
    return wd, p


@pytest.mark.slow
def test_run_writes_every_artefact(reference):
    wd, p = reference
    s = _summary(wd)
    assert s["step"] == 30 and not s["stopped_early"]
    assert len(s["params_sha256"]) == 64
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["job"] == "sft" and cfg["total_steps"] == 30
    assert (wd / "export" / "_CHECKPOINT_METADATA").exists()
    assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
    assert _complete_steps(wd) == [10, 20, 30]
    assert "step 30/30" in p.stdout and "ETA" in p.stdout


@pytest.mark.slow
def test_kill9_then_resume_is_bitwise_identical(tmp_path, data_dir, reference):
    ref_wd, _ = reference
    wd = tmp_path / "run"
    proc = subprocess.Popen(_cmd(wd, data_dir, "--config.total_steps=30", "--config.checkpoint.every_steps=10"),
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not _complete_steps(wd) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _complete_steps(wd), "no checkpoint appeared before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert not (wd / "summary.json").exists(), "the run finished before it could be killed"
    p = _run(wd, data_dir, "--config.total_steps=30", "--config.checkpoint.every_steps=10")
    assert "Resumed from" in p.stderr
    assert _summary(wd)["params_sha256"] == _summary(ref_wd)["params_sha256"]


def signal_after(cmd, until, sig=signal.SIGTERM):
    """Runs ``cmd``, sends ``sig`` after the first output line for which ``until(line)`` holds,
    and returns (exit code, output after that line); the process is killed on the way out."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if until(line):
                break
        proc.send_signal(sig)
        out = proc.stdout.read()
        return proc.wait(timeout=120), out
    finally:
        proc.kill()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_and_exits_zero(tmp_path, data_dir, sig):
    wd = tmp_path / "run"
    rc, out = signal_after(_cmd(wd, data_dir, "--config.total_steps=100000", "--config.checkpoint.every_steps=0"),
                           lambda line: line.startswith("step "), sig)  # training is under way
    assert rc == 0, out[-2000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-2000:]
    assert f"{signal.Signals(sig).name} received" in out
    steps = _complete_steps(wd)
    assert len(steps) == 1 and 5 <= steps[0] < 100000, steps
    assert not (wd / "summary.json").exists()
    # The saved step resumes.
    p = _run(wd, data_dir, f"--config.total_steps={steps[0] + 2}", "--config.checkpoint.every_steps=0")
    assert f"at step {steps[0]}" in p.stderr and _summary(wd)["step"] == steps[0] + 2


@pytest.mark.slow
def test_a_signal_during_start_up_says_so_in_one_line(tmp_path, data_dir):
    wd = tmp_path / "run"
    # The job has started (its first log line), nothing is saved yet.
    rc, out = signal_after(_cmd(wd, data_dir, "--config.total_steps=5"), lambda line: "Job sft in" in line)
    assert rc == 128 + signal.SIGTERM, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    assert "Stopped by SIGTERM" in out.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_changed_config_or_another_job_refuses_a_finished_workdir(tmp_path, data_dir, reference):
    ref_wd, _ = reference
    wd = tmp_path / "run"
    shutil.copytree(ref_wd, wd)
    before = {str(p.relative_to(wd)): p.read_bytes() for p in sorted(wd.rglob("*")) if p.is_file()}
    for cmd in (_cmd(wd, data_dir, "--config.total_steps=30", "--config.optim.grad_accum_steps=2"),
                [c.replace("sft.py:tiny", "sft.py:toy") for c in _cmd(wd, data_dir, "--config.total_steps=30")]):
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 2, p.stderr[-2000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("Error: ") and "holds the work of another run" in last and "--workdir" in last, last
        assert "Traceback" not in p.stderr
    # stage1 started in the sft workdir (with an init_from that exists: the sft's own export).
    p = subprocess.run([sys.executable, "-m", "score_jax.main", "--config=configs/stage1.py:tiny", f"--workdir={wd}",
                        f"--config.data.data_dir={data_dir}", f"--config.init_from={wd}/export",
                        f"--config.rl.reference={wd}/export"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and "job: 'sft' there, 'stage1' here" in p.stderr, p.stderr[-2000:]
    after = {str(p.relative_to(wd)): p.read_bytes() for p in sorted(wd.rglob("*")) if p.is_file()}
    assert after == before  # checkpoints, export, summary, metrics and config.json as they were


@pytest.mark.slow
def test_corrupted_latest_checkpoint_is_skipped(tmp_path, data_dir):
    wd = tmp_path / "run"
    _run(wd, data_dir, "--config.total_steps=20", "--config.checkpoint.every_steps=10")
    # Damage the newest checkpoint's array data, as a half-copied directory would be.
    for f in (wd / "checkpoints" / "20" / "state").rglob("*"):
        if f.is_file() and f.parent.name in ("d", "ocdbt.process_0") or f.name == "manifest.ocdbt":
            f.write_bytes(b"garbage")
    p = _run(wd, data_dir, "--config.total_steps=25", "--config.checkpoint.every_steps=10")
    assert "unreadable" in p.stderr and "Resumed from" in p.stderr and "at step 10" in p.stderr
    assert "Traceback" not in p.stderr and "Event loop is closed" not in p.stderr, p.stderr[-3000:]
    assert _summary(wd)["step"] == 25
    assert list((wd / "checkpoints").glob("20.corrupt.*"))


@pytest.mark.slow
def test_sft_halves_the_loss(tmp_path, data_dir):
    wd = tmp_path / "run"
    p = _run(wd, data_dir, "--config.total_steps=150", "--config.checkpoint.every_steps=0",
             "--config.log_every=10")
    losses = [float(line.split("loss ")[1].split(" ")[0]) for line in p.stdout.splitlines()
              if line.startswith("step ")]
    assert losses[-1] < 0.5 * losses[0], losses


def test_unknown_config_key_fails_before_work(tmp_path, data_dir):
    wd = tmp_path / "run"
    p = _run(wd, data_dir, "--config.optim.lerning_rate=1e-3", check=False)
    assert p.returncode == 2
    assert "Config error" in p.stderr and "learning_rate" in p.stderr
    assert "Traceback" not in p.stderr
    assert not wd.exists()


def test_invalid_config_value_fails_before_work(tmp_path, data_dir):
    wd = tmp_path / "run"
    p = _run(wd, data_dir, "--config.optim.schedule=linear", check=False)
    assert p.returncode == 2 and "optim.schedule='linear'" in p.stderr
    assert not wd.exists()


@pytest.mark.slow
def test_nonfinite_steps_stop_with_a_clear_error(tmp_path, data_dir):
    wd = tmp_path / "run"
    # A learning rate this large blows the weights up within a few steps; every later
    # gradient is non-finite and skipped, until the limit stops the run.
    p = _run(wd, data_dir, "--config.total_steps=200", "--config.optim.learning_rate=1e30",
             "--config.optim.warmup_steps=0", "--config.optim.clip_norm=0", "--config.optim.max_nonfinite_steps=3",
             "--config.checkpoint.every_steps=0", check=False)
    assert p.returncode != 0
    assert "consecutive steps had non-finite gradients" in p.stderr
    assert len(_complete_steps(wd)) == 1


@pytest.mark.slow
def test_relative_workdir(tmp_path, data_dir):
    """The README's command relies on the default, relative workdir (runs/<job>_<preset>)."""
    cmd = [sys.executable, "-m", "score_jax.main", f"--config={ROOT}/configs/sft.py:tiny", "--workdir=rel/run",
           f"--config.data.data_dir={data_dir}", *COMMON, "--config.total_steps=4", "--config.checkpoint.every_steps=2"]
    p = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _summary(tmp_path / "rel" / "run")["step"] == 4
    assert _complete_steps(tmp_path / "rel" / "run") == [2, 4]


@pytest.mark.parametrize("config, overrides, expected", [
    ("configs/nope.py", [], "Config error: cannot load the config file configs/nope.py: [Errno 2] No such file"),
    ("configs/stage1.py:tiny,math", [], "task.chat_template is empty (no template is known for this model preset); "
                                        "set --config.task.chat_template to one of"),
    ("configs/sft.py:toy", ["--config.init_from={reference}/export"], "is of another model than this config's"),
    ("configs/sft.py:tiny", ["--workdir=/proc/score_jax_run"], "Cannot write to --workdir=/proc/score_jax_run"),
    # Its metadata intact, its array data cut short (a partial copy): Orbax fails in its threads.
    ("configs/sft.py:tiny", ["--config.init_from={truncated}"], "is unreadable (truncated or partly copied?"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, data_dir, reference, config, overrides, expected):
    truncated = tmp_path / "truncated_export"
    shutil.copytree(reference[0] / "export", truncated)
    for f in truncated.rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:10])
    overrides = [o.format(reference=reference[0], truncated=truncated) for o in overrides]
    if not any(o.startswith("--workdir") for o in overrides):
        overrides.append(f"--workdir={tmp_path / 'run'}")
    cmd = [sys.executable, "-m", "score_jax.main", f"--config={config}", f"--config.data.data_dir={data_dir}",
           *overrides]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "Event loop is closed" not in p.stderr, p.stderr[-3000:]
    assert expected in p.stderr.strip().splitlines()[-1], p.stderr[-2000:]
    assert not (tmp_path / "run" / "summary.json").exists()
