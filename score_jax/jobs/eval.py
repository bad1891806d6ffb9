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
from typing import Callable

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from score_jax import checkpoints, episodes, evaluate, metrics, model, multihost, rewards
from score_jax import sampler as sampler_lib
from score_jax import settings, sharding
from score_jax.data import prompt_set
from score_jax.jobs import harness, inputs, keys

log = logging.getLogger(__name__)

_HOW = "any training job writes <workdir>/export at its end"


def load_policy(path: str, cfg: model.ModelConfig, mesh) -> dict:
    """Params from a params export (``<run>/export``, ``<run>/best``) or a Hugging Face directory."""
    return inputs.params(path, cfg, mesh, _HOW)


PROGRESS_DIR = "eval_progress"


class Progress:
    """An evaluation's finished batches, saved as they finish, so that a stopped evaluation
    (SIGTERM, Ctrl-C, kill -9) resumes at its next batch with the same results: one JSON line
    per batch of this process's rows in ``<workdir>/eval_progress/<tag>.p<process>.jsonl``,
    after a header line with ``fingerprint`` (what the rows depend on: the params files, the
    decoding, the prompts, the key). Saved batches of another fingerprint are dropped."""

    def __init__(self, workdir: str, tag: str, fingerprint: dict, on_first_save: Callable[[], None] = lambda: None):
        self.path = epath.Path(workdir) / PROGRESS_DIR / f"{tag}.p{jax.process_index()}.jsonl"
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.on_first_save = on_first_save
        self.batches = self._read()
        n = len(self.batches)
        if jax.process_count() > 1:  # every process resumes at the same batch
            n = int(np.min(multihost_utils.process_allgather(np.int32(n))))
        self.batches = self.batches[:n]
        if n:
            log.info("eval: resuming after %d saved batches (%s).", n, self.path.parent)

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except ValueError:
            header = {}
        if header.get("fingerprint") != self.fingerprint:
            log.warning("eval: %s was saved for other params or decoding; starting this evaluation afresh.", self.path)
            self.path.unlink()
            return []
        out = []
        for line in lines[1:]:
            try:
                out.append(json.loads(line))
            except ValueError:  # the line being written when the process was killed
                break
        return out

    def add(self, batch: dict) -> None:
        first = not self.path.exists()
        if first:
            self.on_first_save()
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            if first:
                f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            f.write(json.dumps(batch) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def clear(self) -> None:
        if self.path.exists():
            self.path.unlink()
        parent = self.path.parent
        try:  # the last file out removes the directory (epath raises its own error when not empty)
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
        except Exception:  # noqa: BLE001 - best effort: another process may be clearing it too
            pass


def params_fingerprint(path: str) -> dict:
    """What identifies the files of a params directory without reading them (names, sizes and
    modification times of its top-level files): a retrained export at the same path differs."""
    p = epath.Path(path)
    if "://" in path or not p.is_dir():
        return {"path": path}
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in os.scandir(path) if f.is_file())
    return {"path": os.path.abspath(path), "files": files}


def generate(cfg: model.ModelConfig, params: dict, mesh, ps: prompt_set.PromptSet, tok, task: settings.TaskConfig,
             sampling: settings.SamplingConfig, num_attempts: int, batch_size: int, key: jax.Array,
             progress: Progress | None = None) -> dict:
    """Samples every prompt of ``ps`` (batch b with ``fold_in(key, b)``; ``batch_size`` divides
    over the mesh: see harness.make_mesh); returns this process's
    rows, problem-major (row p * k + j = sample j of problem p; all rows on one host):
    {"texts": [A][rows] str, "lengths" [A, rows] int, "truncated" [A, rows] bool, "problem" [rows]}.

    With ``progress``, batches saved by an earlier, stopped call are reused, each new batch is
    saved as it finishes, and a stop signal ends the call after the batch under way with
    checkpoints.Stopped (the work so far saved)."""
    k, B = sampling.samples_per_prompt, batch_size
    scfg, instruction = inputs.sampler_config(tok, task, sampling, num_attempts)
    smp = sampler_lib.Sampler(cfg, scfg, mesh, B)
    shard_p, shard_l = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    n = len(ps)
    texts = [[] for _ in range(num_attempts)]
    lengths, truncated, problem = [[] for _ in range(num_attempts)], [[] for _ in range(num_attempts)], []
    t0 = time.perf_counter()
    starts = range(0, n, B)
    with checkpoints.StopRequest() as stop:
        for b, first in enumerate(starts):
            if progress is not None and b < len(progress.batches):
                rows = progress.batches[b]
            else:
                rows = _sample_batch(smp, params, ps, instruction, tok, scfg.stop_token_ids, num_attempts, k,
                                     jax.random.fold_in(key, b), first, B, shard_p, shard_l)
                if progress is not None:
                    progress.add(rows)
            for a in range(num_attempts):
                texts[a] += rows["texts"][a]
                lengths[a].append(np.asarray(rows["lengths"][a], np.int32))
                truncated[a].append(np.asarray(rows["truncated"][a], bool))
            problem.append(np.asarray(rows["problem"], np.int64))
            log.info("eval: %d/%d problems sampled (%.0f s)", min(first + B, n), n, time.perf_counter() - t0)
            if stop and b + 1 < len(starts):
                if progress is None:
                    raise checkpoints.Interrupted(stop.signum)
                raise checkpoints.Stopped(f"the evaluation's first {b + 1} of {len(starts)} batches are saved "
                                          f"in {progress.path.parent}")
    return {"texts": texts, "lengths": np.stack([np.concatenate(x) for x in lengths]),
            "truncated": np.stack([np.concatenate(x) for x in truncated]), "problem": np.concatenate(problem)}


def _sample_batch(smp, params, ps, instruction, tok, stop_ids, num_attempts: int, k: int, key, first: int, B: int,
                  shard_p, shard_l) -> dict:
    """This process's real rows of the batch of problems ``first .. first + B`` as JSON-ready
    lists (``generate``'s fields, one batch)."""
    n, proc, per = len(ps), jax.process_index(), B // jax.process_count()
    idx = np.arange(first, first + B) % n  # the last batch wraps around; extra rows dropped
    mine = idx[proc * per:(proc + 1) * per]
    prompts = jax.make_array_from_process_local_data(shard_p, ps.tokens[mine])
    lens = jax.make_array_from_process_local_data(shard_l, ps.lengths[mine])
    out = smp(params, prompts, lens, instruction, key)
    real = np.repeat(first + proc * per + np.arange(per) < n, k)
    rows: dict = {"texts": [], "lengths": [], "truncated": []}
    for a in range(num_attempts):
        turn = {f: episodes.local_rows(out["turns"][a][f]) for f in ("tokens", "lengths", "truncated")}
        rows["texts"].append([t for t, r in zip(episodes.turn_texts(tok, turn["tokens"], turn["lengths"],
                                                                    stop_ids), real) if r])
        rows["lengths"].append(turn["lengths"][real].tolist())
        rows["truncated"].append(turn["truncated"][real].tolist())
    rows["problem"] = np.repeat(mine, k)[real].tolist()
    return rows


def score(reward: rewards.Reward, gen: dict, ps: prompt_set.PromptSet) -> np.ndarray:
    """correct [A, rows] float32 of every attempt of ``generate``'s rows."""
    refs = [ps.answers[int(p)] for p in gen["problem"]]
    return episodes.score_turns(reward.score_batch, gen["texts"], refs)


def gather(gen: dict, correct: np.ndarray | None = None) -> tuple[dict, np.ndarray | None]:
    """``generate``'s rows and their ``score`` of every process, in problem-major order (row
    p * k + j = sample j of problem p), on every process: what the summary and the episode file
    are made of. Each process decoded and scored only its own rows."""
    if jax.process_count() == 1:
        return gen, correct
    problem = multihost.gather_rows(gen["problem"])
    order = np.argsort(problem, kind="stable")  # a process's rows of one problem are in sample order
    texts = [sum(multihost.gather_objects(t), []) for t in gen["texts"]]
    out = {"texts": [[t[i] for i in order] for t in texts], "problem": problem[order]}
    for f in ("lengths", "truncated"):
        out[f] = multihost.gather_rows(gen[f])[:, order]
    return out, None if correct is None else multihost.gather_rows(correct)[:, order]


def summarize(correct: np.ndarray, gen: dict, num_problems: int, k: int) -> dict:
    """eval.json's metrics from every row (``gather``'s)."""
    c = np.asarray(correct).reshape(correct.shape[0], num_problems, k)
    out = evaluate.self_correction(c)
    if len(gen["texts"]) >= 2:
        out["edit_ratio"] = float(np.mean(episodes.edit_ratios(gen["texts"][0], gen["texts"][1])))
        revised = np.asarray([a != b for a, b in zip(gen["texts"][0], gen["texts"][1])], np.float64)
        rates = evaluate.revise_rates(correct[0], correct[1], revised)
        out["revise"] = {k: float(v) if k in evaluate.REVISE_KEYS else int(v) for k, v in rates.items()}
    out["mean_length"] = [float(x) for x in np.asarray(gen["lengths"]).mean(axis=1)]
    out["truncated_fraction"] = [float(x) for x in np.asarray(gen["truncated"]).mean(axis=1)]
    return out


def scaling_study(cfg: model.ModelConfig, params, mesh, ps, tok, task: settings.TaskConfig, ev: settings.EvalConfig,
                  reward: rewards.Reward, key: jax.Array, progress: Progress | None = None) -> dict:
    """evaluate.inference_scaling over ``scaling_samples`` two-attempt episodes per problem."""
    if reward.final_answer is None:
        raise ValueError(f"eval.scaling_samples needs final answers to vote on; task.reward={task.reward!r} has none.")
    S, P = ev.scaling_samples, len(ps)
    sampling = dataclasses.replace(ev.sampling, temperature=ev.scaling_temperature, samples_per_prompt=S)
    gen = generate(cfg, params, mesh, ps, tok, task, sampling, 2, ev.batch_size, key, progress)
    gen, _ = gather(gen)  # the votes need every row
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
    saved = {tag: Progress(workdir, tag, {"params": params_fingerprint(ev.params), "prompts": len(ps),
                                          "identity": harness.identity(cfg), "tag": tag},
                           on_first_save=lambda: harness.claim_workdir(cfg, workdir))
             for tag in ("eval", "scaling")}
    gen = generate(cfg.model, params, mesh, ps, tok, task, ev.sampling, ev.num_attempts, ev.batch_size,
                   keys.key(root, "eval"), saved["eval"])
    gen, correct = gather(gen, score(reward, gen, ps))  # each process scores its own rows
    result = summarize(correct, gen, len(ps), ev.sampling.samples_per_prompt)
    result.update(params=ev.params, split=ev.split,
                  decoding=dict(num_attempts=ev.num_attempts, batch_size=ev.batch_size,
                                **dataclasses.asdict(ev.sampling)),
                  prompts={"used": len(ps), "too_long": ps.too_long, "records": ps.num_records})
    if ev.scaling_samples > 0:
        result["inference_scaling"] = scaling_study(cfg.model, params, mesh, ps, tok, task, ev, reward,
                                                    keys.key(root, "scaling"), saved["scaling"])
        if jax.process_index() == 0:
            from score_jax import plots  # matplotlib only when a plot is drawn
            plots.inference_scaling(os.path.join(workdir, "inference_scaling.png"), result["inference_scaling"])
    result["seconds"] = time.perf_counter() - t0
    # ------------------------------------------------------------------ write
    metrics.write_json(os.path.join(workdir, "eval.json"), result)
    write_episodes(os.path.join(workdir, "episodes.jsonl"), gen, correct, ps)
    for p in saved.values():  # eval.json and episodes.jsonl hold it all now
        p.clear()
    if jax.process_index() == 0:
        print(evaluate.table({os.path.basename(os.path.normpath(ev.params)) or "model": result}), flush=True)
    return result


def write_episodes(path: str, gen: dict, correct: np.ndarray, ps: prompt_set.PromptSet) -> None:
    """One JSON line per episode of ``gather``'s rows (process 0 writes)."""
    if jax.process_index() != 0:
        return
    lines = []
    for row, p in enumerate(gen["problem"]):
        lines.append(json.dumps({"problem": ps.problems[int(p)], "answer": ps.answers[int(p)],
                                 "attempts": [gen["texts"][a][row] for a in range(len(gen["texts"]))],
                                 "correct": [float(correct[a][row]) for a in range(len(gen["texts"]))]}))
    epath.Path(path).write_text("\n".join(lines) + "\n")
