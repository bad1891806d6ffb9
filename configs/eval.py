"""Self-correction evaluation of an export: Acc@t1, Acc@t2, Delta, i->c, c->i with 95% CIs.

    python -m score_jax.main --config=configs/eval.py:toy --config.eval.params=runs/stage2_toy/export

Argument: PRESET[,TASK] as in configs/stage1.py. ``eval.params`` defaults to the stage2 run of
the preset. Greedy by default; ``--config.eval.sampling.temperature=1.0 --config.eval.sampling.samples_per_prompt=4``
samples; ``--config.eval.num_attempts=10`` evaluates repeated correction;
``--config.eval.scaling_samples=32`` adds the inference-scaling study.
"""

import os

from configs import common, rl_common

_TRAINING_ONLY = ("optim", "checkpoint", "batch_size", "total_steps", "log_every", "loss_chunk", "init_from")


def get_config(arg: str = "toy"):
    preset, task = rl_common.parse(arg)
    c = common.base(preset)
    for key in _TRAINING_ONLY:
        del c[key]
    c.job = "eval"
    t = rl_common.with_task(c, preset, task)
    del c.data.seq_len, c.data.sft_fields, c.data.train_split  # training only; eval.split is the split
    c.eval = common.evaluation()
    c.eval.params = os.path.join(rl_common.run_dir("stage2", preset), "export")
    c.eval.split = t.eval_split
    c.eval.sampling.max_prompt_len, c.eval.sampling.max_new_tokens = t.max_prompt_len, t.max_new_tokens
    if task != "toy":
        c.eval.batch_size, c.eval.sampling.chunk_len = 32, 128
        c.tokenizer = os.path.join("checkpoints", preset)
        c.mesh.data, c.mesh.fsdp = 1, -1
        c.model.dtype = "bfloat16"
    c.lock()
    return c
