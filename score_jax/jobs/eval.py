"""The ``eval`` job: N-attempt self-correction evaluation of any export on any task split.

    python -m score_jax.main --config=configs/eval.py:toy --config.eval.params=runs/stage2_toy/export

Each problem gets ``sampling.samples_per_prompt`` episodes of ``num_attempts`` attempts (greedy
at temperature 0), each attempt after the same correction instruction, from one sampler call
per batch of problems. Writes ``<workdir>/eval.json`` (``evaluate.self_correction`` metrics with
95% intervals, edit-distance ratio, mean lengths, the accuracy after each attempt, and the
inference-scaling study when ``scaling_samples`` > 0, also drawn as
``<workdir>/inference_scaling.png``) and ``<workdir>/episodes.jsonl``, and prints the table.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from score_jax import episodes, evaluate, metrics, model, rewards
from score_jax import sampler as sampler_lib
from score_jax import settings, sharding
from score_jax.data import prompt_set
from score_jax.jobs import harness, inputs, keys

log = logging.getLogger(__name__)

_HOW = "any training job writes <workdir>/export at its end"


def load_policy(path: str, cfg: model.ModelConfig, mesh) -> dict:
    """Params from a params export (``<run>/export``, ``<run>/best``) or a Hugging Face directory."""
    return inputs.params(path, cfg, mesh, _HOW)


def generate(cfg: model.ModelConfig, params: dict, mesh, ps: prompt_set.PromptSet, tok, task: settings.TaskConfig,
             sampling: settings.SamplingConfig, num_attempts: int, batch_size: int, key: jax.Array) -> dict:
    """Samples every prompt of ``ps`` (batch b with ``fold_in(key, b)``; ``batch_size`` divides
    over the mesh: see harness.make_mesh); returns this process's
    rows, problem-major (row p * k + j = sample j of problem p; all rows on one host):
    {"texts": [A][rows] str, "lengths" [A, rows] int, "truncated" [A, rows] bool, "problem" [rows]}."""
    k, B = sampling.samples_per_prompt, batch_size
    scfg, instruction = inputs.sampler_config(tok, task, sampling, num_attempts)
    smp = sampler_lib.Sampler(cfg, scfg, mesh, B)
    shard_p, shard_l = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    n, proc, n_proc = len(ps), jax.process_index(), jax.process_count()
    per = B // n_proc
    texts = [[] for _ in range(num_attempts)]
    lengths, truncated, problem = [[] for _ in range(num_attempts)], [[] for _ in range(num_attempts)], []
    t0 = time.perf_counter()
    for b, first in enumerate(range(0, n, B)):
        idx = np.arange(first, first + B) % n  # the last batch wraps around; extra rows dropped
        mine = idx[proc * per:(proc + 1) * per]
        prompts = jax.make_array_from_process_local_data(shard_p, ps.tokens[mine])
        lens = jax.make_array_from_process_local_data(shard_l, ps.lengths[mine])
        out = smp(params, prompts, lens, instruction, jax.random.fold_in(key, b))
        real = np.repeat(first + proc * per + np.arange(per) < n, k)
        for a in range(num_attempts):
            turn = {f: episodes.local_rows(out["turns"][a][f]) for f in ("tokens", "lengths", "truncated")}
            texts[a] += [t for t, r in zip(episodes.turn_texts(tok, turn["tokens"], turn["lengths"],
                                                               scfg.stop_token_ids), real) if r]
            lengths[a].append(turn["lengths"][real])
            truncated[a].append(turn["truncated"][real])
        problem.append(np.repeat(mine, k)[real])
        log.info("eval: %d/%d problems sampled (%.0f s)", min(first + B, n), n, time.perf_counter() - t0)
    return {"texts": texts, "lengths": np.stack([np.concatenate(x) for x in lengths]),
            "truncated": np.stack([np.concatenate(x) for x in truncated]), "problem": np.concatenate(problem)}


def score(reward: rewards.Reward, gen: dict, ps: prompt_set.PromptSet) -> np.ndarray:
    """correct [A, rows] float32 of every attempt of ``generate``'s rows."""
    refs = [ps.answers[int(p)] for p in gen["problem"]]
    return episodes.score_turns(reward.score_batch, gen["texts"], refs)


def summarize(correct: np.ndarray, gen: dict, num_problems: int, k: int) -> dict:
    """eval.json's metrics from all rows (gathered over hosts first)."""
    c = _gather(correct).reshape(correct.shape[0], num_problems, k)
    out = evaluate.self_correction(c)
    if len(gen["texts"]) >= 2:
        out["edit_ratio"] = float(np.mean(_gather(episodes.edit_ratios(gen["texts"][0], gen["texts"][1]))))
        revised = np.asarray([a != b for a, b in zip(gen["texts"][0], gen["texts"][1])], np.float64)
        rates = evaluate.revise_rates(_gather(correct[0]), _gather(correct[1]), _gather(revised))
        out["revise"] = {k: float(v) if k in evaluate.REVISE_KEYS else int(v) for k, v in rates.items()}
    out["mean_length"] = [float(x) for x in _gather(gen["lengths"]).mean(axis=1)]
    out["truncated_fraction"] = [float(x) for x in _gather(gen["truncated"]).mean(axis=1)]
    return out


def _gather(x: np.ndarray) -> np.ndarray:
    """Rows of every process, concatenated along the last axis in process order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    parts = multihost_utils.process_allgather(np.asarray(x))  # [n_proc, ...]
    return np.concatenate(list(parts), axis=-1)


def scaling_study(cfg: model.ModelConfig, params, mesh, ps, tok, task: settings.TaskConfig, ev: settings.EvalConfig,
                  reward: rewards.Reward, key: jax.Array) -> dict:
    """evaluate.inference_scaling over ``scaling_samples`` two-attempt episodes per problem."""
    if reward.final_answer is None:
        raise ValueError(f"eval.scaling_samples needs final answers to vote on; task.reward={task.reward!r} has none.")
    S, P = ev.scaling_samples, len(ps)
    sampling = dataclasses.replace(ev.sampling, temperature=ev.scaling_temperature, samples_per_prompt=S)
    gen = generate(cfg, params, mesh, ps, tok, task, sampling, 2, ev.batch_size, key)
    answers = np.empty((2, P, S), dtype=object)
    for a in range(2):
        for row, text in enumerate(gen["texts"][a]):
            answers[a, row // S, row % S] = reward.final_answer(text)
    cache: dict = {}

    def is_correct(p: int, answer):
        if answer is None:
            return False
        if (p, answer) not in cache:
            cache[(p, answer)] = reward.score_batch([reward.answer_text(answer)], [ps.answers[p]])[0] == 1.0
        return cache[(p, answer)]

    return evaluate.inference_scaling(answers, is_correct, evaluate.scaling_budgets(S))


def run(cfg: settings.EvalJobConfig, workdir: str) -> dict:
    ev, task = cfg.eval, cfg.task
    reward = inputs.reward(task.reward)
    if not ev.params:
        raise ValueError("eval.params is empty; point it at an export, e.g. runs/stage2_toy/export.")
    inputs.require_params(ev.params, "params", _HOW)
    # ------------------------------------------------------------------ mesh and keys
    mesh = harness.make_mesh(cfg.mesh, ev.batch_size, "eval.batch_size")
    root = harness.root_key(cfg)
    # ------------------------------------------------------------------ input and params
    builder = inputs.dataset(cfg.data)
    tok = inputs.tokenizer(cfg.tokenizer, builder, cfg.model)
    ps = inputs.prompts(builder, ev.split, tok, task, max_prompt_len=ev.sampling.max_prompt_len,
                        too_long=cfg.data.too_long, limit=ev.num_problems)
    params = load_policy(ev.params, cfg.model, mesh)
    # ------------------------------------------------------------------ sample, score, summarise
    t0 = time.perf_counter()
    gen = generate(cfg.model, params, mesh, ps, tok, task, ev.sampling, ev.num_attempts, ev.batch_size,
                   keys.key(root, "eval"))
    correct = score(reward, gen, ps)
    result = summarize(correct, gen, len(ps), ev.sampling.samples_per_prompt)
    result.update(params=ev.params, split=ev.split,
                  decoding=dict(num_attempts=ev.num_attempts, batch_size=ev.batch_size,
                                **dataclasses.asdict(ev.sampling)),
                  prompts={"used": len(ps), "too_long": ps.too_long, "records": ps.num_records})
    if ev.scaling_samples > 0:
        result["inference_scaling"] = scaling_study(cfg.model, params, mesh, ps, tok, task, ev, reward,
                                                    keys.key(root, "scaling"))
        if jax.process_index() == 0:
            from score_jax import plots  # matplotlib only when a plot is drawn
            plots.inference_scaling(os.path.join(workdir, "inference_scaling.png"), result["inference_scaling"])
    result["seconds"] = time.perf_counter() - t0
    # ------------------------------------------------------------------ write
    metrics.write_json(os.path.join(workdir, "eval.json"), result)
    write_episodes(os.path.join(workdir, "episodes.jsonl"), gen, correct, ps)
    if jax.process_index() == 0:
        print(evaluate.table({os.path.basename(os.path.normpath(ev.params)) or "model": result}), flush=True)
    return result


def write_episodes(path: str, gen: dict, correct: np.ndarray, ps: prompt_set.PromptSet) -> None:
    """One JSON line per episode of this host's rows (process 0)."""
    if jax.process_index() != 0:
        return
    lines = []
    for row, p in enumerate(gen["problem"]):
        lines.append(json.dumps({"problem": ps.problems[int(p)], "answer": ps.answers[int(p)],
                                 "attempts": [gen["texts"][a][row] for a in range(len(gen["texts"]))],
                                 "correct": [float(correct[a][row]) for a in range(len(gen["texts"]))]}))
    epath.Path(path).write_text("\n".join(lines) + "\n")
