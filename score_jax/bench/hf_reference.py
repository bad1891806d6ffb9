"""The comparison side of the benchmarks: Hugging Face transformers' Llama in PyTorch on CPU.

Same shape as our model (`shape_of` a ModelConfig), float32, randomly initialised, all CPU
threads. torch and transformers are benchmark-only dependencies, imported inside the
functions so that importing this module costs nothing and needs neither.
"""
import os
import time

# LlamaConfig is Llama-style throughout; a shape that differs elsewhere is not comparable.
_SUPPORTED = dict(activation="silu")

# The ModelConfig fields (configs/models.py names) that `build_model` reads.
SHAPE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                "tie_embeddings", "activation", "norm_eps", "rope_theta")


def shape_of(cfg) -> dict:
    """The shape dict of a score_jax.model.ModelConfig: its `SHAPE_FIELDS`."""
    return {k: getattr(cfg, k) for k in SHAPE_FIELDS}


def build_model(shape: dict, max_positions: int, seed: int = 0):
    """A randomly initialised float32 `LlamaForCausalLM` with `shape`, SDPA attention.

    `shape` uses configs/models.py names (vocab_size, num_layers, d_model, num_heads,
    num_kv_heads, head_dim, mlp_dim, tie_embeddings, norm_eps, rope_theta; activation, if
    present, must be "silu"). Sets torch's thread count to os.cpu_count().
    """
    import torch
    import transformers

    for key, value in _SUPPORTED.items():
        if shape.get(key, value) != value:
            raise ValueError(f"hf_reference builds a Llama ({key}={value!r}); the shape has "
                             f"{key}={shape[key]!r}.")
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["d_model"],
        intermediate_size=shape["mlp_dim"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"],
        tie_word_embeddings=shape.get("tie_embeddings", False),
        rms_norm_eps=shape.get("norm_eps", 1e-6),
        rope_parameters={"rope_type": "default", "rope_theta": shape.get("rope_theta", 1e4)},
        max_position_embeddings=max_positions,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    model = transformers.LlamaForCausalLM._from_config(
        config, attn_implementation="sdpa", dtype=torch.float32)
    return model


def _random_tokens(vocab_size: int, batch: int, length: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def hf_train_tokens_per_s(shape: dict, batch: int, seq_len: int, steps: int,
                          warmup: int = 1) -> float:
    """Training throughput in tokens/s: batch * seq_len * steps / time of `steps` full steps.

    A step is forward with labels (next-token loss), backward, `torch.optim.AdamW` step and
    zero_grad, on a fresh random batch; `warmup` untimed steps go first.
    """
    import torch

    model = build_model(shape, max_positions=seq_len)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [_random_tokens(shape["vocab_size"], batch, seq_len, seed=i)
               for i in range(warmup + steps)]

    def train_step(tokens):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # waits for the step to finish

    return batch * seq_len * steps / _timed(train_step, batches, warmup)


def hf_generate_tokens_per_s(shape: dict, batch: int, prompt_len: int, new_tokens: int,
                             repeats: int, warmup: int = 1) -> float:
    """Greedy generation throughput in generated tokens/s: batch * new_tokens * repeats / time.

    Each call is `model.generate` with a KV cache on a random prompt batch (no padding),
    producing exactly `new_tokens` per row: min_new_tokens = max_new_tokens and no EOS token,
    so nothing stops early. `warmup` untimed calls go first.
    """
    import torch

    model = build_model(shape, max_positions=prompt_len + new_tokens)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prompts = [_random_tokens(shape["vocab_size"], batch, prompt_len, seed=i)
               for i in range(warmup + repeats)]

    def generate(input_ids):
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, use_cache=True)
        if out.shape != (batch, prompt_len + new_tokens):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected "
                               f"{(batch, prompt_len + new_tokens)}.")

    return batch * new_tokens * repeats / _timed(generate, prompts, warmup)


def _timed(fn, inputs: list, warmup: int) -> float:
    """Seconds of ``fn`` over ``inputs[warmup:]``, after untimed calls on ``inputs[:warmup]``
    (``fn`` must wait for its own result, as torch's .item() and generate do)."""
    for x in inputs[:warmup]:
        fn(x)
    start = time.perf_counter()
    for x in inputs[warmup:]:
        fn(x)
    return time.perf_counter() - start
