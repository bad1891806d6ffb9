"""The ``sft`` job: supervised fine-tuning with the loss on response tokens only."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

import jax
import numpy as np

from score_jax import chat, checkpoints, inputs, learner, loop, metrics, model, optim, settings, sharding
from score_jax.data import pipeline


def run(cfg: settings.TrainConfig, workdir: str, source=None, learn: str = "all") -> dict:
    """Trains, checkpoints, exports params to ``<workdir>/export`` and returns the summary
    that is also written to ``<workdir>/summary.json``.

    ``source`` (records with the prompt and ``data.sft_fields``) replaces the dataset's train
    split, e.g. the model's own episodes for the STaR and Pair-SFT baselines; ``learn`` is
    ``pipeline.sft_loader``'s (which attempts carry the loss)."""
    # ------------------------------------------------------------------ mesh
    mesh = sharding.make_mesh(cfg.mesh)
    n_proc, proc = jax.process_count(), jax.process_index()
    if cfg.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by data x fsdp = "
                         f"{mesh.shape['data'] * mesh.shape['fsdp']}.")
    log.info("Mesh %s over %d devices, %d processes.", dict(mesh.shape), mesh.size, n_proc)

    # ------------------------------------------------------------------ input
    builder = inputs.dataset(cfg.data)
    tok = inputs.tokenizer(cfg.tokenizer, builder, cfg.model)
    if source is None:
        source = builder.as_data_source(split=cfg.data.train_split)
    it = pipeline.sft_loader(source, tok, seq_len=cfg.data.seq_len, global_batch_size=cfg.batch_size,
                             seed=cfg.seed, shard_index=proc, shard_count=n_proc,
                             too_long=cfg.data.too_long, template=chat.get(cfg.task.chat_template),
                             attempt_fields=cfg.data.attempt_fields(), correction=cfg.task.correction,
                             learn=learn, prompt_template=cfg.task.prompt_template)
    batch_shapes = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.data.seq_len), np.int32)
                    for k in ("tokens", "loss_mask", "valid")}
    b_shard = learner.batch_shardings(mesh, batch_shapes)

    # ------------------------------------------------------------------ model and optimiser
    tx = optim.make(cfg.optim, cfg.total_steps, model.param_axes(cfg.model))
    lr_at = optim.schedule(cfg.optim, cfg.total_steps)
    manager = checkpoints.Manager(workdir, cfg.checkpoint.every_steps, cfg.checkpoint.keep,
                                  cfg.checkpoint.async_save)
    restored = manager.restore_latest(learner.abstract_state(cfg.model, tx, mesh))
    if restored is not None:
        start, state, extra = restored
        loop.check_same_run(extra, cfg.seed, cfg.data.name)
        it.set_state(extra["data"].encode() if isinstance(extra["data"], str) else extra["data"])
        log.info("Resumed from %s at step %d.", manager.directory, start)
    else:
        start = 0
        init_key = jax.random.fold_in(jax.random.key(cfg.seed), 0)  # purpose 0: init
        params = None
        if cfg.init_from:
            params = inputs.params(cfg.init_from, cfg.model, mesh)
        state = learner.init_state(cfg.model, tx, mesh, init_key, params)

    # ------------------------------------------------------------------ update step
    train_step = learner.make_sft_step(cfg.model, tx, mesh, batch_shapes, cfg.loss_chunk)

    def step_fn(state, step):
        local = next(it)
        batch = {k: jax.make_array_from_process_local_data(b_shard[k], local[k]) for k in batch_shapes}
        state, m = train_step(state, batch)
        m["lr"] = lr_at(step // cfg.optim.grad_accum_steps)
        return state, m

    def extra_fn():
        st = it.get_state()
        return {"data": st.decode() if isinstance(st, bytes) else st, "seed": cfg.seed,
                "data_name": cfg.data.name}

    # ------------------------------------------------------------------ loop
    writer = metrics.Writer(workdir, cfg.total_steps, start)
    try:
        out = loop.run(state=state, start_step=start, total_steps=cfg.total_steps, step_fn=step_fn,
                       extra_fn=extra_fn, manager=manager, writer=writer, log_every=cfg.log_every,
                       max_nonfinite_steps=cfg.optim.max_nonfinite_steps)
    finally:
        writer.close()
        manager.close()
    if out.stopped_early:
        return {"step": out.step, "stopped_early": True}

    # ------------------------------------------------------------------ export and summary
    return loop.finish(workdir, out, model.num_params(cfg.model))


