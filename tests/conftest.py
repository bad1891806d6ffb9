"""Test setup: 8 fake CPU devices, set before anything imports jax.

The suite is dominated by XLA compile time on tiny models, so tests compile with XLA's
backend optimisations off (4-7x faster compiles here; results agree to float rounding).
Subprocess runs in the tests inherit these flags through the environment.
"""
import os

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + FAST_COMPILE_FLAGS
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The toy sentencepiece tokenizer (digits one per token), trained on a small toy corpus
    (a module's own ``tok`` fixture takes precedence)."""
    from score_jax import chat, tokenizer
    from score_jax.data import toy
    exs = toy.examples(seed=3, train_size=100, test_size=10)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tokenizer.train_sentencepiece(toy.tokenizer_corpus(exs["train"]), path, vocab_size=256,
                                  user_symbols=chat.TOY.special_pieces, required_chars=toy.PRINTABLE_ASCII)
    return tokenizer.load(path)
