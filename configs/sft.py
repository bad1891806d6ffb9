"""Supervised fine-tuning: next-token loss on response tokens only.

    python -m score_jax.main --config=configs/sft.py:toy --workdir=runs/sft_toy
"""

from configs import common


def get_config(preset: str = "toy"):
    c = common.base(preset)
    c.job = "sft"
    c.total_steps = 600
    c.batch_size = 32
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.lock()
    return c
