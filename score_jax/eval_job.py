"""The ``eval`` job: N-attempt self-correction evaluation of any export on any task split.

    python -m score_jax.main --config=configs/eval.py:toy --config.eval.params=runs/stage2_toy/export

Each problem gets ``samples_per_problem`` episodes of ``num_attempts`` attempts (greedy at
temperature 0), each attempt after the same correction instruction, from one sampler call per
batch of problems. Writes ``<workdir>/eval.json`` (``evaluate.self_correction`` metrics with
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

from score_jax import chat, episodes, evaluate, inputs, metrics, model, rewards
from score_jax import sampler as sampler_lib
from score_jax import settings, sharding
from score_jax.data import prompt_set

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How episodes are sampled (see configs/eval.py)."""

    num_attempts: int
    temperature: float
    top_k: int
    top_p: float
    samples_per_problem: int
    batch_size: int  # problems per sampler call
    max_new_tokens: int
    chunk_len: int


_HOW = "any training job writes <workdir>/export at its end"


def load_policy(path: str, cfg: model.ModelConfig, mesh) -> dict:
    """Params from a params export (``<run>/export``, ``<run>/best``) or a Hugging Face directory."""
    return inputs.params(path, cfg, mesh, _HOW)


def generate(cfg: model.ModelConfig, params: dict, mesh, ps: prompt_set.PromptSet, tok, template: chat.ChatTemplate,
             correction: str, dec: Decoding, seed: int) -> dict:
    """Samples every prompt of ``ps``; returns this process's rows, problem-major
    (row p * k + j = sample j of problem p; all rows on one host):
    {"texts": [A][rows] str, "lengths" [A, rows] int, "truncated" [A, rows] bool, "problem" [rows]}."""
    k = dec.samples_per_problem
    instruction = np.asarray(chat.instruction_ids(tok, template, correction), np.int32)
    stop_ids = tuple(dict.fromkeys(chat.stop_ids(tok, template) + (tok.eos_id,)))
    scfg = sampler_lib.SamplerConfig(
        max_prompt_len=ps.tokens.shape[1], max_new_tokens=dec.max_new_tokens, instruction_len=len(instruction),
        num_turns=dec.num_attempts, temperature=dec.temperature, top_k=dec.top_k, top_p=dec.top_p,
        samples_per_prompt=k, stop_token_ids=stop_ids, pad_id=tok.pad_id, chunk_len=dec.chunk_len)
    B = dec.batch_size
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if B % shards:
        raise ValueError(f"eval.batch_size={B} must be divisible by data x fsdp = {shards}.")
    smp = sampler_lib.Sampler(cfg, scfg, mesh, B)
    shard_p = sharding.batch_sharding(mesh, 2)
    shard_l = sharding.batch_sharding(mesh, 1)
    n, proc, n_proc = len(ps), jax.process_index(), jax.process_count()
    per = B // n_proc
    texts = [[] for _ in range(dec.num_attempts)]
    lengths, truncated, problem = [[] for _ in range(dec.num_attempts)], [[] for _ in range(dec.num_attempts)], []
    key = jax.random.fold_in(jax.random.key(seed), 3)  # purpose 3: evaluation sampling
    t0 = time.perf_counter()
    for b, first in enumerate(range(0, n, B)):
        idx = np.arange(first, first + B) % n  # the last batch wraps around; extra rows dropped
        mine = idx[proc * per:(proc + 1) * per]
        prompts = jax.make_array_from_process_local_data(shard_p, ps.tokens[mine])
        lens = jax.make_array_from_process_local_data(shard_l, ps.lengths[mine])
        out = smp(params, prompts, lens, instruction, jax.random.fold_in(key, b))
        real = np.repeat(first + proc * per + np.arange(per) < n, k)
        for a in range(dec.num_attempts):
            turn = {f: episodes.local_rows(out["turns"][a][f]) for f in ("tokens", "lengths", "truncated")}
            texts[a] += [t for t, r in zip(episodes.turn_texts(tok, turn["tokens"], turn["lengths"], stop_ids), real) if r]
            lengths[a].append(turn["lengths"][real])
            truncated[a].append(turn["truncated"][real])
        problem.append(np.repeat(mine, k)[real])
        done = min(first + B, n)
        log.info("eval: %d/%d problems sampled (%.0f s)", done, n, time.perf_counter() - t0)
    return {"texts": texts, "lengths": np.stack([np.concatenate(x) for x in lengths]),
            "truncated": np.stack([np.concatenate(x) for x in truncated]), "problem": np.concatenate(problem)}


def score(reward_fn, gen: dict, ps: prompt_set.PromptSet) -> np.ndarray:
    """correct [A, rows] float32 of every attempt of ``generate``'s rows."""
    refs = [ps.answers[int(p)] for p in gen["problem"]]
    return episodes.score_turns(reward_fn, gen["texts"], refs)


def summarize(correct: np.ndarray, gen: dict, num_problems: int, k: int) -> dict:
    """eval.json's metrics from all rows (gathered over hosts first)."""
    c = _gather(correct).reshape(correct.shape[0], num_problems, k)
    out = evaluate.self_correction(c)
    if len(gen["texts"]) >= 2:
        out["edit_ratio"] = float(np.mean(_gather(episodes.edit_ratios(gen["texts"][0], gen["texts"][1]))))
    out["mean_length"] = [float(x) for x in _gather(gen["lengths"]).mean(axis=1)]
    out["truncated_fraction"] = [float(x) for x in _gather(gen["truncated"]).mean(axis=1)]
    return out


def _gather(x: np.ndarray) -> np.ndarray:
    """Rows of every process, concatenated along the last axis in process order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    parts = multihost_utils.process_allgather(np.asarray(x))  # [n_proc, ...]
    return np.concatenate(list(parts), axis=-1)


def scaling_study(cfg, params, mesh, ps, tok, template, task: settings.TaskConfig, ev: settings.EvalConfig,
                  reward_fn, seed: int) -> dict:
    """evaluate.inference_scaling over ``scaling_samples`` two-attempt episodes per problem."""
    dec = Decoding(2, ev.scaling_temperature, ev.top_k, ev.top_p, ev.scaling_samples, ev.batch_size,
                   ev.max_new_tokens, ev.chunk_len)
    gen = generate(cfg, params, mesh, ps, tok, template, task.correction, dec, seed + 1)
    S, P = ev.scaling_samples, len(ps)
    extract = rewards.REWARDS[task.reward].final_answer
    answers = np.empty((2, P, S), dtype=object)
    for a in range(2):
        for row, text in enumerate(gen["texts"][a]):
            answers[a, row // S, row % S] = extract(text)
    cache: dict = {}

    def is_correct(p: int, answer):
        if answer is None:
            return False
        if (p, answer) not in cache:
            cache[(p, answer)] = rewards.REWARDS[task.reward].score_batch(
                [rewards.REWARDS[task.reward].answer_text(answer)], [ps.answers[p]])[0] == 1.0
        return cache[(p, answer)]

    return evaluate.inference_scaling(answers, is_correct, evaluate.scaling_budgets(S))


def run(cfg: settings.EvalJobConfig, workdir: str) -> dict:
    ev, task = cfg.eval, cfg.task
    if task.reward not in rewards.REWARDS:
        raise ValueError(f"task.reward={task.reward!r}; choose one of {sorted(rewards.REWARDS)}.")
    if not ev.params:
        raise ValueError("eval.params is empty; point it at an export, e.g. runs/stage2_toy/export.")
    inputs.require_params(ev.params, "params", _HOW)
    mesh = sharding.make_mesh(cfg.mesh)
    builder = inputs.dataset(cfg.data)
    tok = inputs.tokenizer(cfg.tokenizer, builder, cfg.model)
    template = chat.get(task.chat_template)
    ps = inputs.prompts(builder, ev.split, tok, task, max_prompt_len=ev.max_prompt_len, too_long=cfg.data.too_long,
                        limit=ev.num_problems)
    params = load_policy(ev.params, cfg.model, mesh)
    reward_fn = rewards.REWARDS[task.reward].score_batch
    dec = Decoding(ev.num_attempts, ev.temperature, ev.top_k, ev.top_p, ev.samples_per_problem, ev.batch_size,
                   ev.max_new_tokens, ev.chunk_len)
    t0 = time.perf_counter()
    gen = generate(cfg.model, params, mesh, ps, tok, template, task.correction, dec, cfg.seed)
    correct = score(reward_fn, gen, ps)
    result = summarize(correct, gen, len(ps), ev.samples_per_problem)
    result.update(params=ev.params, split=ev.split, decoding=dataclasses.asdict(dec),
                  prompts={"used": len(ps), "too_long": ps.too_long, "records": ps.num_records})
    if ev.scaling_samples > 0:
        result["inference_scaling"] = scaling_study(cfg.model, params, mesh, ps, tok, template, task, ev,
                                                    reward_fn, cfg.seed)
        if jax.process_index() == 0:
            from score_jax import plots  # matplotlib only when a plot is drawn
            plots.inference_scaling(os.path.join(workdir, "inference_scaling.png"), result["inference_scaling"])
    result["seconds"] = time.perf_counter() - t0
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
