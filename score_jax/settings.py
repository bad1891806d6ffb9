"""Typed, frozen views of a job's config. ``main`` builds them from the ConfigDict; nothing
below ``main`` reads a ConfigDict. Defaults live in configs/, not here."""

from __future__ import annotations

import dataclasses

from score_jax import loop, model, optim, sharding


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str
    data_dir: str
    manual_dir: str
    builder_seed: int
    num_train: int
    num_test: int
    train_split: str
    eval_split: str
    seq_len: int
    too_long: str
    sft_fields: str  # comma-separated record fields, one per attempt (sft job)

    def __post_init__(self):
        if not self.attempt_fields():
            raise ValueError("data.sft_fields is empty; name the record field(s) to learn, e.g. 'response'.")
        if self.too_long not in ("error", "skip", "truncate"):
            raise ValueError(f"data.too_long={self.too_long!r}; choose error, skip or truncate.")

    def attempt_fields(self) -> tuple[str, ...]:
        return _csv(self.sft_fields)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    reward: str
    chat_template: str
    prompt_template: str
    correction: str


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fields every training job has (see configs/common.py for their meaning)."""

    job: str
    seed: int
    model_preset: str
    model: model.ModelConfig
    mesh: sharding.MeshConfig
    data: DataConfig
    task: TaskConfig
    optim: optim.OptimConfig
    checkpoint: loop.CheckpointConfig
    batch_size: int
    total_steps: int
    log_every: int
    init_from: str
    tokenizer: str
    distributed: bool
    compilation_cache_dir: str
    loss_chunk: int


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """SCoRe Stage I / II settings (see configs/common.py for each field's meaning)."""

    schedule: str
    schedule_block_steps: int
    alpha: float
    shaping: str
    beta1: float
    beta2: float
    baseline: str
    samples_per_prompt: int
    kl_estimator: str
    kl_in_reward: bool
    normalize: str
    temperature: float
    top_k: int
    top_p: float
    max_prompt_len: int
    max_new_tokens: int
    chunk_len: int
    reference: str
    keep_best: bool
    samples_every: int
    samples_per_write: int

    def __post_init__(self):
        from score_jax import losses  # the allowed values live beside the code that uses them
        if not self.schedule or set(self.schedule) - {"1", "2"}:
            raise ValueError(f"rl.schedule={self.schedule!r} must be a non-empty string of 1s and 2s "
                             "(e.g. '1', '2' or '12').")
        if len(self.schedule) > 1 and self.schedule_block_steps < 1:
            raise ValueError(f"rl.schedule={self.schedule!r} interleaves stages, so "
                             "rl.schedule_block_steps must be >= 1.")
        for name, allowed in (("shaping", losses.SHAPINGS), ("baseline", losses.BASELINES),
                              ("kl_estimator", tuple(losses.KL_ESTIMATORS)),
                              ("normalize", tuple(losses.REDUCTIONS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"rl.{name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}.")
        if self.baseline == "loo" and self.samples_per_prompt < 2:
            raise ValueError("rl.baseline='loo' needs rl.samples_per_prompt >= 2; raise it or use "
                             "baseline 'mean' or 'none'.")
        for name in ("samples_per_prompt", "max_prompt_len", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}.")
        if not self.reference:
            raise ValueError("rl.reference is empty; point it at the base model's export "
                             "(e.g. runs/sft_toy/export) or a Hugging Face directory.")

    def stage_at(self, step: int) -> int:
        """The objective (1 or 2) of the step that follows ``step`` finished steps."""
        if len(self.schedule) == 1:
            return int(self.schedule)
        return int(self.schedule[(step // self.schedule_block_steps) % len(self.schedule)])


@dataclasses.dataclass(frozen=True)
class RLTrainConfig(TrainConfig):
    """A Stage I / Stage II job: the shared training fields plus the task and the RL settings.
    ``batch_size`` counts prompts per step (each sampled ``rl.samples_per_prompt`` times)."""

    rl: RLConfig


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The eval job's settings (see configs/eval.py)."""

    params: str
    split: str
    num_problems: int
    num_attempts: int
    temperature: float
    top_k: int
    top_p: float
    samples_per_problem: int
    batch_size: int
    max_prompt_len: int
    max_new_tokens: int
    chunk_len: int
    scaling_samples: int
    scaling_temperature: float

    def __post_init__(self):
        if self.num_attempts < 1 or self.samples_per_problem < 1 or self.batch_size < 1:
            raise ValueError("eval.num_attempts, eval.samples_per_problem and eval.batch_size must be >= 1.")
        if self.scaling_samples and (self.scaling_samples < 2 or self.scaling_samples % 2):
            raise ValueError(f"eval.scaling_samples={self.scaling_samples} must be 0 (off) or an even "
                             "number >= 2 (the paper uses 32).")


@dataclasses.dataclass(frozen=True)
class EvalJobConfig:
    job: str
    seed: int
    model_preset: str
    model: model.ModelConfig
    mesh: sharding.MeshConfig
    data: DataConfig
    task: TaskConfig
    tokenizer: str
    distributed: bool
    compilation_cache_dir: str
    eval: EvalConfig


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo pipeline runs (see configs/demo.py)."""

    rows: str  # comma-separated methods of score_jax.demo.METHODS, in table order
    seeds: int
    self_refine_correction: str
    star_rounds: int
    star_prompts: int
    star_samples: int
    baseline_sft_steps: int
    results_md: str  # "" or a path: also write the table as Markdown there
    sampled_temperature: float
    sampled_samples: int  # a second, sampled evaluation of every row (0 = none)
    shared_base: bool  # every seed starts from seed 0's base model (the paper has one base model)
    only_seed: int  # -1: every seed, then the table; i >= 0: only seed i's runs (parallel processes)

    def methods(self) -> tuple[str, ...]:
        return _csv(self.rows)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo job: every sub-job's full config (sharing model, mesh, data and task)."""

    job: str
    seed: int
    model_preset: str
    distributed: bool
    compilation_cache_dir: str
    pretrain: TrainConfig
    sft: TrainConfig
    stage1: RLTrainConfig
    stage2: RLTrainConfig
    eval: EvalJobConfig
    demo: DemoSettings
