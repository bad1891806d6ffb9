"""SCoRe Stage I: train attempt 2 to correct while attempt 1 stays near the base model.

    python -m score_jax.main --config=configs/stage1.py:toy --workdir=runs/stage1_toy

Objective: max E[r(y2)] - beta2 KL(pi(.|x1) || ref(.|x1)) - beta1 KL(pi(.|x2) || ref(.|x2)).
The policy and the frozen reference both start from the base model (``rl.reference``, by
default the sft run of the same preset): ``init_from`` is empty, so the policy follows
``--config.rl.reference=DIR``; set ``init_from`` only to start the policy elsewhere.
Argument: PRESET[,TASK] (see configs/rl_common.py).
"""

from configs import rl_common


def get_config(arg: str = "toy"):
    c = rl_common.base("stage1", arg)
    c.rl.schedule = "1"
    # "" = the policy starts as rl.reference (the base model), whatever that is set to. (Not a
    # FieldReference: overriding one side of a FieldReference overrides both.)
    c.init_from = ""
    c.lock()
    return c
