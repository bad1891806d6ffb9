import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from score_jax import checkpoints, learner, model, sharding

CFG = model.ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                        head_dim=8, mlp_dim=48)


def _abstract(mesh):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        model.param_shapes(CFG), model.param_shardings(CFG, mesh))


def test_export_restores_onto_a_different_mesh(tmp_path):
    src_mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    params = model.init_params(CFG, jax.random.key(0), src_mesh)
    checkpoints.export_params(str(tmp_path / "export"), params)
    for shape in [(1, 8, 1), (1, 1, 8), (8, 1, 1)]:
        mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
        got = checkpoints.load_params(str(tmp_path / "export"), _abstract(mesh))
        jax.tree.map(np.testing.assert_array_equal, got, params)
        assert got["embed"].sharding == model.param_shardings(CFG, mesh)["embed"]
        assert checkpoints.params_digest(got) == checkpoints.params_digest(params)


def test_missing_export_names_the_path_and_the_fix(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
    with pytest.raises(FileNotFoundError, match=r"No params export found at .*nowhere; create it with: run X"):
        checkpoints.load_params(str(tmp_path / "nowhere"), _abstract(mesh), how_to_create="run X")


def test_export_of_another_model_is_refused(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
    other = model.ModelConfig(vocab_size=64, num_layers=2, d_model=16, num_heads=2, num_kv_heads=2,
                              head_dim=8, mlp_dim=48)
    checkpoints.export_params(str(tmp_path / "e"), model.init_params(other, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"is of another model than this config's \(params.blocks.attn.k is "
                                         r"\(2, 16, 2, 8\) float32 there, \(2, 32, 2, 8\) float32 here\)"):
        checkpoints.load_params(str(tmp_path / "e"), _abstract(mesh))


@pytest.mark.parametrize("damage, message", [
    ("metadata", "its metadata lists no arrays"),
    ("data", "is unreadable (truncated or partly copied?"),
])
def test_a_truncated_export_is_unreadable_not_another_model(tmp_path, damage, message):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=8))
    path = tmp_path / "e"
    checkpoints.export_params(str(path), model.init_params(CFG, jax.random.key(0)))
    files = [f for f in path.rglob("*") if f.is_file()]
    for f in files:  # cut every file of one kind short, as an interrupted copy would
        is_data = f.parent.name == "d"
        if is_data == (damage == "data") and f.stat().st_size > 20:
            f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(ValueError) as e:
        checkpoints.load_params(str(path), _abstract(mesh))
    assert message in str(e.value) and "another model" not in str(e.value)


def test_digest_changes_with_any_bit():
    params = model.init_params(CFG, jax.random.key(0))
    d0 = checkpoints.params_digest(params)
    assert d0 == checkpoints.params_digest(jax.tree.map(lambda x: x + 0, params))
    bumped = dict(params, embed=params["embed"].at[0, 0].add(1e-7))
    assert checkpoints.params_digest(bumped) != d0


def test_manager_round_trip_and_keep(tmp_path):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    tx = optax.adamw(1e-3)
    state = learner.init_state(CFG, tx, mesh, jax.random.key(0))
    mgr = checkpoints.Manager(str(tmp_path), every_steps=2, keep=2, async_save=True)
    for step in range(1, 7):
        mgr.save(step, state, lambda: {"data": {"next_index": step}, "seed": 0})
    mgr.wait()
    assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == [4, 6]
    step, restored, extra = mgr.restore_latest(learner.abstract_state(CFG, tx, mesh))
    mgr.close()
    assert step == 6 and extra == {"data": {"next_index": 6}, "seed": 0}
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert restored["params"]["embed"].sharding == state["params"]["embed"].sharding


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_request_turns_sigterm_and_sigint_into_a_flag_and_a_second_one_aborts(sig):
    before = {s: signal.getsignal(s) for s in checkpoints.STOP_SIGNALS}
    with checkpoints.StopRequest() as stop:
        assert not stop
        os.kill(os.getpid(), sig)
        assert stop and stop.signum == sig
        with pytest.raises(checkpoints.Interrupted) as e:
            os.kill(os.getpid(), sig)  # the second Ctrl-C
        assert e.value.signum == sig
    assert {s: signal.getsignal(s) for s in checkpoints.STOP_SIGNALS} == before


def test_outside_a_stop_request_a_signal_interrupts_at_once():
    before = {s: signal.getsignal(s) for s in checkpoints.STOP_SIGNALS}
    try:
        checkpoints.raise_on_signals()
        with pytest.raises(checkpoints.Interrupted, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_export_replaces_the_old_one_whole(tmp_path, monkeypatch):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1))
    abstract = _abstract(mesh)
    old = jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding), abstract)
    new = jax.tree.map(lambda a: jax.device_put(jnp.ones(a.shape, a.dtype), a.sharding), abstract)
    path = tmp_path / "export"
    checkpoints.export_params(str(path), old)

    def fail(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoints.ocp.StandardCheckpointer, "save", fail)
    with pytest.raises(OSError):
        checkpoints.export_params(str(path), new)
    monkeypatch.undo()
    restored = checkpoints.load_params(str(path), abstract)  # the old export, whole
    jax.tree.map(lambda a: np.testing.assert_array_equal(a, 0), restored)
    checkpoints.export_params(str(path), new)
    jax.tree.map(lambda a: np.testing.assert_array_equal(a, 1), checkpoints.load_params(str(path), abstract))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
