"""SCoRe Stage II: reward both attempts, with shaping that pays for fixing and charges for breaking.

    python -m score_jax.main --config=configs/stage2.py:toy --workdir=runs/stage2_toy

Objective: max E[r1_hat + r2_hat] - beta1 (KL(turn 1) + KL(turn 2)),
r1_hat = r(y1), r2_hat = r(y2) + alpha (r(y2) - r(y1)). The policy starts from the Stage I
export (``init_from``, by default the stage1 run of the same preset); the reference stays the
base model. ``--config.rl.schedule=12 --config.rl.schedule_block_steps=N`` interleaves Stage I
and Stage II in blocks of N steps. Argument: PRESET[,TASK] (see configs/rl_common.py).
"""

import os

from configs import rl_common


def get_config(arg: str = "toy"):
    c = rl_common.base("stage2", arg)
    c.rl.schedule = "2"
    preset, _ = rl_common.parse(arg)
    c.init_from = os.path.join(rl_common.run_dir("stage1", preset), "export")
    c.lock()
    return c
