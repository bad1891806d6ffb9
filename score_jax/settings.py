"""Typed, frozen views of a job's config. ``main`` builds them from the ConfigDict; nothing
below ``main`` reads a ConfigDict. Defaults live in configs/, not here."""

from __future__ import annotations

import dataclasses

from score_jax import checkpoints, model, optim, ranges, sharding


# score_jax.data.BUILDERS' names (kept here so that checking a config does not import TFDS;
# tests/test_config_ranges.py keeps the two equal).
DATASETS = ("gsm8k", "humaneval", "math", "mbpp", "toy_arithmetic")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The dataset (its identity and where it lives); what every job reads."""

    name: str
    data_dir: str
    manual_dir: str
    builder_seed: int
    num_train: int
    num_test: int
    too_long: str

    def __post_init__(self):
        ranges.check("data", self, num_train="[0, inf)", num_test="[0, inf)")
        if self.name not in DATASETS:
            raise ValueError(f"data.name={self.name!r}; choose one of {', '.join(DATASETS)}.")
        if self.too_long not in ("error", "skip", "truncate"):
            raise ValueError(f"data.too_long={self.too_long!r}; choose error, skip or truncate.")


@dataclasses.dataclass(frozen=True)
class TrainDataConfig(DataConfig):
    """A training job's data: the dataset and the split it trains on."""

    train_split: str


@dataclasses.dataclass(frozen=True)
class SFTDataConfig(TrainDataConfig):
    """The sft job's data: also the example length and the record fields it learns."""

    seq_len: int
    sft_fields: str  # comma-separated record fields, one per attempt

    def __post_init__(self):
        super().__post_init__()
        ranges.check("data", self, seq_len="[2, inf)")
        if not self.attempt_fields():
            raise ValueError("data.sft_fields is empty; name the record field(s) to learn, e.g. 'response'.")

    def attempt_fields(self) -> tuple[str, ...]:
        return _csv(self.sft_fields)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    reward: str
    chat_template: str
    prompt_template: str
    correction: str

    def __post_init__(self):
        from score_jax import chat  # the templates live beside their code
        if self.chat_template not in chat.TEMPLATES:
            what = " is empty (no template is known for this model preset)" if not self.chat_template else \
                f"={self.chat_template!r} is unknown"
            raise ValueError(f"task.chat_template{what}; set --config.task.chat_template to one of "
                             f"{', '.join(sorted(chat.TEMPLATES))}.")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How episodes are sampled, for RL rollouts and evaluation alike (see configs/common.py)."""

    max_prompt_len: int  # tokens of x1 (template included); longer prompts: data.too_long
    max_new_tokens: int  # per attempt
    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    top_p: float  # 1 = off
    samples_per_prompt: int  # k episodes per prompt (RL: the leave-one-out group)
    chunk_len: int  # sampler KV-cache chunk (score_jax/sampler.py)

    def __post_init__(self):
        ranges.check("sampling", self, max_prompt_len="[1, inf)", max_new_tokens="[1, inf)",
                     temperature="[0, inf)", top_k="[0, inf)", top_p="(0, 1]", samples_per_prompt="[1, inf)",
                     chunk_len="[0, inf)")  # 0 = one chunk per turn


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fields every training job has (see configs/common.py for their meaning)."""

    job: str
    seed: int
    run: int  # index of this run among runs sharing a seed (jobs/keys.py)
    model_preset: str
    model: model.ModelConfig
    mesh: sharding.MeshConfig
    data: TrainDataConfig
    task: TaskConfig
    optim: optim.OptimConfig
    checkpoint: checkpoints.CheckpointConfig
    batch_size: int
    total_steps: int
    log_every: int
    init_from: str
    tokenizer: str
    distributed: bool
    cpu_devices: int
    compilation_cache_dir: str
    loss_chunk: int

    def __post_init__(self):
        # total_steps=0 would export the untrained params as if trained; log_every=0 divides by 0.
        ranges.check("", self, batch_size="[1, inf)", total_steps="[1, inf)", log_every="[1, inf)",
                     loss_chunk="[0, inf)", cpu_devices="[0, inf)")


@dataclasses.dataclass(frozen=True)
class SFTTrainConfig(TrainConfig):
    """The sft job: the shared training fields, with the SFT data fields."""

    data: SFTDataConfig


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
    kl_estimator: str
    kl_in_reward: bool
    normalize: str
    sampling: SamplingConfig
    reference: str
    keep_best: bool
    samples_every: int
    samples_per_write: int

    def __post_init__(self):
        ranges.check("rl", self, alpha="[0, inf)", beta1="[0, inf)", beta2="[0, inf)",
                     schedule_block_steps="[0, inf)", samples_every="[0, inf)", samples_per_write="[0, inf)")
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
        if self.baseline == "loo" and self.sampling.samples_per_prompt < 2:
            raise ValueError("rl.baseline='loo' needs rl.sampling.samples_per_prompt >= 2; raise it or use "
                             "baseline 'mean' or 'none'.")
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
    ``batch_size`` counts prompts per step (each sampled ``rl.sampling.samples_per_prompt`` times)."""

    rl: RLConfig


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The eval job's settings (see configs/eval.py)."""

    params: str
    split: str
    num_problems: int
    num_attempts: int
    batch_size: int  # problems per sampler call
    sampling: SamplingConfig  # samples_per_prompt = episodes per problem
    scaling_samples: int
    scaling_temperature: float

    def __post_init__(self):
        ranges.check("eval", self, num_problems="[0, inf)", num_attempts="[1, inf)", batch_size="[1, inf)",
                     scaling_samples="[0, inf)", scaling_temperature="[0, inf)")
        if self.scaling_samples and (self.scaling_samples < 2 or self.scaling_samples % 2):
            raise ValueError(f"eval.scaling_samples={self.scaling_samples} must be 0 (off) or an even "
                             "number >= 2 (the paper uses 32).")


@dataclasses.dataclass(frozen=True)
class EvalJobConfig:
    job: str
    seed: int
    run: int
    model_preset: str
    model: model.ModelConfig
    mesh: sharding.MeshConfig
    data: DataConfig
    task: TaskConfig
    tokenizer: str
    distributed: bool
    cpu_devices: int
    compilation_cache_dir: str
    eval: EvalConfig

    def __post_init__(self):
        ranges.check("", self, cpu_devices="[0, inf)")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo pipeline runs (see configs/demo.py)."""

    rows: str  # "all" or comma-separated methods of score_jax/jobs/demo.py METHODS, in table order
    seeds: int
    self_refine_correction: str
    star_rounds: int
    star_prompts: int
    star_samples: int
    baseline_sft_steps: int
    baseline_learning_rate: float  # STaR / Pair-SFT fine-tuning peak rate; 0 = the base SFT's
    baseline_seq_len: int  # tokens per STaR / Pair-SFT record (a whole sampled episode)
    results_md: str  # "" or a path: also write the table as Markdown there
    sampled_temperature: float
    sampled_samples: int  # a second, sampled evaluation of every row (0 = none)
    shared_base: bool  # every seed starts from seed 0's base model (the paper has one base model)
    only_seed: int  # -1: every seed, then the table; i >= 0: only seed i's runs (parallel processes)

    def __post_init__(self):
        ranges.check("demo", self, seeds="[1, inf)", star_rounds="[0, inf)", star_prompts="[1, inf)",
                     star_samples="[1, inf)", baseline_sft_steps="[1, inf)", baseline_learning_rate="[0, inf)",
                     baseline_seq_len="[2, inf)", sampled_temperature="[0, inf)", sampled_samples="[0, inf)",
                     only_seed="[-1, inf)")

    def methods(self) -> tuple[str, ...]:
        return _csv(self.rows)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo job: every sub-job's full config (sharing model, mesh, data and task)."""

    job: str
    seed: int
    model_preset: str
    distributed: bool
    cpu_devices: int
    compilation_cache_dir: str
    pretrain: SFTTrainConfig
    sft: SFTTrainConfig
    stage1: RLTrainConfig
    stage2: RLTrainConfig
    eval: EvalJobConfig
    demo: DemoSettings

    def __post_init__(self):
        ranges.check("", self, cpu_devices="[0, inf)")
