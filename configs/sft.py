"""Supervised fine-tuning: next-token loss on response tokens only.

    python -m score_jax.main --config=configs/sft.py:toy --workdir=runs/sft_toy

The argument is a model preset from configs/models.py (default `toy`: the CPU demo's base
model on the toy arithmetic task).
"""

from configs import common


def get_config(preset: str = "toy"):
    c = common.base(preset)
    c.job = "sft"
    c.total_steps = 300
    c.batch_size = 32
    c.data.seq_len = 64  # toy_arithmetic 2.0.0: the longest single-turn example is 62 tokens
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 30
    c.checkpoint.every_steps = 100
    c.lock()
    return c
