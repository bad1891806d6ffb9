"""The ``stage1`` and ``stage2`` jobs: SCoRe's two-turn REINFORCE against a frozen reference.

    python -m score_jax.main --config=configs/stage1.py:toy   # then configs/stage2.py:toy

One step (``rl.stage_at(step)`` picks the objective, see configs/common.py ``rl.schedule``):
  1. sample: B prompts, k samples each, both attempts in one sampler call (score_jax/sampler.py);
  2. the frozen reference's log-probs of both turns are dispatched to the device, and while it
     runs the host decodes this process's rows and scores both turns with the task's reward;
  3. one jit update of the Stage I or Stage II loss (score_jax/learner.py, losses.score_loss).
What it keeps from the paper: on-policy REINFORCE with per-turn credit (discount 0), KL to the
base model, the Stage II shaping, the best-training-reward checkpoint. What it adds: a
leave-one-out baseline over the k samples of a prompt (unbiased, lower variance). What it
drops: the optional offline first attempts from the base model in Stage II.

Randomness: one root key; the sampler's key at step s is fold_in(fold_in(root, 2), s), and
the prompt order is a function of the seed, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from score_jax import chat, checkpoints, episodes, inputs, learner, loop, metrics, model, optim, rewards
from score_jax import sampler as sampler_lib
from score_jax import settings, sharding
from score_jax.data import prompt_set

log = logging.getLogger(__name__)

BEST_DIR = "best"
SAMPLES_FILE = "samples.jsonl"
PROGRESS_KEYS = ("stage", "reward1", "reward2", "delta", "kl1", "kl2", "entropy2", "len2", "grad_norm",
                 "time_sample", "time_reward", "time_learn")
_PURPOSE_SAMPLING = 2  # root-key purposes: 0 init (sft), 2 sampling


def how_to_create(path: str, job: str, preset: str) -> str:
    """The command that writes the export at ``path`` (for missing-export errors)."""
    if os.path.basename(os.path.normpath(path)) in (checkpoints.EXPORT_DIR, BEST_DIR):
        workdir = os.path.dirname(os.path.normpath(path))
        return f"python -m score_jax.main --config=configs/{job}.py:{preset} --workdir={workdir}"
    return (f"python -m score_jax.main --config=configs/{job}.py:{preset} --workdir=DIR and point the "
            f"config at DIR/export, or copy a Hugging Face checkpoint of {preset} (config.json, *.safetensors, "
            f"the tokenizer) into {path}")


def sampler_config(rl: settings.RLConfig, instruction_len: int, stop_ids, pad_id: int) -> sampler_lib.SamplerConfig:
    return sampler_lib.SamplerConfig(
        max_prompt_len=rl.max_prompt_len, max_new_tokens=rl.max_new_tokens, instruction_len=instruction_len,
        num_turns=2, temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
        samples_per_prompt=rl.samples_per_prompt, stop_token_ids=tuple(stop_ids), pad_id=pad_id,
        chunk_len=rl.chunk_len)


def run(cfg: settings.RLTrainConfig, workdir: str) -> dict:
    """Trains, checkpoints, exports params to ``<workdir>/export`` (and the best to
    ``<workdir>/best``), and returns the summary also written to ``<workdir>/summary.json``."""
    rl = cfg.rl
    if cfg.task.reward not in rewards.REWARDS:
        raise ValueError(f"task.reward={cfg.task.reward!r}; choose one of {sorted(rewards.REWARDS)}.")
    reward_fn = rewards.REWARDS[cfg.task.reward].score_batch
    template = chat.get(cfg.task.chat_template)
    # ------------------------------------------------------------------ mesh
    mesh = sharding.make_mesh(cfg.mesh)
    n_proc, proc = jax.process_count(), jax.process_index()
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards:
        raise ValueError(f"batch_size={cfg.batch_size} (prompts per step) must be divisible by "
                         f"data x fsdp = {shards}.")
    log.info("Mesh %s over %d devices, %d processes.", dict(mesh.shape), mesh.size, n_proc)

    # ------------------------------------------------------------------ exports first: fail fast
    resuming = bool(checkpoints.saved_steps(workdir))
    ref_hint = how_to_create(rl.reference, "sft", cfg.model_preset)
    inputs.require_params(rl.reference, "reference (base model)", ref_hint)
    if not resuming and cfg.init_from:
        stage1 = cfg.init_from != rl.reference
        inputs.require_params(cfg.init_from, "stage-1 policy" if stage1 else "initial policy",
                                   how_to_create(cfg.init_from, "stage1" if stage1 else "sft", cfg.model_preset))

    # ------------------------------------------------------------------ input
    builder = inputs.dataset(cfg.data)
    tok = inputs.tokenizer(cfg.tokenizer, builder, cfg.model)
    ps = inputs.prompts(builder, cfg.data.train_split, tok, cfg.task, max_prompt_len=rl.max_prompt_len,
                        too_long=cfg.data.too_long)
    it = prompt_set.batches(ps, global_batch_size=cfg.batch_size, seed=cfg.seed, shard_index=proc,
                            shard_count=n_proc)
    instruction = np.asarray(chat.instruction_ids(tok, template, cfg.task.correction), np.int32)
    stop_ids = tuple(dict.fromkeys(chat.stop_ids(tok, template) + (tok.eos_id,)))
    scfg = sampler_config(rl, len(instruction), stop_ids, tok.pad_id)
    rows = cfg.batch_size * rl.samples_per_prompt
    batch_shapes = learner.rl_batch_shapes(rows, scfg.episode_len(), rl.max_new_tokens)
    b_shard = learner.batch_shardings(mesh, batch_shapes)
    p_shard = learner.batch_shardings(mesh, {"tokens": jax.ShapeDtypeStruct((cfg.batch_size, rl.max_prompt_len), jnp.int32),
                                             "lengths": jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32)})

    # ------------------------------------------------------------------ model: reference and policy
    tx = optim.make(cfg.optim, cfg.total_steps, model.param_axes(cfg.model))
    lr_at = optim.schedule(cfg.optim, cfg.total_steps)
    ref_params = inputs.params(rl.reference, cfg.model, mesh, ref_hint)
    manager = checkpoints.Manager(workdir, cfg.checkpoint.every_steps, cfg.checkpoint.keep,
                                  cfg.checkpoint.async_save)
    setup = _Setup(cfg=cfg, workdir=workdir, mesh=mesh, tx=tx, lr_at=lr_at, ref_params=ref_params,
                   tok=tok, ps=ps, it=it, instruction=instruction, stop_ids=stop_ids, scfg=scfg,
                   batch_shapes=batch_shapes, b_shard=b_shard, p_shard=p_shard, reward_fn=reward_fn)
    try:
        return _train(setup, manager)
    finally:
        manager.close()


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What ``run`` prepared before any device work: the checked inputs of ``_train``."""

    cfg: settings.RLTrainConfig
    workdir: str
    mesh: Any
    tx: Any
    lr_at: Any
    ref_params: dict
    tok: Any
    ps: prompt_set.PromptSet
    it: Any
    instruction: np.ndarray
    stop_ids: tuple
    scfg: sampler_lib.SamplerConfig
    batch_shapes: dict
    b_shard: dict
    p_shard: dict
    reward_fn: Any


def _train(setup: _Setup, manager: checkpoints.Manager) -> dict:
    cfg, workdir, mesh, tx, lr_at, ref_params = (setup.cfg, setup.workdir, setup.mesh, setup.tx, setup.lr_at,
                                                 setup.ref_params)
    tok, ps, it, instruction, stop_ids, scfg = setup.tok, setup.ps, setup.it, setup.instruction, setup.stop_ids, setup.scfg
    batch_shapes, b_shard, p_shard, reward_fn = setup.batch_shapes, setup.b_shard, setup.p_shard, setup.reward_fn
    rl, k = cfg.rl, cfg.rl.samples_per_prompt
    restored = manager.restore_latest(learner.abstract_state(cfg.model, tx, mesh))
    best = {"reward": -float("inf"), "step": 0}
    if restored is not None:
        start, state, extra = restored
        loop.check_same_run(extra, cfg.seed, cfg.data.name)
        it.set_state(extra["data"])
        best = extra.get("best", best)
        _trim_samples(workdir, start)
        log.info("Resumed from %s at step %d.", manager.directory, start)
    else:
        start = 0
        if not cfg.init_from or cfg.init_from == rl.reference:
            params = _copy(ref_params)  # the policy's own buffers: the train step donates them
        else:
            params = inputs.params(cfg.init_from, cfg.model, mesh)
        state = learner.init_state(cfg.model, tx, mesh, jax.random.key(cfg.seed), params)

    # ------------------------------------------------------------------ sampler and update steps
    sampler = sampler_lib.Sampler(cfg.model, scfg, mesh, cfg.batch_size)
    pack = _make_pack(scfg, mesh, b_shard, p_shard)
    ref_logprobs = learner.make_reference_logprobs(cfg.model, mesh, batch_shapes, rl.max_new_tokens,
                                                   cfg.loss_chunk)
    steps = {s: learner.make_rl_step(cfg.model, rl, tx, mesh, batch_shapes, s, cfg.loss_chunk)
             for s in sorted(set(int(c) for c in rl.schedule))}
    instruction_dev = jax.device_put(instruction, sharding.replicated(mesh))
    sample_root = jax.random.fold_in(jax.random.key(cfg.seed), _PURPOSE_SAMPLING)
    window: list[float] = []

    def step_fn(state, step):
        local = next(it)
        t0 = time.perf_counter()
        prompts = jax.make_array_from_process_local_data(p_shard["tokens"], local["tokens"])
        lens = jax.make_array_from_process_local_data(p_shard["lengths"], local["lengths"])
        out = sampler(state["params"], prompts, lens, instruction_dev, jax.random.fold_in(sample_root, step))
        episode = pack(out, prompts, instruction_dev)
        ref_lp = ref_logprobs(ref_params, episode)  # runs on the device while the host scores
        turns = [{f: episodes.local_rows(out["turns"][t][f]) for f in ("tokens", "lengths")} for t in (0, 1)]
        t1 = time.perf_counter()
        texts = [episodes.turn_texts(tok, tr["tokens"], tr["lengths"], stop_ids) for tr in turns]
        answers = [ps.answers[int(i)] for i in local["index"] for _ in range(k)]
        r = episodes.score_turns(reward_fn, texts, answers)
        edit = episodes.edit_ratios(texts[0], texts[1])
        t2 = time.perf_counter()
        host = {"r1": r[0], "r2": r[1], "edit_ratio": edit}
        batch = dict(episode, **{n: jax.make_array_from_process_local_data(b_shard[n], v) for n, v in host.items()})
        state, m = steps[rl.stage_at(step)](state, batch, *ref_lp)
        reward_now = jax.device_get((m["reward1"], m["reward2"]))
        t3 = time.perf_counter()
        m = dict(m, lr=lr_at(step // cfg.optim.grad_accum_steps), time_sample=t1 - t0,
                 time_reward=t2 - t1, time_learn=t3 - t2)
        if rl.samples_every > 0 and (step + 1) % rl.samples_every == 0:
            _write_samples(workdir, step + 1, local, ps, texts, r, k, rl.samples_per_write)
        window.append(float(sum(reward_now)) / 2)
        if rl.keep_best and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.total_steps):
            mean = float(np.mean(window))
            window.clear()
            if mean > best["reward"]:
                best.update(reward=mean, step=step + 1)
                checkpoints.export_params(os.path.join(workdir, BEST_DIR), state["params"])
                metrics.write_json(os.path.join(workdir, BEST_DIR + ".json"), best)
        return state, m

    def extra_fn():
        return {"data": it.get_state(), "seed": cfg.seed, "data_name": cfg.data.name, "best": dict(best)}

    # ------------------------------------------------------------------ loop
    writer = metrics.Writer(workdir, cfg.total_steps, start)
    try:
        out = loop.run(state=state, start_step=start, total_steps=cfg.total_steps, step_fn=step_fn,
                       extra_fn=extra_fn, manager=manager, writer=writer, log_every=cfg.log_every,
                       max_nonfinite_steps=cfg.optim.max_nonfinite_steps, progress_keys=PROGRESS_KEYS)
    finally:
        writer.close()
    if out.stopped_early:
        return {"step": out.step, "stopped_early": True}

    # ------------------------------------------------------------------ export and summary
    return loop.finish(workdir, out, model.num_params(cfg.model), best=best,
                       prompts={"used": len(ps), "too_long": ps.too_long, "records": ps.num_records})


@jax.jit
def _copy(tree):
    # An arithmetic op, so jit cannot forward the input buffers as outputs.
    return jax.tree.map(lambda x: x * jnp.ones((), x.dtype), tree)


def _make_pack(scfg: sampler_lib.SamplerConfig, mesh, b_shard: dict, p_shard: dict):
    """jit (sampler output, prompts, instruction) -> the episode part of an RL batch."""
    keys = ("tokens", "valid", "start1", "start2", "mask1", "mask2", "logp1_sampler", "logp2_sampler",
            "truncated1", "truncated2")

    def fn(out, prompts, instruction):
        packed = sampler_lib.pack_episodes(scfg, out, prompts, instruction)
        ep = {"tokens": packed["tokens"], "valid": packed["valid"]}
        for t, turn in enumerate(out["turns"][:2], start=1):
            ep.update({f"start{t}": turn["start"], f"mask{t}": turn["mask"], f"logp{t}_sampler": turn["logprobs"],
                       f"truncated{t}": turn["truncated"]})
        return ep

    jitted = jax.jit(fn, out_shardings={k: b_shard[k] for k in keys})

    def run(out, prompts, instruction):
        with jax.set_mesh(mesh):
            return jitted(out, prompts, instruction)

    return run


def _write_samples(workdir: str, step: int, local: dict, ps: prompt_set.PromptSet, texts, r, k: int, n: int):
    """Appends up to ``n`` whole episodes of this process's rows to samples.jsonl (process 0)."""
    if jax.process_index() != 0 or n <= 0:
        return
    lines = []
    for row in range(min(n, len(texts[0]))):
        i = int(local["index"][row // k])
        lines.append(json.dumps({"step": step, "prompt": ps.problems[i], "answer": ps.answers[i],
                                 "y1": texts[0][row], "y2": texts[1][row],
                                 "r1": float(r[0][row]), "r2": float(r[1][row])}))
    path = epath.Path(workdir) / SAMPLES_FILE
    old = path.read_text() if path.exists() else ""
    path.write_text(old + "\n".join(lines) + "\n")


def _trim_samples(workdir: str, step: int) -> None:
    """Drops samples.jsonl lines written after ``step`` (a resumed run writes them again)."""
    path = epath.Path(workdir) / SAMPLES_FILE
    if jax.process_index() != 0 or not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))
