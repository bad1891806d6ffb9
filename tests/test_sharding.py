"""score_jax.sharding with score_jax.model: every mesh computes what one device computes.

Runs on the 8 fake CPU devices from conftest.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import contiguous_cache
from numerics import assert_close_f32, decoder_terms, grad_terms
from score_jax import model, sharding

# See tests/test_model.py: same numbers, about 4x less XLA:CPU compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}

# Tiny, GQA (4 query heads over 2 KV heads), with biases so every parameter kind is sharded.
CFG = model.ModelConfig(vocab_size=256, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                        mlp_dim=128, qkv_bias=True)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]


def mesh_of(shape) -> jax.sharding.Mesh:
    return sharding.make_mesh(sharding.MeshConfig(*shape))


def host_params(cfg, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), model.param_shapes(cfg))


def loss_and_logits(params, tokens):
    """Next-token cross-entropy; logits [B,T,V] as aux."""
    B, T = tokens.shape
    logits, _ = model.forward(CFG, params, tokens, jnp.broadcast_to(jnp.arange(T), (B, T)))
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits


_step = jax.value_and_grad(loss_and_logits, has_aux=True)


@pytest.fixture(scope="module")
def one_device():
    params = host_params(CFG)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (8, 12))
    out = jax.jit(_step, compiler_options=FAST_COMPILE)(params, tokens)
    return params, tokens, jax.device_get(out)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_matches_one_device(shape, one_device):
    params, tokens, ((want_loss, want_logits), want_grads) = one_device
    mesh = mesh_of(shape)
    p_shard = model.param_shardings(CFG, mesh)
    b_shard = sharding.batch_sharding(mesh, 2)
    logits_shard = sharding.named(mesh, ("batch", "length", "act_vocab"))
    with jax.set_mesh(mesh):
        step = jax.jit(_step, in_shardings=(p_shard, b_shard),
                       out_shardings=((sharding.replicated(mesh), logits_shard), p_shard),
                       compiler_options=FAST_COMPILE)
        (loss, logits), grads = step(jax.device_put(params, p_shard), jax.device_put(tokens, b_shard))
    assert logits.sharding.is_equivalent_to(logits_shard, 3)
    # Sharded matmuls sum their partial products in another order (and across devices): float32
    # rounding through the layers, then the loss's log-softmax over V and mean over 8 x 11
    # tokens, and the gradient's sum over all 8 x 12 positions.
    B, T = tokens.shape
    assert_close_f32(loss, want_loss, decoder_terms(CFG, T) + CFG.vocab_size + B * (T - 1), err_msg="loss")
    assert_close_f32(logits, want_logits, decoder_terms(CFG, T), err_msg="logits")
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        want = want_grads
        for k in path:
            want = want[k.key]
        assert_close_f32(g, want, grad_terms(CFG, T, B * T), err_msg=jax.tree_util.keystr(path))


def test_cached_decoding_on_a_mesh_matches_one_device():
    """Prefill plus one decode step with the KV cache sharded by CACHE_AXES."""
    mesh = mesh_of((2, 2, 2))
    params = host_params(CFG)
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (4, 9))
    pos = np.broadcast_to(np.arange(8), (4, 8))
    valid = np.arange(8)[None] < np.array([[8], [5], [7], [3]])

    def run(params, cache):
        logits, cache = contiguous_cache.cached_forward(CFG, params, tokens[:, :8], pos, valid, cache)
        step_pos = valid.sum(1, keepdims=True)
        last, cache = contiguous_cache.cached_forward(CFG, params, tokens[:, 8:], step_pos, None, cache)
        return logits, last, cache

    cache = contiguous_cache.init_cache(CFG, 4, 12)
    want = jax.jit(run, compiler_options=FAST_COMPILE)(params, cache)
    c_shard = sharding.tree_shardings(mesh, contiguous_cache.CACHE_AXES, cache)
    p_shard = model.param_shardings(CFG, mesh)
    with jax.set_mesh(mesh):
        got = jax.jit(run, in_shardings=(p_shard, c_shard), out_shardings=(None, None, c_shard),
                      compiler_options=FAST_COMPILE)(jax.device_put(params, p_shard), jax.device_put(cache, c_shard))
    assert got[2]["k"].sharding.spec == P(None, ("data", "fsdp"), None, "tensor", None)
    got, want = jax.device_get((got, want))
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        if np.issubdtype(b.dtype, np.integer):  # positions and the write index: exact
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
        else:  # logits and cached k/v, summed in another order on the mesh (12 cache slots)
            assert_close_f32(a, b, decoder_terms(CFG, 12), err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- rules


def test_init_params_are_created_sharded_with_the_rule_specs():
    mesh = mesh_of((2, 2, 2))
    params = model.init_params(CFG, jax.random.key(0), mesh)
    spec = lambda *path: _get(params, path).sharding.spec  # noqa: E731
    assert spec("embed") == P("tensor", "fsdp")
    assert spec("blocks", "mlp", "gate") == P(None, "fsdp", "tensor")
    assert spec("blocks", "mlp", "down") == P(None, "tensor", "fsdp")
    assert spec("blocks", "attn", "q") == P(None, "fsdp", "tensor", None)
    assert spec("blocks", "attn", "k") == P(None, "fsdp", "tensor", None)
    assert spec("blocks", "attn", "o") == P(None, "tensor", None, "fsdp")
    assert spec("blocks", "attn", "q_bias") == P(None, "tensor", None)
    assert spec("blocks", "attn_norm", "scale") == P(None, None)
    assert spec("final_norm", "scale") == P(None)
    assert np.all(np.asarray(params["final_norm"]["scale"]) == 1.0)  # RMSNorm starts as identity
    assert np.all(np.asarray(params["blocks"]["attn"]["k_bias"]) == 0.0)

    axes, shapes = model.param_axes(CFG), model.param_shapes(CFG)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = tuple(k.key for k in path)
        assert x.shape == _get(shapes, keys).shape
        assert x.sharding.mesh == mesh
        assert x.sharding.spec == sharding.logical_to_spec(_get(axes, keys), x.shape, mesh)
        # Created in place: every device holds only its own shard, never the full array.
        local = x.sharding.shard_shape(x.shape)
        assert all(s.data.shape == local for s in x.addressable_shards)
    assert params["embed"].addressable_shards[0].data.shape == (128, 32)
    assert params["blocks"]["mlp"]["gate"].addressable_shards[0].data.shape == (2, 32, 64)

    # The values do not depend on the mesh (threefry is partitionable), so a run resumed on
    # another topology draws the same initial weights.
    # (The one-device draw goes through a fast-compiling jit: same computation, and the same
    # numbers up to float rounding.)
    single = jax.jit(lambda key: model.init_params(CFG, key), compiler_options=FAST_COMPILE)(jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), params, single)


def test_undividable_axes_fall_back_to_replication():
    mqa = model.ModelConfig(vocab_size=250, num_layers=2, d_model=64, num_heads=4, num_kv_heads=1,
                            head_dim=16, mlp_dim=128)
    shard = model.param_shardings(mqa, mesh_of((1, 2, 4)))
    assert shard["blocks"]["attn"]["k"].spec == P(None, "fsdp", None, None)  # 1 KV head on tensor=4
    assert shard["blocks"]["attn"]["q"].spec == P(None, "fsdp", "tensor", None)  # 4 heads do divide
    assert shard["embed"].spec == P(None, "fsdp")  # vocab 250 is not a multiple of 4
    # Size-1 mesh axes are never named.
    shard = model.param_shardings(mqa, mesh_of((8, 1, 1)))
    assert all(s.spec == P(*(None,) * len(s.spec)) for s in jax.tree.leaves(shard))


def test_logical_to_spec():
    assert sharding.logical_to_spec(("batch", "length", "act_vocab")) == P(("data", "fsdp"), None, "tensor")
    assert sharding.logical_to_spec(("embed", "embed")) == P("fsdp", None)  # a mesh axis is used once
    assert sharding.logical_to_spec((None, "mlp")) == P(None, "tensor")
    mesh = mesh_of((2, 4, 1))
    assert sharding.logical_to_spec(("batch", "mlp"), (8, 6), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("batch",), (2,), mesh) == P("data")  # 2 rows: fsdp=4 dropped
    assert sharding.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    with pytest.raises(KeyError, match="no rule"):
        sharding.logical_to_spec(("embedding",))
    for names in model.param_axes(CFG).values():
        for leaf in jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple)):
            sharding.logical_to_spec(leaf)  # every name the model uses has a rule
    for names in contiguous_cache.CACHE_AXES.values():
        sharding.logical_to_spec(names)


def test_constrain_is_identity_without_a_mesh():
    x = jnp.ones((4, 3))
    assert sharding.constrain(x, ("batch", None)) is x


# ----------------------------------------------------------------------------- meshes


def test_resolve_shape():
    M = sharding.MeshConfig
    assert sharding.resolve_shape(M(-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.resolve_shape(M(2, -1, 2), 8) == (2, 2, 2)
    assert sharding.resolve_shape(M(1, 2, -1), 8) == (1, 2, 4)
    assert sharding.resolve_shape(M(2, 4, 1), 8) == (2, 4, 1)
    assert sharding.resolve_shape(M(), 1) == (1, 1, 1)


@pytest.mark.parametrize("cfg,message", [
    (sharding.MeshConfig(-1, -1, 1), "At most one mesh axis may be -1"),
    (sharding.MeshConfig(0, 1, 1), "positive or -1"),
    (sharding.MeshConfig(2, -3, 1), "positive or -1"),
    (sharding.MeshConfig(-1, 3, 1), "8 is not divisible by 3"),
    (sharding.MeshConfig(2, 2, 1), "needs 4 devices but 8 are available"),
    (sharding.MeshConfig(4, 4, 1), "needs 16 devices but 8 are available"),
])
def test_impossible_meshes_fail_clearly(cfg, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_shape(cfg, 8)
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(cfg)


def test_make_mesh():
    mesh = mesh_of((2, 2, 2))
    assert mesh.axis_names == sharding.MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())
    sub = sharding.make_mesh(sharding.MeshConfig(-1, 2, 1), devices=jax.devices()[:4])
    assert dict(sub.shape) == {"data": 2, "fsdp": 2, "tensor": 1}
    assert isinstance(sharding.batch_sharding(mesh, 2), NamedSharding)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_on_mesh_calls_the_function_under_the_mesh():
    mesh = mesh_of((2, 2, 2))
    seen = []
    run = sharding.on_mesh(mesh, lambda x, y=0: seen.append(dict(jax.sharding.get_abstract_mesh().shape)) or x + y)
    assert run(1, y=2) == 3
    assert seen == [dict(mesh.shape)]
    assert jax.sharding.get_abstract_mesh().empty  # only during the call
