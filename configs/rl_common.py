"""What configs/stage1.py and configs/stage2.py share: the argument, the paper's
hyperparameters per task family, and the CPU toy's defaults.

Argument: ``PRESET`` or ``PRESET,TASK`` (e.g. ``toy``, ``gemma2-2b,math``, ``llama3.2-1b,mbpp``).
"""

import os

from configs import common

# Paper, Appendix B. Steps: 3000 (MATH) / 1500 (MBPP) over both stages; the split between the
# stages is not given, so each stage gets half (our choice).
PAPER = {
    "math": dict(learning_rate=5e-6, batch_size=512, total_steps=1500, beta2=0.1),
    "code": dict(learning_rate=1e-5, batch_size=128, total_steps=750, beta2=0.25),
}
ALPHA, BETA1, TEMPERATURE = 10.0, 0.01, 1.0


def parse(arg: str) -> tuple[str, str]:
    """``PRESET[,TASK]`` -> (preset, task); the toy preset defaults to the toy task, the rest to math."""
    preset, _, task = arg.partition(",")
    preset = preset or "toy"
    return preset, task or ("toy" if preset in ("toy", "tiny") else "math")


def run_dir(job: str, preset: str) -> str:
    """The default workdir of ``job`` (score_jax.main uses runs/<job>_<preset>)."""
    return os.path.join("runs", f"{job}_{preset}")


def base(job: str, arg: str):
    preset, task = parse(arg)
    if task != "toy":
        raise ValueError(f"Task {task!r} is not wired into the RL configs yet; use the toy task.")
    c = common.base(preset)
    c.job = job
    c.rl = common.rl()
    c.rl.reference = os.path.join(run_dir("sft", preset), "export")
    # The CPU toy: small batches, a learning rate for a ~3M-parameter model.
    c.batch_size = 16  # prompts per step; rows = batch_size * rl.samples_per_prompt
    c.total_steps = 100
    c.log_every = 5
    c.optim.learning_rate = 2e-5
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 5
    c.checkpoint.every_steps = 25
    c.rl.alpha, c.rl.beta1, c.rl.temperature = ALPHA, BETA1, TEMPERATURE
    c.rl.max_prompt_len = 24  # toy prompts are at most 17 tokens
    c.rl.max_new_tokens = 80  # toy solutions are at most 70 tokens
    return c
