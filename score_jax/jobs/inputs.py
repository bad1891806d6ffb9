"""What every job reads before it trains or evaluates: the dataset (built if missing), the
tokenizer, the turn-1 prompts of a split, params, and the sampler program of a task."""

from __future__ import annotations

import logging
import os

import numpy as np

from score_jax import chat, data, model
from score_jax import sampler as sampler_lib
from score_jax import settings
from score_jax import tokenizer as tokenizer_lib
from score_jax.data import prompt_set

log = logging.getLogger(__name__)


def dataset(cfg: settings.DataConfig):
    """The TFDS builder of ``cfg.name``, prepared under ``cfg.data_dir`` (built the first time)."""
    kwargs = {}
    if cfg.name == "toy_arithmetic":
        kwargs = dict(seed=cfg.builder_seed, train_size=cfg.num_train, test_size=cfg.num_test)
    elif data.needs_manual_dir(cfg.name):
        kwargs = dict(manual_dir=cfg.manual_dir or None)
    return data.prepare(cfg.name, cfg.data_dir, **kwargs)


def reward(name: str):
    """The task's reward (score_jax/rewards REWARDS entry) named by ``task.reward``."""
    from score_jax import rewards
    if name not in rewards.REWARDS:
        raise ValueError(f"task.reward={name!r}; choose one of {sorted(rewards.REWARDS)}.")
    return rewards.REWARDS[name]


def split_names(split: str) -> list[str]:
    """The split names in a TFDS split string: "train+test[:10%]" -> ["train", "test"]."""
    return [part.split("[")[0].strip() for part in split.split("+")]


def tokenizer(path: str, builder, model_cfg: model.ModelConfig) -> tokenizer_lib.Tokenizer:
    """The tokenizer at ``path`` (a file, or a checkpoint directory holding tokenizer.model or
    tokenizer.json), or ("") the one the dataset ships (the toy task's), checked against the
    model's vocabulary."""
    if not path:
        path = getattr(builder, "tokenizer_path", "")
        if not path:
            raise ValueError(f"Dataset {builder.name!r} ships no tokenizer; set config.tokenizer to the "
                             "model's tokenizer file or checkpoint directory.")
    if not os.path.exists(path):
        raise ValueError(f"No tokenizer at {path}; set config.tokenizer to the model's checkpoint directory "
                         "(with tokenizer.json or tokenizer.model).")
    tok = tokenizer_lib.load(path)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"The tokenizer has {tok.vocab_size} pieces but model.vocab_size is "
                         f"{model_cfg.vocab_size}; raise model.vocab_size or use the model's own tokenizer.")
    return tok


def prompts(builder, split: str, tok: tokenizer_lib.Tokenizer, task: settings.TaskConfig, *,
            max_prompt_len: int, too_long: str, limit: int = 0) -> prompt_set.PromptSet:
    """The turn-1 prompts of ``split`` (the first ``limit`` records if > 0)."""
    if not split or any(name not in builder.info.splits for name in split_names(split)):
        raise ValueError(f"Dataset {builder.name!r} has no split {split!r}; it has "
                         f"{sorted(builder.info.splits)}.")
    ps = prompt_set.build(builder.as_data_source(split=split), tok, chat.get(task.chat_template),
                          task.prompt_template, max_prompt_len=max_prompt_len, too_long=too_long, limit=limit)
    log.info("%d prompts from %s[%s] (%d over max_prompt_len=%d, %s).", len(ps), builder.name, split,
             ps.too_long, max_prompt_len, too_long)
    return ps


def params(path: str, cfg: model.ModelConfig, mesh, how_to_create: str = "") -> dict:
    """Params from ``path`` onto ``mesh``: a params export of ours (Orbax, any run's export/ or
    best/) or a Hugging Face checkpoint directory (config.json + safetensors; its config must
    describe ``cfg``'s architecture)."""
    from score_jax import checkpoints, hf, learner
    if hf.is_hf_checkpoint(path):
        return hf.load_params(path, cfg, mesh, dtype=cfg.param_dtype)
    return checkpoints.load_params(path, learner.abstract_params(cfg, mesh), how_to_create)


def require_params(path: str, what: str, how_to_create: str) -> None:
    """Raises checkpoints.MissingExportError, before any work, if ``path`` holds no params."""
    from score_jax import checkpoints, hf
    if not (checkpoints.has_export(path) or hf.is_hf_checkpoint(path)):
        raise checkpoints.MissingExportError(
            f"No {what} export (or Hugging Face checkpoint) found at {path}; create it with: {how_to_create}")


def sampler_config(tok: tokenizer_lib.Tokenizer, task: settings.TaskConfig, sampling: settings.SamplingConfig,
                   num_turns: int) -> tuple[sampler_lib.SamplerConfig, np.ndarray]:
    """The sampler program of ``sampling`` for ``num_turns`` attempts of ``task``, and the token
    ids of its correction instruction (the same for RL rollouts and evaluation)."""
    template = chat.get(task.chat_template)
    instruction = np.asarray(chat.instruction_ids(tok, template, task.correction), np.int32)
    stop_ids = tuple(dict.fromkeys(chat.stop_ids(tok, template) + (tok.eos_id,)))
    return sampler_program(sampling, num_turns, len(instruction), stop_ids, tok.pad_id), instruction


def sampler_program(s: settings.SamplingConfig, num_turns: int, instruction_len: int, stop_ids: tuple[int, ...],
                    pad_id: int) -> sampler_lib.SamplerConfig:
    """The SamplerConfig of ``sampling`` once the tokenizer's part (instruction length, stop and
    pad ids) is known; ``score_jax.plan`` supplies that part without a tokenizer."""
    return sampler_lib.SamplerConfig(
        max_prompt_len=s.max_prompt_len, max_new_tokens=s.max_new_tokens, instruction_len=instruction_len,
        num_turns=num_turns, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        samples_per_prompt=s.samples_per_prompt, stop_token_ids=stop_ids, pad_id=pad_id, chunk_len=s.chunk_len)
