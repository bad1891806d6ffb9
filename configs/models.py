"""Model presets: every field of score_jax.model.ModelConfig, by name.

Real shapes follow the published Hugging Face configs of each model; the parameter counts
they give are pinned in tests/test_model_presets.py.
"""

import ml_collections

_LLAMA = dict(activation="silu", norm_eps=1e-5, tie_embeddings=True)
_QWEN = dict(activation="silu", norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True)
_GEMMA = dict(activation="gelu_tanh", norm_eps=1e-6, norm_plus_one=True, sandwich_norm=True,
              embed_scale=True, tie_embeddings=True, query_scale=256.0)
_GEMMA2 = dict(_GEMMA, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096, layer_pattern="LG",
               vocab_size=256_000, head_dim=256)
_GEMMA3 = dict(_GEMMA, qk_norm=True, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
               layer_pattern="LLLLLG", head_dim=256)
_LLAMA3_ROPE = dict(rope_theta=500_000.0, rope_scaling="llama3", rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_pos=8192)

PRESETS = {
    # Tests: small enough for many compiles per second.
    "tiny": dict(vocab_size=256, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 mlp_dim=128, scan_layers=False),
    # The CPU demo's model (about 0.9M parameters with the toy tokenizer's vocabulary): small
    # enough that the whole demo (pre-training, SFT, Stage I, Stage II, evaluations) fits in
    # 20 minutes on 2 CPU cores, large enough to learn most of the toy arithmetic.
    "toy": dict(vocab_size=256, num_layers=4, d_model=128, num_heads=4, num_kv_heads=4, head_dim=32,
                mlp_dim=384, scan_layers=False),
    # The benchmark shape (score_jax/bench/; issue figures are quoted against this): a Llama-style
    # decoder, SwiGLU MLP, untied embeddings, full multi-head attention (8 KV heads).
    "bench": dict(vocab_size=32_000, num_layers=8, d_model=512, num_heads=8, num_kv_heads=8, head_dim=64,
                  mlp_dim=1408, tie_embeddings=False),
    "llama3.2-1b": dict(_LLAMA, **_LLAMA3_ROPE, rope_factor=32.0, vocab_size=128_256, num_layers=16,
                        d_model=2048, num_heads=32, num_kv_heads=8, head_dim=64, mlp_dim=8192),
    "llama3.2-3b": dict(_LLAMA, **_LLAMA3_ROPE, rope_factor=32.0, vocab_size=128_256, num_layers=28,
                        d_model=3072, num_heads=24, num_kv_heads=8, head_dim=128, mlp_dim=8192),
    "llama3.1-8b": dict(_LLAMA, **_LLAMA3_ROPE, rope_factor=8.0, vocab_size=128_256, num_layers=32,
                        d_model=4096, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14_336,
                        tie_embeddings=False),
    "qwen2.5-1.5b": dict(_QWEN, vocab_size=151_936, num_layers=28, d_model=1536, num_heads=12,
                         num_kv_heads=2, head_dim=128, mlp_dim=8960, tie_embeddings=True),
    "qwen2.5-7b": dict(_QWEN, vocab_size=152_064, num_layers=28, d_model=3584, num_heads=28,
                       num_kv_heads=4, head_dim=128, mlp_dim=18_944, tie_embeddings=False),
    "gemma2-2b": dict(_GEMMA2, num_layers=26, d_model=2304, num_heads=8, num_kv_heads=4, mlp_dim=9216),
    "gemma2-9b": dict(_GEMMA2, num_layers=42, d_model=3584, num_heads=16, num_kv_heads=8, mlp_dim=14_336),
    "gemma3-1b": dict(_GEMMA3, vocab_size=262_144, num_layers=26, d_model=1152, num_heads=4, num_kv_heads=1,
                      mlp_dim=6912, sliding_window=512),
    "gemma3-4b": dict(_GEMMA3, vocab_size=262_208, num_layers=34, d_model=2560, num_heads=8, num_kv_heads=4,
                      mlp_dim=10_240, sliding_window=1024, rope_scaling="linear", rope_factor=8.0),
}

# Fields a preset does not set take these values (the ModelConfig defaults, stated once here
# so that a config file shows every knob and `--config.model.x=...` can override any of them).
DEFAULTS = dict(
    activation="silu", norm_eps=1e-6, norm_plus_one=False, sandwich_norm=False,
    rope_theta=10_000.0, rope_local_theta=0.0, rope_scaling="none", rope_factor=1.0,
    rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_pos=8192,
    qkv_bias=False, qk_norm=False, query_scale=0.0, attn_softcap=0.0, final_softcap=0.0,
    sliding_window=0, layer_pattern="G", tie_embeddings=True, embed_scale=False,
    param_dtype="float32", dtype="float32", remat="none", scan_layers=True,
)


def get(name: str) -> ml_collections.ConfigDict:
    """The preset as a ConfigDict with every ModelConfig field present."""
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    return ml_collections.ConfigDict(dict(DEFAULTS, **PRESETS[name]))
