"""Every default of every job lives here; job configs (sft.py, stage1.py ...) start from these.

Configs are Python files with ``get_config(arg)``; pick one with
``--config=configs/sft.py:tiny`` and override any field with ``--config.key=value``.
Configs are locked, so a misspelt override fails before any work is done.
"""

import os

import ml_collections

from configs import models


def mesh() -> ml_collections.ConfigDict:
    # Axis sizes; one may be -1 to take the remaining devices.
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def data() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="toy_arithmetic",  # a key of score_jax.data.BUILDERS
        data_dir=os.path.expanduser("~/tensorflow_datasets"),  # TFDS data_dir; built here if missing
        builder_seed=0,  # the toy task's generation seed (part of the dataset's identity)
        num_train=20_000,
        num_test=2_000,
        train_split="train",
        eval_split="test",
        seq_len=128,  # tokens per example, prompt and response together
        too_long="error",  # error | skip | truncate: what to do with an example over seq_len
    ))


def optim() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        learning_rate=1e-3,
        schedule="cosine",  # cosine | constant (both after linear warmup)
        warmup_steps=50,
        end_lr_fraction=0.1,  # cosine decays to learning_rate * end_lr_fraction
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.0,
        clip_norm=1.0,  # clip by global norm; 0 disables
        grad_accum_steps=1,  # optax.MultiSteps: one update every this many batches
        max_nonfinite_steps=10,  # stop (after saving) after this many consecutive non-finite steps
    ))


def checkpoint() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        every_steps=100,
        keep=3,
        async_save=True,
    ))


def base(model_preset: str = "tiny") -> ml_collections.ConfigDict:
    """Fields shared by every job."""
    c = ml_collections.ConfigDict()
    c.job = "sft"
    c.seed = 0  # root PRNG seed: split by purpose (init, data, sampling), folded with the step
    c.model_preset = model_preset
    c.model = models.get(model_preset)
    c.mesh = mesh()
    c.data = data()
    c.optim = optim()
    c.checkpoint = checkpoint()
    c.batch_size = 32  # global batch, in examples
    c.total_steps = 500
    c.log_every = 10  # console and TensorBoard
    # Positions per vocabulary-projection chunk in the loss (0 = all at once). With 128k-256k
    # vocabularies the [batch, length, vocab] logits dominate memory; chunks of 128-512 fix that.
    c.loss_chunk = 0
    c.init_from = ""  # a params-only export directory to start from; "" = random init
    c.distributed = False  # call jax.distributed.initialize() (multi-host TPU pods)
    # Persistent XLA compilation cache: a resumed or repeated run skips recompiling. "" = off.
    c.compilation_cache_dir = os.path.expanduser("~/.cache/score_jax/xla")
    return c
