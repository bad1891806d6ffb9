"""Hugging Face checkpoints in and out: config.json <-> ModelConfig, safetensors <-> our params.

Supported architectures (``ARCHITECTURES``): Llama 3.x, Qwen 2.5, Qwen 3, Gemma 2, Gemma 3 text.

Weight layout. A torch Linear stores [out, in]; ours are einsum operands with named dimensions
(legend in score_jax/model.py) and the layers stacked on a leading L axis:

    q_proj [N*H, D] -> blocks.attn.q [L,D,N,H]     k/v_proj [K*H, D] -> blocks.attn.k/v [L,D,K,H]
    o_proj [D, N*H] -> blocks.attn.o [L,N,H,D]     q/k/v_proj.bias  -> blocks.attn.*_bias [L,N|K,H]
    gate/up_proj [F, D] -> blocks.mlp.gate/up [L,D,F]   down_proj [D, F] -> blocks.mlp.down [L,F,D]
    embed_tokens [V, D] -> embed [V,D]              lm_head [V, D] -> lm_head [D,V]

RoPE needs no permutation: our ``model._rope`` rotates halves of the head dim exactly as
Hugging Face's ``rotate_half`` does. The Gemma norms store w of the scale (1 + w) in both.

Loading places every tensor straight into its sharded layout: ``jax.make_array_from_callback``
asks for each local device's block, which is read by slice from the memory-mapped safetensors
file, so a host reads only what its devices hold and never a whole copy of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401 - registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util
from jax.experimental import multihost_utils

from score_jax import model, sharding

# Hugging Face class -> its model_type.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
}
_GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
_QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
_ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
# Tensors old checkpoints carry that no forward reads.
_EXPECTED_UNUSED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_CONFIG, _SINGLE, _INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
_NOT_ARCHITECTURE = ("param_dtype", "dtype", "remat", "scan_layers")
_LLAMA3_FIELDS = ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_pos")


# ----------------------------------------------------------------------------- config.json -> ModelConfig


def config_from_hf(path: str) -> model.ModelConfig:
    """The ModelConfig of the Hugging Face checkpoint directory ``path`` (its config.json).

    Reads both the transformers-5 keys (``rope_parameters``, ``layer_types``) and the older ones
    real checkpoints carry (``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``,
    ``sliding_window_pattern``). Dtype, remat and scan fields keep the ModelConfig defaults.
    Raises ValueError for an unsupported architecture or a feature score_jax.model lacks.
    """
    with open(os.path.join(path, _CONFIG)) as f:
        return config_from_dict(json.load(f))


def config_from_dict(hf: dict) -> model.ModelConfig:
    """``config_from_hf`` on an already parsed config.json."""
    archs = hf.get("architectures") or []
    by_type = {v: k for k, v in ARCHITECTURES.items()}
    arch = _check_architecture(archs[0] if archs else by_type.get(hf.get("model_type"), hf.get("model_type")))
    gemma = arch in _GEMMA
    for key in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
        if hf.get(key):
            raise ValueError(f"{arch} with {key}=true is not supported by score_jax.model (no output/MLP biases, "
                             f"causal attention only).")
    try:
        D, N, L = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
        V, F = hf["vocab_size"], hf["intermediate_size"]
    except KeyError as e:
        raise ValueError(f"config.json of this {arch} checkpoint lacks {e}; it is incomplete, re-download it.") from None
    act_key = "hidden_activation" if gemma and hf.get("hidden_activation") else "hidden_act"
    act = hf.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"{arch} with {act_key}={act!r} is not supported; score_jax.model has {sorted(_ACTIVATIONS)}.")
    local = _local_layers(hf, arch, L)
    window = hf.get("sliding_window", 4096 if gemma else None) if any(local) else 0
    return model.ModelConfig(
        vocab_size=V, num_layers=L, d_model=D, num_heads=N, num_kv_heads=hf.get("num_key_value_heads") or N,
        head_dim=hf.get("head_dim") or D // N, mlp_dim=F, activation=_ACTIVATIONS[act],
        norm_eps=hf.get("rms_norm_eps", 1e-6), norm_plus_one=gemma, sandwich_norm=gemma, embed_scale=gemma,
        qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
        query_scale=float(hf.get("query_pre_attn_scalar", 256)) if gemma else 0.0,
        # Gemma 3's modeling code ignores attn_logit_softcapping, so we do too.
        attn_softcap=float(hf.get("attn_logit_softcapping", 50.0) or 0.0) if arch == "Gemma2ForCausalLM" else 0.0,
        final_softcap=float(hf.get("final_logit_softcapping", 30.0 if arch == "Gemma2ForCausalLM" else None) or 0.0)
        if gemma else 0.0,
        sliding_window=window, layer_pattern=_period("".join("L" if x else "G" for x in local)),
        tie_embeddings=hf.get("tie_word_embeddings", gemma), **_rope_fields(hf, arch, any(local)))


def _check_architecture(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise ValueError(f"Hugging Face architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}.")
    return arch


def _local_layers(hf: dict, arch: str, L: int) -> list[bool]:
    """Which layers use the sliding window, as Hugging Face decides it for ``arch``."""
    if arch == "LlamaForCausalLM" or (arch in _QWEN and not hf.get("use_sliding_window")):
        return [False] * L  # Llama has no sliding window; Qwen's is off unless use_sliding_window
    if hf.get("sliding_window", 4096 if arch in _GEMMA else None) is None:
        return [False] * L
    types = hf.get("layer_types")
    if types is None:
        if arch == "Gemma2ForCausalLM":
            types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
        elif arch == "Gemma3ForCausalLM":
            p = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(L)]
        else:
            first = hf.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(L)]
    if len(types) != L or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"{arch} layer_types {types} is not {L} entries of sliding_attention/full_attention; "
                         f"score_jax.model supports only those two kinds.")
    return [t == "sliding_attention" for t in types]


def _period(s: str) -> str:
    """The shortest prefix p of s with s == (p * len(s))[:len(s)] (our layer_pattern)."""
    return next(s[:p] for p in range(1, len(s) + 1) if all(s[i] == s[i % p] for i in range(len(s))))


def _without_theta(rope: dict) -> dict:
    return {k: v for k, v in rope.items() if k != "rope_theta"}


def _rope_fields(hf: dict, arch: str, has_local: bool) -> dict:
    """ModelConfig rope_* fields from rope_parameters (flat, or nested by layer type) or the legacy keys."""
    default = 1e6 if arch == "Gemma3ForCausalLM" else 1e4
    params = hf.get("rope_parameters")
    if params and {"full_attention", "sliding_attention"} & set(params):
        full, loc = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        loc = {"rope_theta": 1e4, **loc} if arch == "Gemma3ForCausalLM" else loc
    elif params:
        full = loc = params
    elif arch == "Gemma3ForCausalLM":  # legacy: rope_scaling applies to the global layers only
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", default)}
        loc = {"rope_theta": hf.get("rope_local_base_freq", 1e4)}
    else:
        full = loc = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", default)}
    kinds = []
    for d in (full, loc):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind not in _ROPE_TYPES:
            raise ValueError(f"{arch} with rope_type {kind!r} is not supported; score_jax.model implements "
                             f"{', '.join(_ROPE_TYPES)}.")
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{arch} with partial_rotary_factor={d['partial_rotary_factor']} is not supported "
                             f"(score_jax.model rotates the whole head dim).")
        kinds.append(_ROPE_TYPES[kind])
    theta = float(full.get("rope_theta", default))
    out = dict(rope_theta=theta, rope_scaling=kinds[0], rope_factor=float(full.get("factor", 1.0)))
    if kinds[0] == "llama3":
        out.update(rope_low_freq_factor=float(full["low_freq_factor"]),
                   rope_high_freq_factor=float(full["high_freq_factor"]),
                   rope_original_max_pos=int(full.get("original_max_position_embeddings",
                                                      hf.get("max_position_embeddings", 8192))))
    if has_local:
        # Our sliding layers take rope_local_theta, unscaled under linear, scaled like the global
        # layers under llama3 (score_jax.model.rope_inv_freq); other combinations do not exist there.
        same = _without_theta(loc) == _without_theta(full)
        if not ((kinds[1] == "none" and kinds[0] in ("none", "linear")) or (kinds[0] == "llama3" and same)):
            raise ValueError(f"{arch} with rope {kinds[1]} on sliding layers and {kinds[0]} on global layers is a "
                             f"combination score_jax.model does not implement.")
        local_theta = float(loc.get("rope_theta", default))
        out["rope_local_theta"] = local_theta if local_theta != theta else 0.0
    return out


# ----------------------------------------------------------------------------- tensor names and layouts


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One Hugging Face tensor and where it lives in our params.

    ``view`` splits each HF axis into our dimensions (q_proj [N*H, D] is ((N, H), (D,))); our
    block is ``hf.reshape(flat view).transpose(perm)``, taken at ``layer`` of a stacked param.
    """

    name: str
    path: tuple[str, ...]
    layer: int | None
    view: tuple[tuple[int, ...], ...]
    perm: tuple[int, ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(g) for g in self.view)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """Our block (layer axis removed) -> the HF tensor."""
        return np.ascontiguousarray(ours.transpose(np.argsort(self.perm)).reshape(self.hf_shape))


def _tensors(cfg: model.ModelConfig) -> list[_Tensor]:
    """Every HF tensor of ``cfg``, in the order transformers writes them."""
    D, N, K, H, F, V = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    vec = lambda n: (((n,),), (0,))  # noqa: E731
    per_layer = {
        ("attn_norm", "scale"): ("input_layernorm.weight", *vec(D)),
        ("attn", "q"): ("self_attn.q_proj.weight", ((N, H), (D,)), (2, 0, 1)),
        ("attn", "k"): ("self_attn.k_proj.weight", ((K, H), (D,)), (2, 0, 1)),
        ("attn", "v"): ("self_attn.v_proj.weight", ((K, H), (D,)), (2, 0, 1)),
        ("attn", "o"): ("self_attn.o_proj.weight", ((D,), (N, H)), (1, 2, 0)),
        # Gemma's post_attention_layernorm is the sandwich norm; Llama's is the pre-MLP norm.
        ("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight" if cfg.sandwich_norm
                                else "post_attention_layernorm.weight", *vec(D)),
        ("mlp", "gate"): ("mlp.gate_proj.weight", ((F,), (D,)), (1, 0)),
        ("mlp", "up"): ("mlp.up_proj.weight", ((F,), (D,)), (1, 0)),
        ("mlp", "down"): ("mlp.down_proj.weight", ((D,), (F,)), (1, 0)),
    }
    if cfg.qkv_bias:
        for p, n in (("q", N), ("k", K), ("v", K)):
            per_layer[("attn", f"{p}_bias")] = (f"self_attn.{p}_proj.bias", ((n, H),), (0, 1))
    if cfg.qk_norm:
        for p in ("q", "k"):
            per_layer[("attn", f"{p}_norm", "scale")] = (f"self_attn.{p}_norm.weight", *vec(H))
    if cfg.sandwich_norm:
        per_layer[("post_attn_norm", "scale")] = ("post_attention_layernorm.weight", *vec(D))
        per_layer[("post_mlp_norm", "scale")] = ("post_feedforward_layernorm.weight", *vec(D))
    out = [_Tensor("model.embed_tokens.weight", ("embed",), None, ((V,), (D,)), (0, 1))]
    for layer in range(cfg.num_layers):
        out += [_Tensor(f"model.layers.{layer}.{name}", ("blocks",) + path, layer, view, perm)
                for path, (name, view, perm) in per_layer.items()]
    out.append(_Tensor("model.norm.weight", ("final_norm", "scale"), None, *vec(D)))
    if not cfg.tie_embeddings:
        out.append(_Tensor("lm_head.weight", ("lm_head",), None, ((V,), (D,)), (1, 0)))
    return out


def _read(tensor_slice, t: _Tensor, index: tuple[slice, ...]) -> np.ndarray:
    """Our block ``index`` (slices of our axes, layer axis excluded) of HF tensor ``t``, reading
    only the rows and columns it covers (whole heads, when a head axis is merged in the HF axis)."""
    flat = [d for g in t.view for d in g]
    owner = np.argsort(t.perm)  # view axis j is our axis owner[j]
    bounds = [index[owner[j]].indices(flat[j])[:2] for j in range(len(flat))]
    read, within, shape, j = [], [], [], 0
    for g in t.view:
        (a, b), inner = bounds[j], math.prod(g[1:])
        read.append(slice(a * inner, b * inner))
        within += [slice(None)] + [slice(*bounds[j + i]) for i in range(1, len(g))]
        shape += [b - a, *g[1:]]
        j += len(g)
    return np.asarray(tensor_slice[tuple(read)]).reshape(shape)[tuple(within)].transpose(t.perm)


# ----------------------------------------------------------------------------- safetensors -> params


def is_hf_checkpoint(path: str) -> bool:
    """Whether ``path`` is a directory this module loads: config.json plus model.safetensors or
    a sharded model.safetensors.index.json."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return os.path.isdir(path) and has(_CONFIG) and (has(_SINGLE) or has(_INDEX))


def _weight_files(path: str) -> dict[str, str]:
    """HF tensor name -> the safetensors file (full path) holding it."""
    if os.path.isfile(os.path.join(path, _INDEX)):
        with open(os.path.join(path, _INDEX)) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    if os.path.isfile(os.path.join(path, _SINGLE)):
        with safetensors.safe_open(os.path.join(path, _SINGLE), framework="numpy") as f:
            return {name: os.path.join(path, _SINGLE) for name in f.keys()}
    raise FileNotFoundError(f"{path} has neither {_SINGLE} nor {_INDEX}; point init_from at a Hugging Face "
                            f"checkpoint directory saved with safetensors.")


def load_params(path: str, cfg: model.ModelConfig, mesh=None, dtype=None) -> dict:
    """Our params (structure and shapes of ``model.param_shapes(cfg)``) from the safetensors of
    ``path``, each array created sharded as ``model.param_shardings(cfg, mesh)`` (mesh None: the
    first device) and cast to ``dtype`` (None: ``cfg.param_dtype``).

    Before anything is read: ``cfg`` must compute what the checkpoint's config.json describes
    (dtype, remat and scan fields aside), and every tensor must be present with the shape ``cfg``
    implies, and used; otherwise ValueError naming the field or tensor.
    """
    differ = _differences(cfg, config_from_hf(path))
    if differ:
        raise ValueError(f"This ModelConfig differs from {path}/config.json in {differ}; build it with "
                         f"score_jax.hf.config_from_hf(path) (or fix the preset).")
    mesh = mesh if mesh is not None else _default_mesh()
    dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    tensors = _tensors(cfg)
    files = _weight_files(path)
    missing = [t.name for t in tensors if t.name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if missing[1:] else ""
        raise ValueError(f"{path} lacks tensor {missing[0]!r}{more}; its weights do not match its config.json, "
                         f"re-download or re-export the checkpoint.")
    needed = {t.name for t in tensors} | ({"lm_head.weight"} if cfg.tie_embeddings else set())  # tied: unused copy
    unused = sorted(n for n in files if n not in needed and not _EXPECTED_UNUSED.search(n))
    if unused:
        raise ValueError(f"{path} has tensors no parameter of this config uses: {unused[:5]}"
                         + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
                         + "; the checkpoint has a feature score_jax.model lacks, so loading would drop weights.")
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safetensors.safe_open(f, framework="numpy")) for f in set(files.values())}
        slices = {t.name: handles[files[t.name]].get_slice(t.name) for t in tensors}
        for t in tensors:
            got = tuple(slices[t.name].get_shape())
            if got != t.hf_shape:
                raise ValueError(f"Tensor {t.name!r} in {files[t.name]} has shape {list(got)} but config.json implies "
                                 f"{list(t.hf_shape)}; the config and the weights do not belong together.")
        by_path: dict[tuple, list[_Tensor]] = {}
        for t in tensors:
            by_path.setdefault(t.path, []).append(t)
        shapes = traverse_util.flatten_dict(model.param_shapes(cfg))
        if set(shapes) != set(by_path):
            raise RuntimeError(f"score_jax.hf maps {sorted(set(by_path) ^ set(shapes))} inconsistently with "
                               f"score_jax.model; update _tensors.")
        shardings = traverse_util.flatten_dict(model.param_shardings(cfg, mesh))
        flat = {p: _make_array(slices, by_path[p], shapes[p].shape, shardings[p], dtype) for p in shapes}
    return traverse_util.unflatten_dict(flat)


def _make_array(slices, tensors: list[_Tensor], shape, named_sharding, dtype) -> jax.Array:
    """One param from its HF tensor(s) (one per layer if stacked); each device block read by slice."""
    blocks: dict[tuple, np.ndarray] = {}  # replicated devices ask for the same block: read it once

    def block(index):
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if key not in blocks:
            if tensors[0].layer is None:
                out = _read(slices[tensors[0].name], tensors[0], index)
            else:
                layers = range(*key[0])
                out = np.stack([_read(slices[tensors[i].name], tensors[i], index[1:]) for i in layers])
            blocks[key] = out.astype(dtype)
        return blocks[key]

    return jax.make_array_from_callback(tuple(shape), named_sharding, block)


def _default_mesh():
    return sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])


class Pretrained:
    """A loaded checkpoint: ``cfg``, ``params`` (sharded over ``mesh``) and ``hf_config`` (its config.json).

    ``pretrained(tokens, valid=None)``: tokens [B,T] int ids, right-padded with real ids (any id
    below the vocabulary); valid [B,T] bool marks each row's tokens (default all). Returns
    logits [B,T,V] float32, token t at position t; logits at padding are unspecified.
    ``cfg``, ``params`` and ``mesh`` are what ``score_jax.sampler.Sampler`` takes.
    """

    def __init__(self, cfg: model.ModelConfig, params: dict, mesh, hf_config: dict):
        self.cfg, self.params, self.mesh, self.hf_config = cfg, params, mesh, hf_config

        def logits(params, tokens, valid):  # [B,T] -> [B,T,V]
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
            return model.forward(cfg, params, tokens, positions, valid)[0]

        self._logits = jax.jit(logits)

    def __call__(self, tokens, valid=None) -> jax.Array:
        tokens = np.asarray(tokens)
        valid = np.ones(tokens.shape, bool) if valid is None else np.asarray(valid, bool)
        if tokens.ndim != 2 or valid.shape != tokens.shape:
            raise ValueError(f"tokens {tokens.shape} and valid {valid.shape} must both be [batch, length].")
        if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
            raise ValueError(f"tokens hold ids outside [0, {self.cfg.vocab_size}) (padding included); "
                             f"pad with a real id.")
        put = lambda a: jax.device_put(a, sharding.named(self.mesh, ("batch", None), a.shape))  # noqa: E731
        with jax.set_mesh(self.mesh):
            return self._logits(self.params, put(tokens.astype(np.int32)), put(valid))


def from_pretrained(path: str, mesh=None, dtype=None) -> Pretrained:
    """Loads a Hugging Face checkpoint directory: config, params sharded over ``mesh`` (None:
    the first device), parameters and compute in ``dtype`` (None: float32, which holds a bf16
    checkpoint's values exactly)."""
    cfg = config_from_hf(path)
    dt = jnp.dtype(dtype or "float32").name
    cfg = dataclasses.replace(cfg, param_dtype=dt, dtype=dt)
    mesh = mesh if mesh is not None else _default_mesh()
    with open(os.path.join(path, _CONFIG)) as f:
        hf_config = json.load(f)
    return Pretrained(cfg, load_params(path, cfg, mesh), mesh, hf_config)


# ----------------------------------------------------------------------------- params -> safetensors


def _canonical(cfg: model.ModelConfig) -> dict:
    """The fields that decide the function a ModelConfig computes, with equivalent values unified."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_ARCHITECTURE}
    local = cfg.layer_is_local()
    d["layer_pattern"] = "".join("L" if x else "G" for x in local)
    d["query_scale"] = cfg.query_scale or cfg.head_dim
    if not local.any() or cfg.rope_local_theta == cfg.rope_theta:
        d["rope_local_theta"] = 0.0
    if not local.any():
        d["sliding_window"] = 0
    unused = {"none": _LLAMA3_FIELDS + ("rope_factor",), "linear": _LLAMA3_FIELDS, "llama3": ()}[cfg.rope_scaling]
    return {k: v for k, v in d.items() if k not in unused}


def _differences(a: model.ModelConfig, b: model.ModelConfig) -> list[str]:
    """Fields in which ``a`` and ``b`` compute different functions."""
    ca, cb = _canonical(a), _canonical(b)
    return sorted(k for k in ca if ca[k] != cb.get(k))


def _rope_dict(cfg: model.ModelConfig, local: bool) -> dict:
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta
    if cfg.rope_scaling == "llama3":
        return dict(rope_type="llama3", rope_theta=theta, factor=cfg.rope_factor,
                    low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_pos)
    if cfg.rope_scaling == "linear" and not local:
        return dict(rope_type="linear", rope_theta=theta, factor=cfg.rope_factor)
    return dict(rope_type="default", rope_theta=theta)


def _hf_config(cfg: model.ModelConfig, arch: str, dtype: str, source: dict) -> dict:
    """config.json for ``cfg`` as ``arch``, in transformers-5 keys plus the legacy rope keys that
    older transformers (and the vLLM builds on them) read."""
    local = [bool(x) for x in cfg.layer_is_local()]
    full, loc = _rope_dict(cfg, local=False), _rope_dict(cfg, local=True)
    out = dict(architectures=[arch], model_type=ARCHITECTURES[arch], vocab_size=cfg.vocab_size,
               hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
               hidden_act=_HF_ACTIVATIONS[cfg.activation], rms_norm_eps=cfg.norm_eps,
               tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, attention_dropout=0.0,
               max_position_embeddings=8192, use_cache=True, dtype=dtype, torch_dtype=dtype,
               layer_types=["sliding_attention" if x else "full_attention" for x in local],
               rope_parameters=full, rope_theta=full["rope_theta"],
               rope_scaling=None if full["rope_type"] == "default" else _without_theta(full))
    out.update({k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
                if k in source})
    if arch == "LlamaForCausalLM":
        out.update(mlp_bias=False, pretraining_tp=1)
    elif arch in _QWEN:
        out.update(use_sliding_window=any(local), sliding_window=cfg.sliding_window if any(local) else None,
                   max_window_layers=local.index(True) if any(local) else cfg.num_layers)
    else:
        scalar = cfg.query_scale or cfg.head_dim
        scalar = int(scalar) if scalar == int(scalar) else scalar  # transformers' strict config wants an int
        out.update(hidden_activation=out["hidden_act"], query_pre_attn_scalar=scalar,
                   sliding_window=cfg.sliding_window or None, final_logit_softcapping=cfg.final_softcap or None,
                   attn_logit_softcapping=(cfg.attn_softcap or None) if arch == "Gemma2ForCausalLM" else None)
    if arch == "Gemma3ForCausalLM":
        out.update(rope_parameters={"full_attention": full, "sliding_attention": loc},
                   rope_local_base_freq=loc["rope_theta"])
        period = _period("".join("L" if x else "G" for x in local))
        if period == "L" * (len(period) - 1) + "G":  # what readers without layer_types understand
            out["sliding_window_pattern"] = len(period)
    return out


def _choose_architecture(cfg: model.ModelConfig, architecture, dtype: str, source: dict) -> dict:
    """The config.json of the first architecture (or the given one) whose config reads back as ``cfg``."""
    reasons = []
    for arch in [architecture] if architecture else list(ARCHITECTURES):
        out = _hf_config(cfg, _check_architecture(arch), dtype, source)
        try:
            differ = _differences(cfg, config_from_dict(out))
        except ValueError as e:
            reasons.append(f"{arch}: {e}")
            continue
        if not differ:
            return out
        reasons.append(f"{arch} differs in {differ}")
    raise ValueError("This ModelConfig cannot be written as " + ("; ".join(reasons)) + ".")


def export(path: str, cfg: model.ModelConfig, params: dict, *, architecture: str | None = None,
           dtype=None, source_config: dict | None = None, max_shard_bytes: int = 5 * 10 ** 9) -> None:
    """Writes ``params`` as a Hugging Face checkpoint directory that transformers' ``from_pretrained``
    loads: config.json and model.safetensors, or model-0000i-of-0000n.safetensors files of at most
    ``max_shard_bytes`` (one tensor may exceed it) with model.safetensors.index.json.

    architecture: one of ``ARCHITECTURES`` (None: the one that expresses ``cfg``; ValueError if
    none does). dtype: of the written tensors (None: the params'). source_config: the config.json
    these weights came from, whose token ids and max_position_embeddings are kept (else none and
    8192). Older
    model*.safetensors* files in ``path`` are removed. Every process must call this (each tensor is
    gathered with ``process_allgather``); only process 0 writes. Tokenizer files are not written.
    """
    dt = np.dtype(jnp.dtype(dtype or jax.tree.leaves(params)[0].dtype))
    hf = _choose_architecture(cfg, architecture, dt.name, source_config or {})
    tensors = _tensors(cfg)
    shards, size = [[]], 0
    for t in tensors:
        nbytes = math.prod(t.hf_shape) * dt.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    names = [_SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                 for i in range(len(shards))]
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        for old in os.listdir(path):
            if old.startswith("model") and ".safetensors" in old:
                os.remove(os.path.join(path, old))
    flat = traverse_util.flatten_dict(params)
    for file, shard in zip(names, shards):
        arrays = {}
        for t in shard:
            full = _host(flat[t.path], t.layer)  # a collective: every process takes part
            if writer:
                arrays[t.name] = t.to_hf(full.astype(dt))
        if writer:
            safetensors.numpy.save_file(arrays, os.path.join(path, file), metadata={"format": "pt"})
    if writer:
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(math.prod(t.hf_shape) for t in tensors) * dt.itemsize},
                     "weight_map": {t.name: file for file, shard in zip(names, shards) for t in shard}}
            with open(os.path.join(path, _INDEX), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(path, _CONFIG), "w") as f:
            json.dump(hf, f, indent=2)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("score_jax.hf.export")


def _host(leaf, layer: int | None) -> np.ndarray:
    """One param (or one layer of a stacked one) as a full host array on every process."""
    if isinstance(leaf, jax.Array):
        return np.asarray(multihost_utils.process_allgather(leaf if layer is None else leaf[layer], tiled=True))
    return np.asarray(leaf if layer is None else leaf[layer])
