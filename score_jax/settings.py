"""Typed, frozen views of a job's config. ``main`` builds them from the ConfigDict; nothing
below ``main`` reads a ConfigDict. Defaults live in configs/, not here."""

from __future__ import annotations

import dataclasses

from score_jax import loop, model, optim, sharding


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str
    data_dir: str
    builder_seed: int
    num_train: int
    num_test: int
    train_split: str
    eval_split: str
    seq_len: int
    too_long: str

    def __post_init__(self):
        if self.too_long not in ("error", "skip", "truncate"):
            raise ValueError(f"data.too_long={self.too_long!r}; choose error, skip or truncate.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Fields every training job has (see configs/common.py for their meaning)."""

    job: str
    seed: int
    model_preset: str
    model: model.ModelConfig
    mesh: sharding.MeshConfig
    data: DataConfig
    optim: optim.OptimConfig
    checkpoint: loop.CheckpointConfig
    batch_size: int
    total_steps: int
    log_every: int
    init_from: str
    distributed: bool
    compilation_cache_dir: str
    loss_chunk: int
