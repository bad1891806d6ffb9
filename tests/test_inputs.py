"""score_jax.jobs.inputs: the reward registry lookup and its error, split-name parsing, and the
sampler program built from the real toy chat template and a sentencepiece tokenizer trained
here (instruction ids, stop ids without duplicates, every SamplingConfig field carried over)."""

import dataclasses
import re

import numpy as np
import pytest

from score_jax import chat, rewards, sampler, settings
from score_jax.jobs import inputs



CORRECTION = "Check it and answer again."
TASK = settings.TaskConfig(reward="toy", chat_template="toy", prompt_template="{prompt}", correction=CORRECTION)
# Every field differs from SamplerConfig's defaults, so equality below means "carried over".
SAMPLING = settings.SamplingConfig(max_prompt_len=11, max_new_tokens=6, temperature=0.7, top_k=5, top_p=0.9,
                                   samples_per_prompt=3, chunk_len=4)


@pytest.mark.parametrize("name", sorted(rewards.REWARDS))
def test_reward_returns_the_registry_entry(name):
    assert inputs.reward(name) is rewards.REWARDS[name]


def test_unknown_reward_lists_the_choices():
    with pytest.raises(ValueError, match=re.escape("task.reward='nope'; choose one of ['code', 'math', 'toy'].")):
        inputs.reward("nope")


@pytest.mark.parametrize("split, names", [
    ("train", ["train"]),
    ("train+test[:10%]", ["train", "test"]),
    ("train[10:20] + validation", ["train", "validation"]),
    ("test[:5]", ["test"]),
])
def test_split_names(split, names):
    assert inputs.split_names(split) == names


def test_sampler_config_from_the_toy_template(tok):
    cfg, instruction = inputs.sampler_config(tok, TASK, SAMPLING, num_turns=3)
    # The toy template by hand: after <eot>, "<user>{correction}<eot><model>".
    want = [tok.token_id("<user>"), *tok.encode(CORRECTION), tok.token_id("<eot>"), tok.token_id("<model>")]
    assert instruction.dtype == np.int32
    np.testing.assert_array_equal(instruction, want)
    np.testing.assert_array_equal(instruction, chat.instruction_ids(tok, chat.TOY, CORRECTION))
    assert cfg.stop_token_ids == (tok.token_id("<eot>"), tok.eos_id)
    assert tok.token_id("<eot>") != tok.eos_id
    assert cfg == sampler.SamplerConfig(
        max_prompt_len=11, max_new_tokens=6, temperature=0.7, chunk_len=4, instruction_len=len(want), num_turns=3,
        top_k=5, top_p=0.9, samples_per_prompt=3, stop_token_ids=(tok.token_id("<eot>"), tok.eos_id),
        pad_id=tok.pad_id, cache_dtype="")
    for f in dataclasses.fields(settings.SamplingConfig):
        assert getattr(cfg, f.name) == getattr(SAMPLING, f.name), f.name


def test_a_stop_piece_that_is_eos_appears_once(tok, monkeypatch):
    # A template that already ends turns with the tokenizer's eos piece ("</s>" in sentencepiece).
    eos_template = dataclasses.replace(chat.TOY, name="toy_eos", stop_pieces=("<eot>", "</s>"))
    monkeypatch.setitem(chat.TEMPLATES, "toy_eos", eos_template)
    cfg, _ = inputs.sampler_config(tok, dataclasses.replace(TASK, chat_template="toy_eos"), SAMPLING, num_turns=2)
    assert cfg.stop_token_ids == (tok.token_id("<eot>"), tok.eos_id)
    assert cfg.num_turns == 2
