"""What configs/stage1.py, configs/stage2.py and configs/eval.py share: the argument, the
paper's hyperparameters per task family, the TPU defaults of the real presets and the CPU
toy's defaults.

Argument: ``PRESET`` or ``PRESET,TASK`` (e.g. ``toy``, ``gemma2-2b,math``, ``llama3.2-1b,mbpp``).
Real presets start from a Hugging Face checkpoint directory (config.json, *.safetensors, the
tokenizer) at ``checkpoints/<preset>`` (change it with ``--config.rl.reference=DIR
--config.init_from=DIR --config.tokenizer=DIR``); their mesh fills a TPU v5e-8 (or any
slice) with FSDP.
"""

import os

from configs import common, tasks

# Paper, Appendix B, per update of `updates` prompts. Steps: 3000 (MATH) / 1500 (MBPP) over both
# stages; the split between the stages is not given, so each stage gets half (our choice).
PAPER = {
    "math": dict(learning_rate=5e-6, prompts_per_update=512, updates=1500, beta2=0.1),
    "code": dict(learning_rate=1e-5, prompts_per_update=128, updates=750, beta2=0.25),
}
ALPHA, BETA1, TEMPERATURE = 10.0, 0.01, 1.0
# Real presets: one sampler call per PROMPTS_PER_STEP prompts, accumulated to an update. The
# training forward keeps [rows, heads, T, T] attention scores, so this bounds memory: planned
# on a v5e-8 (WORKSPACE.md), llama3.2-1b MATH stage 2 needs 52.7 GiB per chip at 32 prompts,
# 15.0 at 8 (of 15.75 usable: too tight) and 9.6 at 4.
PROMPTS_PER_STEP = 4
CHAT = {"gemma": "gemma", "llama": "llama3.1", "qwen": "chatml"}  # preset prefix -> chat template


def parse(arg: str) -> tuple[str, str]:
    """``PRESET[,TASK]`` -> (preset, task); the toy presets default to the toy task, the rest to math."""
    preset, _, task = arg.partition(",")
    preset = preset or "toy"
    return preset, task or ("toy" if preset in ("toy", "tiny") else "math")


def run_dir(job: str, preset: str) -> str:
    """The default workdir of ``job`` (score_jax.main uses runs/<job>_<preset>)."""
    return os.path.join("runs", f"{job}_{preset}")


def with_task(c, preset: str, task: str):
    """Points data, task and lengths of config ``c`` at ``task`` (configs/tasks.py)."""
    t = tasks.get(task)
    c.data.name, c.data.train_split = t.dataset, t.train_split
    c.data.manual_dir = t.manual_dir
    c.task.reward, c.task.prompt_template, c.task.correction = t.reward, t.prompt_template, t.correction
    if task != "toy":
        # Unknown for this preset: left empty, so that --config.task.chat_template can set it
        # (raising here would refuse the override too); an empty one is refused when typed.
        c.task.chat_template = next((v for k, v in CHAT.items() if preset.startswith(k)), "")
        c.data.too_long = "skip"  # a few MATH problems exceed any fixed prompt budget: counted and skipped
    return t


def base(job: str, arg: str):
    preset, task = parse(arg)
    c = common.base(preset)
    c.job = job
    del c.data.seq_len, c.data.sft_fields  # sft only
    c.rl = common.rl()
    t = with_task(c, preset, task)
    c.rl.alpha, c.rl.beta1, c.rl.sampling.temperature = ALPHA, BETA1, TEMPERATURE
    c.rl.sampling.max_prompt_len, c.rl.sampling.max_new_tokens = t.max_prompt_len, t.max_new_tokens
    if task == "toy":
        c.rl.reference = os.path.join(run_dir("sft", preset), "export")
        # The CPU toy: small batches, a learning rate for a ~1M-parameter model.
        c.batch_size = 16  # prompts per step; rows = batch_size * rl.sampling.samples_per_prompt
        c.total_steps = 100
        c.log_every = 5
        c.optim.learning_rate = 1e-4
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 5
        c.checkpoint.every_steps = 25
        return c
    paper = PAPER["code" if t.reward == "code" else "math"]
    c.rl.reference = c.tokenizer = os.path.join("checkpoints", preset)
    c.rl.beta2 = paper["beta2"]
    c.optim.learning_rate = paper["learning_rate"]
    c.optim.schedule, c.optim.warmup_steps, c.optim.weight_decay = "constant", 10, 0.0
    c.batch_size = PROMPTS_PER_STEP
    c.optim.grad_accum_steps = paper["prompts_per_update"] // PROMPTS_PER_STEP
    c.total_steps = paper["updates"] * c.optim.grad_accum_steps
    c.log_every, c.checkpoint.every_steps = 10, 200
    c.rl.samples_every = 50
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.model.dtype, c.model.remat = "bfloat16", "full"
    c.loss_chunk = 256  # 128k-256k vocabularies: project onto the vocabulary 256 positions at a time
    c.rl.sampling.chunk_len = 128
    return c
