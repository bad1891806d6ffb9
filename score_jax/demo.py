"""The ``demo`` job: the whole SCoRe pipeline on the CPU toy task, ending with the paper's table.

    python -m score_jax.main --config=configs/demo.py --workdir=runs/demo

Per seed, under ``<workdir>/seed<i>/``, each step a normal run directory of its own job:
    pretrain/     single-turn SFT on correct solutions (the model learns the arithmetic)
    base/         two-turn SFT on the base model's attempts: the SCoRe base model
    stage1/       SCoRe Stage I from base (reference: base)
    score/        SCoRe Stage II from stage1                          -> row "score"
    and, for the rows that need them: no_shaping/ (Stage II from stage1, shaping off),
    no_stage1/ (Stage II from base), naive_rl/ (Stage II from base, shaping off),
    star_r<k>/ (STaR rounds), pair_sft/ (Pair-SFT)
    eval_<row>/   the eval job on the test split for each row (eval.json, episodes.jsonl)
Rows: base (the base model), self_refine (the base model with a Self-Refine-style instruction),
star, pair_sft, naive_rl, no_stage1, no_shaping, stage1_only, score.

With ``demo.shared_base`` (the table's default) seeds 1.. use seed 0's pretrain/ and base/ (one
base model, as in the paper) and the untrained rows (base, self_refine) are evaluated once. With
``demo.only_seed=i`` a process runs only seed i's runs and stops: seeds run side by side (on the
2-core CPU, three processes together sampled 1.8x and fine-tuned 1.4x as many tokens per second
as one: the toy model's steps are overhead-bound), and the same command without it then writes
the table from the finished runs.

A finished step (its summary.json or eval.json exists) is not run again, so rerunning the same
command resumes the demo, each unfinished run from its own last checkpoint. At the end:
``<workdir>/results.json`` (rows keyed by method with acc_t1, acc_t2, delta, delta_i_to_c,
delta_c_to_i as fractions, their 95% intervals and per-seed values), ``training_rewards.png``,
``corrections.png``, the printed table, and with ``demo.results_md`` a Markdown report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

import numpy as np
from scipy import stats

from score_jax import baselines, chat, eval_job, evaluate, inputs, metrics, plots, rewards, rl, settings, sft
from score_jax import sharding

log = logging.getLogger(__name__)

METHODS = ("base", "self_refine", "star", "pair_sft", "naive_rl", "no_stage1", "no_shaping", "stage1_only", "score")
LABELS = {"base": "Base model", "self_refine": "Self-Refine (prompting)", "star": "STaR", "pair_sft": "Pair-SFT",
          "naive_rl": "Naive multi-turn RL", "no_stage1": "SCoRe w/o Stage I", "no_shaping": "SCoRe w/o shaping",
          "stage1_only": "Stage I only", "score": "SCoRe"}
UNTRAINED = ("base", "self_refine")  # rows that are the base model itself (shared with demo.shared_base)
KEYS = ("acc_t1", "acc_t2", "delta", "delta_i_to_c", "delta_c_to_i")


class Stopped(Exception):
    """A sub-run stopped early (SIGTERM): the demo stops too; rerun to resume."""


def _export(workdir: str) -> str:
    return os.path.join(workdir, "export")


def _done(workdir: str, name: str = "summary.json") -> bool:
    return os.path.exists(os.path.join(workdir, name))


class _Seed:
    """The runs of one seed, each made on first use (and skipped when already finished)."""

    def __init__(self, cfg: settings.DemoConfig, root: str, seed: int, shared: "_Seed | None" = None):
        self.cfg, self.root, self.seed = cfg, root, seed
        self.shared = shared  # demo.shared_base: the seed whose pretrain/ and base/ this one uses
        self._made: set[str] = set()

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    # ---------------------------------------------------------------- training runs

    def _train(self, name: str, job, cfg, **kw) -> str:
        wd = self.path(name)
        if name not in self._made and not _done(wd):
            log.info("demo seed %d: %s", self.seed, name)
            os.makedirs(wd, exist_ok=True)
            cfg = dataclasses.replace(cfg, seed=self.seed)
            metrics.write_json(os.path.join(wd, "config.json"), dataclasses.asdict(cfg))
            out = job(cfg, wd, **kw)
            if out.get("stopped_early"):
                raise Stopped(name)
        self._made.add(name)
        return _export(wd)

    def pretrain(self) -> str:
        if self.shared is not None:
            return self.shared.pretrain()
        if self.cfg.pretrain.total_steps == 0:
            return ""
        return self._train("pretrain", sft.run, self.cfg.pretrain)

    def base(self) -> str:
        if self.shared is not None:
            return self.shared.base()
        return self._train("base", sft.run, dataclasses.replace(self.cfg.sft, init_from=self.pretrain()))

    def _rl(self, name: str, cfg: settings.RLTrainConfig, init: str, **rl_changes) -> str:
        base = self.base()
        cfg = dataclasses.replace(cfg, init_from=init, rl=dataclasses.replace(cfg.rl, reference=base, **rl_changes))
        return self._train(name, rl.run, cfg)

    def stage1(self) -> str:
        return self._rl("stage1", self.cfg.stage1, self.base())

    def stage2(self, name: str, init: str, shaping: str | None = None) -> str:
        changes = {} if shaping is None else {"shaping": shaping}
        return self._rl(name, self.cfg.stage2, init, **changes)

    def star(self) -> str:
        params = self.base()
        for r in range(self.cfg.demo.star_rounds):
            params = self._self_sft(f"star_r{r}", params, "star")
        return params

    def pair_sft(self) -> str:
        return self._self_sft("pair_sft", self.base(), "pair")

    def _self_sft(self, name: str, init: str, kind: str) -> str:
        """Fine-tunes ``init`` on records built from its own samples (baselines.py)."""
        wd = self.path(name)
        if _done(wd):
            self._made.add(name)
            return _export(wd)
        cfg, d = self.cfg, self.cfg.demo
        ev = cfg.eval
        builder = inputs.dataset(cfg.sft.data)
        tok = inputs.tokenizer(cfg.sft.tokenizer, builder, cfg.sft.model)
        template = chat.get(cfg.sft.task.chat_template)
        ps = inputs.prompts(builder, cfg.sft.data.train_split, tok, cfg.sft.task, max_prompt_len=ev.eval.max_prompt_len,
                            too_long=cfg.sft.data.too_long, limit=d.star_prompts)
        mesh = sharding.make_mesh(ev.mesh)
        params = eval_job.load_policy(init, ev.model, mesh)
        dec = eval_job.Decoding(2, cfg.stage1.rl.temperature, 0, 1.0, d.star_samples, ev.eval.batch_size,
                                ev.eval.max_new_tokens, ev.eval.chunk_len)
        gen = eval_job.generate(ev.model, params, mesh, ps, tok, template, cfg.sft.task.correction, dec,
                                self.seed + 1000 + len(name))
        correct = eval_job.score(rewards.REWARDS[cfg.sft.task.reward].score_batch, gen, ps)
        source = builder.as_data_source(split=cfg.sft.data.train_split)
        records = (baselines.star_records(source, ps, gen, correct) if kind == "star"
                   else baselines.pair_records(source, ps, gen, correct, self.seed))
        log.info("demo seed %d: %s: %d training records from %d episodes", self.seed, name, len(records),
                 len(gen["problem"]))
        if not records:  # nothing to learn from: this round leaves the model as it was
            log.warning("demo seed %d: %s found no records; keeping %s.", self.seed, name, init)
            return init
        sft_cfg = dataclasses.replace(cfg.sft, init_from=init, total_steps=d.baseline_sft_steps,
                                      optim=dataclasses.replace(cfg.sft.optim, warmup_steps=0))
        return self._train(name, sft.run, sft_cfg, source=records, learn="last")

    # ---------------------------------------------------------------- rows

    def params_of(self, method: str) -> str:
        return {
            "base": self.base, "self_refine": self.base, "star": self.star, "pair_sft": self.pair_sft,
            "naive_rl": lambda: self.stage2("naive_rl", self.base(), shaping="none"),
            "no_stage1": lambda: self.stage2("no_stage1", self.base()),
            "no_shaping": lambda: self.stage2("no_shaping", self.stage1(), shaping="none"),
            "stage1_only": self.stage1,
            "score": lambda: self.stage2("score", self.stage1()),
        }[method]()

    def evaluate(self, method: str, sampled: bool = False) -> dict:
        """eval.json of ``method``: greedy (``cfg.eval``), or sampled (demo.sampled_*)."""
        params = self.params_of(method)
        wd = self.path(f"eval_{method}" + ("_sampled" if sampled else ""))
        if not _done(wd, "eval.json"):
            os.makedirs(wd, exist_ok=True)
            ev, d = self.cfg.eval, self.cfg.demo
            task = ev.task
            if method == "self_refine":
                task = dataclasses.replace(task, correction=d.self_refine_correction)
            how = dict(params=params)
            if sampled:
                how.update(temperature=d.sampled_temperature, samples_per_problem=d.sampled_samples)
            cfg = dataclasses.replace(ev, seed=self.seed, task=task, eval=dataclasses.replace(ev.eval, **how))
            metrics.write_json(os.path.join(wd, "config.json"), dataclasses.asdict(cfg))
            eval_job.run(cfg, wd)
        return metrics.read_json(os.path.join(wd, "eval.json"))


def aggregate(per_seed: list[dict]) -> dict:
    """One row from the eval.json of each seed: means, 95% intervals (over the eval problems for
    one seed; a t interval over seeds for several), and the per-seed values."""
    row: dict = {"ci": {}, "per_seed": {}}
    for key in KEYS:
        if key not in per_seed[0]:
            continue
        values = [s[key]["mean"] for s in per_seed]
        mean = float(np.mean(values))
        if len(values) == 1:
            lo, hi = per_seed[0][key]["ci_low"], per_seed[0][key]["ci_high"]
        else:
            half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
            lo, hi = mean - half, mean + half
        row[key], row["ci"][key], row["per_seed"][key] = mean, [float(lo), float(hi)], values
    row["edit_ratio"] = float(np.mean([s.get("edit_ratio", np.nan) for s in per_seed]))
    return row


def run(cfg: settings.DemoConfig, workdir: str) -> dict:
    t0 = time.perf_counter()
    methods = cfg.demo.methods()
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"demo.rows has unknown methods {unknown}; choose from {', '.join(METHODS)}.")
    d = cfg.demo
    if not -1 <= d.only_seed < d.seeds:
        raise ValueError(f"demo.only_seed={d.only_seed} but demo.seeds={d.seeds}: choose -1 or 0..{d.seeds - 1}.")
    per_seed: dict[str, list[dict]] = {m: [] for m in methods}
    sampled: dict[str, list[dict]] = {m: [] for m in methods}
    first = _Seed(cfg, os.path.join(workdir, "seed0"), cfg.seed)
    if d.shared_base and d.only_seed > 0 and not _done(first.path("base")):
        raise ValueError(
            f"demo.only_seed={d.only_seed} uses seed 0's base model (demo.shared_base), which is not finished at "
            f"{first.path('base')}: run the same command with --config.demo.only_seed=0 first (the other seeds can "
            "start once its base/ run is done), or set --config.demo.shared_base=False.")
    try:
        for s in ([d.only_seed] if d.only_seed >= 0 else range(d.seeds)):
            shared = first if d.shared_base and s > 0 else None
            runs = first if s == 0 else _Seed(cfg, os.path.join(workdir, f"seed{s}"), cfg.seed + s, shared)
            for m in methods:
                if shared is not None and m in UNTRAINED:
                    continue  # the same model as seed 0's row: evaluated once
                per_seed[m].append(runs.evaluate(m))
                if d.sampled_samples:
                    sampled[m].append(runs.evaluate(m, sampled=True))
                log.info("demo seed %d: %s done (%.0f s so far)", s, m, time.perf_counter() - t0)
    except Stopped as e:
        log.warning("Stopped during %s; run the same command again to resume.", e)
        return {"stopped_early": True}
    if d.only_seed >= 0:
        log.info("demo seed %d finished in %.0f s; with every seed finished, run the same command with "
                 "--config.demo.only_seed=-1 for the table.", d.only_seed, time.perf_counter() - t0)
        return {"seed": d.only_seed, "seconds": time.perf_counter() - t0}
    rows = {m: aggregate(per_seed[m]) for m in methods}
    for m in methods:
        if sampled[m]:
            rows[m]["sampled"] = aggregate(sampled[m])
    spans = [_wall_span(os.path.join(workdir, f"seed{s}")) for s in range(d.seeds)]
    spans = [span for span in spans if span] or [(0.0, time.perf_counter() - t0)]
    result = {"rows": rows, "seeds": cfg.demo.seeds, "seconds": time.perf_counter() - t0,
              "wall_seconds": max(e for _, e in spans) - min(b for b, _ in spans),
              "seed_wall_seconds": [e - b for b, e in spans],
              "eval": dataclasses.asdict(cfg.eval.eval),
              "command": " ".join(["python -m score_jax.main", *sys.argv[1:]]),
              "sampled_eval": {"temperature": cfg.demo.sampled_temperature,
                               "samples_per_problem": cfg.demo.sampled_samples}}
    metrics.write_json(os.path.join(workdir, "results.json"), result)
    _plots(workdir, rows, methods)
    print("Greedy (the paper's protocol):", flush=True)
    print(evaluate.table({LABELS[m]: {k: _as_ci(r, k) for k in KEYS if k in r} for m, r in rows.items()}), flush=True)
    if cfg.demo.sampled_samples:
        print(f"Sampled (temperature {cfg.demo.sampled_temperature}, {cfg.demo.sampled_samples} per problem):")
        print(evaluate.table({LABELS[m]: {k: _as_ci(r["sampled"], k) for k in KEYS if k in r["sampled"]}
                              for m, r in rows.items()}), flush=True)
    if cfg.demo.results_md:
        with open(cfg.demo.results_md, "w") as f:
            f.write(markdown(result, methods, per_seed))
    return result


def _wall_span(root: str) -> tuple[float, float] | None:
    """(first start, last end) of a seed's runs, from their files: the time the runs took even when
    they were resumed, ran in other processes (demo.only_seed) or were finished before this one.
    None for a seed with no runs of its own (only untrained rows on a shared base)."""
    starts, ends = [], []
    for name in (os.listdir(root) if os.path.isdir(root) else ()):
        for f, into in (("config.json", starts), ("summary.json", ends), ("eval.json", ends)):
            if os.path.exists(os.path.join(root, name, f)):
                into.append(os.path.getmtime(os.path.join(root, name, f)))
    return (min(starts), max(ends)) if starts and ends else None


def _as_ci(row: dict, key: str) -> dict:
    return {"mean": row[key], "ci_low": row["ci"][key][0], "ci_high": row["ci"][key][1]}


def _plots(workdir: str, rows: dict, methods) -> None:
    root = os.path.join(workdir, "seed0")
    stages = [(name, metrics.read_jsonl(os.path.join(root, name, metrics.METRICS_FILE)))
              for name in ("stage1", "score") if os.path.isdir(os.path.join(root, name))]
    if stages:
        plots.training_rewards(os.path.join(workdir, "training_rewards.png"), stages)
    plots.correction_bars(os.path.join(workdir, "corrections.png"),
                          {LABELS[m]: {k: _as_ci(rows[m], k) for k in ("delta_i_to_c", "delta_c_to_i")}
                           for m in methods if "delta" in rows[m]})


def _md_table(rows: dict, methods) -> list[str]:
    pct = lambda r, k: f"{100 * r[k]:.1f} [{100 * r['ci'][k][0]:.1f}, {100 * r['ci'][k][1]:.1f}]"  # noqa: E731
    lines = ["| method | Acc@t1 | Acc@t2 | Delta(t1,t2) | Delta i->c | Delta c->i | edit ratio |",
             "|---|---|---|---|---|---|---|"]
    for m in methods:
        r = rows[m]
        lines.append(f"| {LABELS[m]} | " + " | ".join(pct(r, k) for k in KEYS) + f" | {r['edit_ratio']:.2f} |")
    return lines


def _md_checks(rows: dict, methods) -> list[str]:
    """The three outcomes the toy table must show, computed from the numbers."""
    if "score" not in rows:
        return []
    s, out = rows["score"], []
    out.append(f"- SCoRe's Delta above 0 with its interval above 0: **{s['ci']['delta'][0] > 0}** "
               f"(Delta {100 * s['delta']:.1f}, interval {100 * s['ci']['delta'][0]:.1f} to "
               f"{100 * s['ci']['delta'][1]:.1f})")
    others = [m for m in methods if m != "score"]
    if others:
        beaten = [m for m in others if s["delta"] > rows[m]["delta"]]
        out.append(f"- SCoRe's Delta above every other row's: **{len(beaten) == len(others)}** "
                   f"(above: {', '.join(LABELS[m] for m in beaten) or 'none'})")
    if "base" in rows:
        out.append(f"- SCoRe's Delta c->i below the base model's: **{s['delta_c_to_i'] < rows['base']['delta_c_to_i']}** "
                   f"({100 * s['delta_c_to_i']:.1f} vs {100 * rows['base']['delta_c_to_i']:.1f})")
    return out


def markdown(result: dict, methods, per_seed: dict) -> str:
    """The results as a Markdown report: both tables, Delta per seed, the checks, command, time."""
    rows, ev, se = result["rows"], result["eval"], result["sampled_eval"]
    interval = "t interval over seeds" if result["seeds"] > 1 else "over problems"
    if result["seeds"] > 1 and any(len(per_seed[m]) == 1 for m in methods):
        interval += ("; rows evaluated once, the base model shared by every seed "
                     "(`demo.shared_base`), over problems")
    out = ["# SCoRe at toy scale: the paper's table on CPU", "",
           f"Made by `{result['command']}` on this repository's 2-core CI machine ({result['seeds']} seed(s); "
           "`results.json` in its workdir holds every number). The runs took "
           f"{result['wall_seconds'] / 60:.0f} minutes of wall clock, from the first run's start to the last "
           "one's end (per seed: " + ", ".join(f"{t / 60:.0f}" for t in result["seed_wall_seconds"]) + " minutes"
           "; seeds can run side by side as separate processes with `--config.demo.only_seed=i`, then the "
           "same command without it writes this report).", "",
           f"Evaluation: the first {ev['num_problems']} problems of the held-out toy test split, two attempts. "
           f"Percent of all problem samples; brackets: 95% intervals ({interval}).", "",
           "## Greedy decoding (the paper's protocol)", "", *_md_table(rows, methods), "",
           "Checks (computed from the numbers above, not tuned):", "", *_md_checks(rows, methods), ""]
    if all("sampled" in rows[m] for m in methods) and se["samples_per_problem"]:
        sampled = {m: rows[m]["sampled"] for m in methods}
        out += [f"## Sampled as in training (temperature {se['temperature']}, {se['samples_per_problem']} "
                "episodes per problem)", "", *_md_table(sampled, methods), "",
                "Checks:", "", *_md_checks(sampled, methods), ""]
    out += ["## Delta per seed (greedy, percent)", "",
            "| method | " + " | ".join(f"seed {i}" for i in range(result["seeds"])) + " |",
            "|---|" + "---|" * result["seeds"]]
    for m in methods:
        values = rows[m]["per_seed"]["delta"]
        cells = [f"{100 * v:.1f}" for v in values] + ["(seed 0's)"] * (result["seeds"] - len(values))
        out.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
