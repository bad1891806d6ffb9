"""The ``stage1`` and ``stage2`` jobs: SCoRe's two-turn REINFORCE against a frozen reference.

    python -m score_jax.main --config=configs/stage1.py:toy   # then configs/stage2.py:toy

One step (``rl_step``; ``rl.stage_at(step)`` picks the objective, see configs/common.py
``rl.schedule``):
  1. ``rollout``: B prompts, k samples each, both attempts in one sampler call, packed into the
     learner's episode arrays (score_jax/sampler.py);
  2. the frozen reference's log-probs of both turns are dispatched to the device, and while it
     runs ``score_rows`` decodes this process's rows and scores both turns with the task's reward;
  3. one jit update of the Stage I or Stage II loss (score_jax/learner.py, losses.score_loss).
What it keeps from the paper: on-policy REINFORCE with per-turn credit (discount 0), KL to the
base model, the Stage II shaping, the best-training-reward checkpoint. What it adds: a
leave-one-out baseline over the k samples of a prompt (unbiased, lower variance). What it
drops: the optional offline first attempts from the base model in Stage II.

Randomness (score_jax/jobs/keys.py): the sampler's key at step s is key(root, "sampling", s) and
the prompt order comes from key(root, "data"), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from score_jax import checkpoints, episodes, learner, metrics, model, optim, rewards
from score_jax import sampler as sampler_lib
from score_jax import settings, sharding
from score_jax.data import prompt_set
from score_jax.jobs import harness, inputs, keys

log = logging.getLogger(__name__)

BEST_DIR = "best"
SAMPLES_FILE = "samples.jsonl"
PROGRESS_KEYS = ("stage", "reward1", "reward2", "delta", "kl1", "kl2", "entropy2", "len2", "grad_norm",
                 "time_sample", "time_reward", "time_learn")


def how_to_create(path: str, job: str, preset: str) -> str:
    """The command that writes the export at ``path`` (for missing-export errors)."""
    if os.path.basename(os.path.normpath(path)) in (checkpoints.EXPORT_DIR, BEST_DIR):
        workdir = os.path.dirname(os.path.normpath(path))
        return f"python -m score_jax.main --config=configs/{job}.py:{preset} --workdir={workdir}"
    return (f"python -m score_jax.main --config=configs/{job}.py:{preset} --workdir=DIR and point the "
            f"config at DIR/export, or copy a Hugging Face checkpoint of {preset} (config.json, *.safetensors, "
            f"the tokenizer) into {path}")


# ---------------------------------------------------------------------------------------- one step


def rollout(params, local: dict, step: int, *, sampler: sampler_lib.Sampler, prompt_shardings: dict,
            instruction: jax.Array, sample_root: jax.Array) -> tuple[dict, dict]:
    """Samples both attempts of this step's prompts: (sampler output, the learner's episode arrays)."""
    prompts = jax.make_array_from_process_local_data(prompt_shardings["tokens"], local["tokens"])
    lens = jax.make_array_from_process_local_data(prompt_shardings["lengths"], local["lengths"])
    out = sampler(params, prompts, lens, instruction, jax.random.fold_in(sample_root, step))
    return out, sampler.pack(out, prompts, instruction)


def score_rows(out: dict, local: dict, *, tok, stop_ids: tuple, reward: rewards.Reward, answers: list[str],
               k: int) -> tuple[list[list[str]], dict]:
    """Host side: this process's rows decoded (texts [turn][row]) and the batch fields r1, r2,
    edit_ratio [rows] computed from them."""
    turns = [{f: episodes.local_rows(out["turns"][t][f]) for f in ("tokens", "lengths")} for t in (0, 1)]
    texts = [episodes.turn_texts(tok, tr["tokens"], tr["lengths"], stop_ids) for tr in turns]
    refs = [answers[int(i)] for i in local["index"] for _ in range(k)]
    r = episodes.score_turns(reward.score_batch, texts, refs)
    return texts, {"r1": r[0], "r2": r[1], "edit_ratio": episodes.edit_ratios(texts[0], texts[1])}


def rl_step(state, step: int, *, batches, roll, reference, score, updates: dict, stage_at, shardings: dict,
            lr_at, grad_accum_steps: int, record) -> tuple[dict, dict]:
    """One SCoRe step: ``roll`` (rollout), ``reference`` (the frozen model's log-probs, on the
    device while the host runs ``score``), then ``updates[stage_at(step)]``; ``record`` sees the
    step's episodes (samples.jsonl, the best checkpoint)."""
    local = next(batches)
    t0 = time.perf_counter()
    out, episode = roll(state["params"], local, step)
    ref_lp = reference(episode)  # queued behind the sampler; runs while the host scores
    jax.block_until_ready([t["lengths"] for t in out["turns"]])  # the host needs them next anyway
    t1 = time.perf_counter()
    texts, host = score(out, local)
    t2 = time.perf_counter()
    batch = dict(episode, **{n: jax.make_array_from_process_local_data(shardings[n], v) for n, v in host.items()})
    state, m = updates[stage_at(step)](state, batch, *ref_lp)
    reward_now = jax.device_get((m["reward1"], m["reward2"]))
    t3 = time.perf_counter()
    m = dict(m, lr=lr_at(step // grad_accum_steps), time_sample=t1 - t0, time_reward=t2 - t1, time_learn=t3 - t2)
    record.step(step + 1, state, local, texts, host, float(sum(reward_now)) / 2)
    return state, m


class Recorder:
    """What an RL run keeps of its episodes: whole episodes in samples.jsonl every
    ``rl.samples_every`` steps, and the params of the logging window with the best mean reward
    in ``<workdir>/best`` (``rl.keep_best``)."""

    def __init__(self, workdir: str, rl: settings.RLConfig, ps: prompt_set.PromptSet, log_every: int,
                 total_steps: int, best: dict | None):
        self.workdir, self.rl, self.ps = workdir, rl, ps
        self.log_every, self.total_steps = log_every, total_steps
        self.best = dict(best) if best else {"reward": -float("inf"), "step": 0}
        self._window: list[float] = []

    def step(self, step: int, state, local: dict, texts, host: dict, reward: float) -> None:
        rl = self.rl
        if rl.samples_every > 0 and step % rl.samples_every == 0:
            self._write_samples(step, local, texts, host)
        self._window.append(reward)
        if rl.keep_best and (step % self.log_every == 0 or step == self.total_steps):
            mean = float(np.mean(self._window))
            self._window.clear()
            if mean > self.best["reward"]:
                self.best.update(reward=mean, step=step)
                checkpoints.export_params(os.path.join(self.workdir, BEST_DIR), state["params"])
                metrics.write_json(os.path.join(self.workdir, BEST_DIR + ".json"), self.best)

    def _write_samples(self, step: int, local: dict, texts, host: dict) -> None:
        """Appends up to ``rl.samples_per_write`` whole episodes of this process's rows (process 0)."""
        n, k = self.rl.samples_per_write, self.rl.sampling.samples_per_prompt
        if jax.process_index() != 0 or n <= 0:
            return
        lines = []
        for row in range(min(n, len(texts[0]))):
            i = int(local["index"][row // k])
            lines.append(json.dumps({"step": step, "prompt": self.ps.problems[i], "answer": self.ps.answers[i],
                                     "y1": texts[0][row], "y2": texts[1][row],
                                     "r1": float(host["r1"][row]), "r2": float(host["r2"][row])}))
        path = epath.Path(self.workdir) / SAMPLES_FILE
        old = path.read_text() if path.exists() else ""
        path.write_text(old + "\n".join(lines) + "\n")

    def trim(self, step: int) -> None:
        """Drops samples.jsonl lines written after ``step`` (a resumed run writes them again)."""
        path = epath.Path(self.workdir) / SAMPLES_FILE
        if jax.process_index() != 0 or not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


# ---------------------------------------------------------------------------------------- the job


def run(cfg: settings.RLTrainConfig, workdir: str) -> dict:
    """Trains, checkpoints, exports params to ``<workdir>/export`` (and the best to
    ``<workdir>/best``), and returns the summary also written to ``<workdir>/summary.json``."""
    rl, k = cfg.rl, cfg.rl.sampling.samples_per_prompt
    reward = inputs.reward(cfg.task.reward)
    # ------------------------------------------------------------------ mesh and keys
    mesh = harness.make_mesh(cfg.mesh, cfg.batch_size, "batch_size (prompts per step)")
    root = harness.root_key(cfg)

    # ------------------------------------------------------------------ exports first: fail fast
    ref_hint = how_to_create(rl.reference, "sft", cfg.model_preset)
    inputs.require_params(rl.reference, "reference (base model)", ref_hint)
    own_init = bool(cfg.init_from) and cfg.init_from != rl.reference  # "": the policy starts as the reference
    if own_init and not checkpoints.saved_steps(workdir):
        what, made_by = ("stage-1 policy", "stage1") if cfg.job == "stage2" else ("initial policy", "sft")
        inputs.require_params(cfg.init_from, what, how_to_create(cfg.init_from, made_by, cfg.model_preset))

    # ------------------------------------------------------------------ input
    builder = inputs.dataset(cfg.data)
    tok = inputs.tokenizer(cfg.tokenizer, builder, cfg.model)
    ps = inputs.prompts(builder, cfg.data.train_split, tok, cfg.task, max_prompt_len=rl.sampling.max_prompt_len,
                        too_long=cfg.data.too_long)
    batches = prompt_set.batches(ps, global_batch_size=cfg.batch_size, seed=keys.seed(root, "data"),
                                 shard_index=jax.process_index(), shard_count=jax.process_count())
    scfg, instruction = inputs.sampler_config(tok, cfg.task, rl.sampling, num_turns=2)
    batch_shapes = learner.rl_batch_shapes(cfg.batch_size * k, scfg.episode_len(), rl.sampling.max_new_tokens)
    prompt_shapes = {"tokens": jax.ShapeDtypeStruct((cfg.batch_size, rl.sampling.max_prompt_len), jnp.int32),
                     "lengths": jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32)}

    # ------------------------------------------------------------------ model: reference and policy
    tx = optim.make(cfg.optim, cfg.total_steps, model.param_axes(cfg.model))
    ref_params = inputs.params(rl.reference, cfg.model, mesh, ref_hint)

    def init():
        # The policy's own buffers (the train step donates them), never the reference's.
        params = inputs.params(cfg.init_from, cfg.model, mesh) if own_init else _copy(ref_params)
        return learner.init_state(cfg.model, tx, mesh, keys.key(root, "init"), params)

    with harness.Run(cfg, workdir, tx, mesh) as run:
        state, progress = run.resume_or_init(init)
        if progress:
            batches.set_state(progress["data"])
        record = Recorder(workdir, rl, ps, cfg.log_every, cfg.total_steps, progress.get("best"))
        record.trim(run.start)

        # -------------------------------------------------------------- sampler and update steps
        sampler = sampler_lib.Sampler(cfg.model, scfg, mesh, cfg.batch_size)
        roll = functools.partial(rollout, sampler=sampler, prompt_shardings=learner.batch_shardings(mesh, prompt_shapes),
                                 instruction=jax.device_put(instruction, sharding.replicated(mesh)),
                                 sample_root=keys.key(root, "sampling"))
        ref_logprobs = learner.make_reference_logprobs(cfg.model, mesh, batch_shapes, rl.sampling.max_new_tokens,
                                                       cfg.loss_chunk)
        updates = {s: learner.make_rl_step(cfg.model, rl, tx, mesh, batch_shapes, s, cfg.loss_chunk)
                   for s in sorted(set(int(c) for c in rl.schedule))}
        step_fn = functools.partial(
            rl_step, batches=batches, roll=roll, reference=functools.partial(ref_logprobs, ref_params),
            score=functools.partial(score_rows, tok=tok, stop_ids=scfg.stop_token_ids, reward=reward,
                                    answers=ps.answers, k=k),
            updates=updates, stage_at=rl.stage_at, shardings=learner.batch_shardings(mesh, batch_shapes),
            lr_at=optim.schedule(cfg.optim, cfg.total_steps), grad_accum_steps=cfg.optim.grad_accum_steps,
            record=record)

        # -------------------------------------------------------------- loop, export and summary
        out = run.loop(state, step_fn, lambda: {"data": batches.get_state(), "best": dict(record.best)},
                       progress_keys=PROGRESS_KEYS)
        return run.finish(out, best=record.best,
                          prompts={"used": len(ps), "too_long": ps.too_long, "records": ps.num_records})


@jax.jit
def _copy(tree):
    # An arithmetic op, so jit cannot forward the input buffers as outputs.
    return jax.tree.map(lambda x: x * jnp.ones((), x.dtype), tree)
