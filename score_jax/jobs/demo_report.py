"""The demo's report: rows aggregated over seeds, results.json, the printed tables, the plots
and the Markdown report (RESULTS.md for the table)."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
from scipy import stats

from score_jax import evaluate, metrics, plots, settings

LABELS = {"base": "Base model", "self_refine": "Self-Refine (prompting)", "star": "STaR", "pair_sft": "Pair-SFT",
          "naive_rl": "Naive multi-turn RL", "no_stage1": "SCoRe w/o Stage I", "no_shaping": "SCoRe w/o shaping",
          "stage1_only": "Stage I only", "score": "SCoRe"}
KEYS = ("acc_t1", "acc_t2", "delta", "delta_i_to_c", "delta_c_to_i")


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
    if all("revise" in s for s in per_seed):  # means over seeds of the conditional rates
        row["revise"] = {k: float(np.mean([s["revise"][k] for s in per_seed])) for k in per_seed[0]["revise"]}
    return row


def write(cfg: settings.DemoConfig, workdir: str, methods, per_seed: dict, sampled: dict, seconds: float) -> dict:
    """results.json, the plots, the printed tables and (demo.results_md) the Markdown report from
    each row's eval.json per seed (``per_seed`` greedy, ``sampled`` the sampled evaluations)."""
    rows = {m: aggregate(per_seed[m]) for m in methods}
    for m in methods:
        if sampled[m]:
            rows[m]["sampled"] = aggregate(sampled[m])
    spans = [_wall_span(os.path.join(workdir, f"seed{s}")) for s in range(cfg.demo.seeds)]
    spans = [span for span in spans if span] or [(0.0, seconds)]
    result = {"rows": rows, "seeds": cfg.demo.seeds, "seconds": seconds,
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
        plots.training_revise_rates(os.path.join(workdir, "revise_rates.png"), stages)
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


REVISE_LABELS = {"revise_if_wrong": "P(y2 != y1 | y1 wrong)", "revise_if_right": "P(y2 != y1 | y1 right)",
                 "fix_if_revised": "P(y2 right | y1 wrong, revised)",
                 "break_if_revised": "P(y2 wrong | y1 right, revised)"}


def _md_revise(rows: dict, methods) -> list[str]:
    """The conditional revise rates of each row (means over seeds, percent)."""
    shown = [m for m in methods if "revise" in rows[m]]
    if not shown:
        return []
    header = (label.replace("|", "\\|") for label in REVISE_LABELS.values())  # a bare | splits a cell
    lines = ["| method | " + " | ".join(header) + " |", "|---|" + "---|" * len(REVISE_LABELS)]
    for m in shown:
        lines.append(f"| {LABELS[m]} | " + " | ".join(f"{100 * rows[m]['revise'][k]:.1f}" for k in REVISE_LABELS)
                     + " |")
    return lines


def _md_checks(rows: dict, methods) -> list[str]:
    """The outcomes the toy demo and table must show (issue 13), computed from the numbers."""
    if "score" not in rows:
        return []
    s, out = rows["score"], []
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    out.append(f"- SCoRe's Delta above 0 with its interval above 0: **{s['ci']['delta'][0] > 0}** "
               f"(Delta {pct(s['delta'])}, interval {pct(s['ci']['delta'][0])} to {pct(s['ci']['delta'][1])})")
    if "base" in rows:
        b = rows["base"]
        out.append(f"- SCoRe's Delta above the base model's: **{s['delta'] > b['delta']}** "
                   f"({pct(s['delta'])} vs {pct(b['delta'])})")
        out.append(f"- SCoRe's Delta c->i below the base model's: **{s['delta_c_to_i'] < b['delta_c_to_i']}** "
                   f"({pct(s['delta_c_to_i'])} vs {pct(b['delta_c_to_i'])})")
        out.append(f"- SCoRe's Acc@t2 above the base model's Acc@t1: **{s['acc_t2'] > b['acc_t1']}** "
                   f"({pct(s['acc_t2'])} vs {pct(b['acc_t1'])})")
    others = [m for m in methods if m != "score"]
    if others:
        best = max(others, key=lambda m: rows[m]["acc_t2"])
        out.append(f"- SCoRe's Acc@t2 the highest of all rows: **{s['acc_t2'] > rows[best]['acc_t2']}** "
                   f"({pct(s['acc_t2'])}; the highest other: {LABELS[best]}, {pct(rows[best]['acc_t2'])})")
    for m in ("naive_rl", "stage1_only", "no_stage1", "no_shaping"):
        if m in rows:
            out.append(f"- SCoRe's Delta above {LABELS[m]}'s: **{s['delta'] > rows[m]['delta']}** "
                       f"({pct(s['delta'])} vs {pct(rows[m]['delta'])})")
    if "naive_rl" in rows and "base" in rows:
        n, b = rows["naive_rl"], rows["base"]
        out.append(f"- Naive multi-turn RL, the paper's collapse (Acc@t1 up, Delta near 0): Acc@t1 "
                   f"{pct(n['acc_t1'])} (base {pct(b['acc_t1'])}), Delta {pct(n['delta'])} "
                   f"[{pct(n['ci']['delta'][0])}, {pct(n['ci']['delta'][1])}]")
    return out


def markdown(result: dict, methods, per_seed: dict) -> str:
    """The results as a Markdown report: both tables, Delta per seed, the checks, command, time."""
    rows, ev, se = result["rows"], result["eval"], result["sampled_eval"]
    interval = "t interval over seeds" if result["seeds"] > 1 else "over problems"
    if result["seeds"] > 1 and any(len(per_seed[m]) == 1 for m in methods):
        interval += ("; rows evaluated once, the base model shared by every seed "
                     "(`demo.shared_base`), over problems")
    title = "the paper's table on CPU" if len(methods) > 2 else "the CPU demo"
    out = [f"# SCoRe at toy scale: {title}", "",
           f"Made by `{result['command']}` on this repository's 2-core CI machine ({result['seeds']} seed(s); "
           "`results.json` in its workdir holds every number). The runs took "
           f"{result['wall_seconds'] / 60:.0f} minutes of wall clock, from the first run's start to the last "
           "one's end (per seed: " + ", ".join(f"{t / 60:.0f}" for t in result["seed_wall_seconds"]) + " minutes"
           "; seeds can run side by side as separate processes with `--config.demo.only_seed=i`, then the "
           "same command without it writes this report).", "",
           f"Evaluation: the first {ev['num_problems']} problems of the held-out toy test split, two attempts. "
           f"Percent of all problem samples; brackets: 95% intervals ({interval}).", "",
           "## Greedy decoding (the paper's protocol)", "", *_md_table(rows, methods), "",
           "Checks (computed from the numbers above, not tuned):", "", *_md_checks(rows, methods), "",
           "What RL has to move: how often each row revises a wrong and a right first attempt, and what "
           "its revisions do (greedy, percent; means over seeds):", "", *_md_revise(rows, methods), ""]
    if all("sampled" in rows[m] for m in methods) and se["samples_per_problem"]:
        sampled = {m: rows[m]["sampled"] for m in methods}
        out += [f"## Sampled as in training (temperature {se['temperature']}, {se['samples_per_problem']} "
                "episodes per problem)", "", *_md_table(sampled, methods), "",
                "Checks:", "", *_md_checks(sampled, methods), "", "Revise rates (sampled):", "",
                *_md_revise(sampled, methods), ""]
    out += ["## Delta per seed (greedy, percent)", "",
            "| method | " + " | ".join(f"seed {i}" for i in range(result["seeds"])) + " |",
            "|---|" + "---|" * result["seeds"]]
    for m in methods:
        values = rows[m]["per_seed"]["delta"]
        cells = [f"{100 * v:.1f}" for v in values] + ["(seed 0's)"] * (result["seeds"] - len(values))
        out.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"
