"""PNG plots of a demo run (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot
from matplotlib import pyplot as plt  # noqa: E402


def training_rewards(path: str, stages: list[tuple[str, list[dict]]]) -> None:
    """Reward at t1 and t2 (per logged step, from metrics.jsonl rows) over consecutive stages."""
    _over_stages(path, stages, (("reward1", "reward at t1"), ("reward2", "reward at t2")),
                 "training-batch reward", "SCoRe on the toy task: rewards during training")


def training_revise_rates(path: str, stages: list[tuple[str, list[dict]]]) -> None:
    """P(y2 != y1 | y1 wrong) and P(y2 != y1 | y1 right) (metrics.jsonl rows) over consecutive stages."""
    _over_stages(path, stages, (("revise_if_wrong", "revises a wrong y1"), ("revise_if_right", "revises a right y1")),
                 "fraction of training episodes", "When does the policy revise? (training batches)")


def _over_stages(path: str, stages: list[tuple[str, list[dict]]], series, ylabel: str, title: str) -> None:
    """Two metrics.jsonl series (key, label) per stage, the stages one after another on the x axis."""
    fig, ax = plt.subplots(figsize=(7, 4))
    offset = 0
    for name, rows in stages:
        rows = [r for r in rows if all(key in r for key, _ in series)]
        if not rows:
            continue
        steps = [offset + r["step"] for r in rows]
        for (key, label), color, style in zip(series, ("tab:blue", "tab:orange"), ("-", "--")):
            ax.plot(steps, [r[key] for r in rows], color=color, linestyle=style, label=f"{name}: {label}")
        offset = steps[-1]
        ax.axvline(offset, color="grey", linewidth=0.5)
    ax.set_xlabel("training step (Stage I, then Stage II)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def correction_bars(path: str, rows: dict[str, dict]) -> None:
    """Delta_i->c and Delta_c->i per method (fractions, with 95% intervals)."""
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names)), 4.5))
    width = 0.38
    for i, (key, label, color) in enumerate((("delta_i_to_c", "i->c (fixed)", "tab:green"),
                                             ("delta_c_to_i", "c->i (broken)", "tab:red"))):
        means = [100 * rows[n][key]["mean"] for n in names]
        errs = [100 * (rows[n][key]["ci_high"] - rows[n][key]["ci_low"]) / 2 for n in names]
        xs = [j + (i - 0.5) * width for j in range(len(names))]
        ax.bar(xs, means, width, yerr=errs, label=label, color=color, capsize=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("% of problem samples")
    ax.legend()
    ax.set_title("Self-correction: problems fixed and broken\nbetween attempt 1 and attempt 2")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def inference_scaling(path: str, study: dict) -> None:
    """Majority-vote accuracy against the sample budget: parallel vs. parallel + one correction."""
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(study["budgets"], study["parallel"], marker="o", label="parallel samples")
    ax.plot(study["budgets"], study["sequential"], marker="s", label="K samples + one self-correction")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("samples per problem")
    ax.set_ylabel("majority-vote accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
