"""The real presets in configs/models.py, checked by shape only: nothing is allocated."""

import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType

import contiguous_cache
from configs import models
from score_jax import model, sharding

# Published parameter counts of the Hugging Face checkpoints (sum of all tensor sizes).
PUBLISHED = {
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
    "llama3.1-8b": 8_030_261_248,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma3-1b": 999_885_952,
    # The text decoder only. The published gemma-3-4b checkpoint has 4,300,079,472 parameters;
    # the other 419,816,304 are its SigLIP vision tower and the multimodal projector.
    "gemma3-4b": 3_880_263_168,
}


def preset(name: str, **overrides) -> model.ModelConfig:
    return model.ModelConfig(**dict(models.get(name).to_dict(), **overrides))


def test_every_real_preset_is_pinned():
    assert set(PUBLISHED) == set(models.PRESETS) - {"tiny", "toy", "bench"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_num_params_matches_published(name):
    assert model.num_params(preset(name)) == PUBLISHED[name]


def test_small_presets_build():
    assert 700_000 < model.num_params(preset("toy")) < 950_000  # "about 0.9M" in configs/models.py
    for name in ("tiny", "toy", "bench"):
        cfg = preset(name)
        shapes = model.param_shapes(cfg)
        assert ("lm_head" in shapes) == (not cfg.tie_embeddings)


def test_forward_shape_of_a_real_preset_without_allocating():
    cfg = preset("gemma2-2b", dtype="bfloat16")
    tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    fwd = lambda p, t, q: model.forward(cfg, p, t, q)  # noqa: E731
    logits, cache = jax.eval_shape(fwd, model.param_shapes(cfg), tokens, tokens)
    assert logits.shape == (1, 16, 256_000) and logits.dtype == jnp.float32
    assert cache is None

    cache = jax.eval_shape(lambda: contiguous_cache.init_cache(cfg, 1, 32))
    assert cache["k"].shape == (26, 1, 32, 4, 256) and cache["k"].dtype == jnp.bfloat16
    step = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    fwd = lambda p, t, q, c: contiguous_cache.cached_forward(cfg, p, t, q, None, c)  # noqa: E731
    logits, new_cache = jax.eval_shape(fwd, model.param_shapes(cfg), step, step, cache)
    assert logits.shape == (1, 1, 256_000)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_cache) == jax.tree.map(lambda a: (a.shape, a.dtype), cache)


def test_llama8b_shards_every_large_matrix_over_the_whole_mesh():
    cfg = preset("llama3.1-8b")
    mesh = AbstractMesh((1, 4, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    shapes = model.param_shapes(cfg)
    shards = model.param_shardings(cfg, mesh)
    per_device = 0
    for path, s in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        spec = _get(shards, path).spec
        if len(s.shape) - ("layers" in _get(model.param_axes(cfg), path)) < 2:
            assert all(a is None for a in spec), path  # norms stay replicated
            per_device += math.prod(s.shape)
            continue
        # Every matrix is split 4 ways on fsdp and 2 ways on tensor: no device holds a full copy.
        assert {a for a in spec if a} == {"fsdp", "tensor"}, (path, spec)
        shard_elems = math.prod(_get(shards, path).shard_shape(s.shape))
        assert shard_elems * 8 == math.prod(s.shape), path
        per_device += shard_elems
    assert per_device < 1.001 * model.num_params(cfg) / 8  # ~1B of the 8B parameters per device


def _get(tree, path):
    for k in path:
        tree = tree[getattr(k, "key", k)]
    return tree
