"""The ``sft`` job: supervised fine-tuning with the loss on response tokens only.

    python -m score_jax.main --config=configs/sft.py:toy --workdir=runs/sft_toy
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from score_jax import chat, learner, model, multihost, optim, settings
from score_jax.data import pipeline
from score_jax.jobs import harness, inputs, keys

BATCH_KEYS = ("tokens", "loss_mask", "valid")


def sft_step(state, step: int, *, batches, train_step, shardings: dict, lr_at, grad_accum_steps: int):
    """One SFT step on the next batch of this process's examples: (state, metrics)."""
    local = next(batches)
    batch = {k: jax.make_array_from_process_local_data(shardings[k], local[k]) for k in BATCH_KEYS}
    state, m = train_step(state, batch)
    return state, dict(m, lr=lr_at(step // grad_accum_steps))


def run(cfg: settings.TrainConfig, workdir: str, source=None, learn: str = "all") -> dict:
    """Trains, checkpoints, exports params to ``<workdir>/export`` and returns the summary
    that is also written to ``<workdir>/summary.json``.

    ``source`` (records with the prompt and ``data.sft_fields``) replaces the dataset's train
    split, e.g. the model's own episodes for the STaR and Pair-SFT baselines; ``learn`` is
    ``pipeline.sft_loader``'s (which attempts carry the loss)."""
    # ------------------------------------------------------------------ mesh and keys
    mesh = harness.make_mesh(cfg.mesh, cfg.batch_size)
    root = harness.root_key(cfg)

    # ------------------------------------------------------------------ input
    builder = inputs.dataset(cfg.data)
    tok = inputs.tokenizer(cfg.tokenizer, builder, cfg.model)
    if source is None:
        source = builder.as_data_source(split=cfg.data.train_split)
    batches = pipeline.sft_loader(
        source, tok, seq_len=cfg.data.seq_len, global_batch_size=cfg.batch_size, seed=keys.seed(root, "data"),
        shard_index=jax.process_index(), shard_count=jax.process_count(), too_long=cfg.data.too_long,
        template=chat.get(cfg.task.chat_template), attempt_fields=cfg.data.attempt_fields(),
        correction=cfg.task.correction, learn=learn, prompt_template=cfg.task.prompt_template)
    batch_shapes = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.data.seq_len), np.int32) for k in BATCH_KEYS}

    # ------------------------------------------------------------------ model and optimiser
    tx = optim.make(cfg.optim, cfg.total_steps, model.param_axes(cfg.model))

    def init():
        params = inputs.params(cfg.init_from, cfg.model, mesh) if cfg.init_from else None
        return learner.init_state(cfg.model, tx, mesh, keys.key(root, "init"), params)

    with harness.Run(cfg, workdir, tx, mesh) as run:
        state, progress = run.resume_or_init(init)
        if progress:
            batches.set_state(pipeline.resume_state(progress["data"], jax.process_index(), jax.process_count()))

        # -------------------------------------------------------------- update step
        step_fn = functools.partial(
            sft_step, batches=batches, shardings=learner.batch_shardings(mesh, batch_shapes),
            train_step=learner.make_sft_step(cfg.model, tx, mesh, batch_shapes, cfg.loss_chunk),
            lr_at=optim.schedule(cfg.optim, cfg.total_steps), grad_accum_steps=cfg.optim.grad_accum_steps)

        # -------------------------------------------------------------- loop, export and summary
        out = run.loop(state, step_fn, lambda: {"data": pipeline.saved_positions(
            multihost.gather_objects(batches.get_state()), jax.process_count())})
        return run.finish(out)

