"""The ``demo`` job: the whole SCoRe pipeline on the CPU toy task, ending with the paper's table.

    python -m score_jax.main --config=configs/demo.py --workdir=runs/demo

Per seed, under ``<workdir>/seed<i>/``, each step a normal run directory of its own job:
    pretrain/     single-turn SFT on correct solutions (the model learns the arithmetic)
    base/         two-turn SFT on the base model's attempts: the SCoRe base model
    stage1/       SCoRe Stage I from base (reference: base)
    score/        SCoRe Stage II from stage1                          -> row "score"
    and, for the rows that need them: no_shaping/ (Stage II from stage1, shaping off),
    no_stage1/ (Stage II from base), naive_rl/ (Stage II from base, shaping off; both from base
    for stage1's plus stage2's steps, SCoRe's whole budget),
    star_r<k>/ (STaR rounds), pair_sft/ (Pair-SFT)
    eval_<row>/   the eval job on the test split for each row (eval.json, episodes.jsonl)
Rows: METHODS below, in table order.

Randomness: every run has its own index, ``run_index("seed<i>/<name>")``, folded into its root
key with the demo's seed (score_jax/jobs/keys.py), so no two runs share a key or a data order.

With ``demo.shared_base`` (the table's default) seeds 1.. use seed 0's pretrain/ and base/ (one
base model, as in the paper) and the untrained rows (base, self_refine) are evaluated once. With
``demo.only_seed=i`` a process runs only seed i's runs and stops: seeds run side by side (on the
2-core CPU, three processes together sampled 1.8x and fine-tuned 1.4x as many tokens per second
as one: the toy model's steps are overhead-bound), and the same command without it then writes
the table from the finished runs.

A finished step (its summary.json or eval.json exists) is not run again, so rerunning the same
command resumes the demo, each unfinished run from its own last checkpoint. At the end:
``<workdir>/results.json``, ``training_rewards.png``, ``corrections.png``, the printed table,
and with ``demo.results_md`` a Markdown report (score_jax/jobs/demo_report.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zlib

from score_jax import baselines, checkpoints, metrics, settings
from score_jax.jobs import demo_report, harness, inputs, keys, rl, sft
from score_jax.jobs import eval as eval_job

log = logging.getLogger(__name__)

METHODS = ("base", "self_refine", "star", "pair_sft", "naive_rl", "no_stage1", "no_shaping", "stage1_only", "score")
UNTRAINED = ("base", "self_refine")  # rows that are the base model itself (shared with demo.shared_base)


class Stopped(checkpoints.Stopped):
    """A sub-run stopped early (SIGTERM, SIGINT): the demo stops too; rerun to resume."""


def methods(d: settings.DemoSettings) -> tuple[str, ...]:
    """The rows ``demo.rows`` asks for ("all" = METHODS), checked."""
    rows = METHODS if d.rows.strip() == "all" else d.methods()
    unknown = sorted(set(rows) - set(METHODS))
    if unknown or not rows:
        raise ValueError(f"demo.rows={d.rows!r}: unknown methods {unknown}; choose from all, {', '.join(METHODS)}.")
    return rows


def run_index(path: str) -> int:
    """The run index (config.run) of the demo's run at ``path`` ("seed<i>/<name>")."""
    return zlib.crc32(path.encode()) & 0x7FFFFFFF


def _export(workdir: str) -> str:
    return os.path.join(workdir, "export")


def _done(workdir: str, name: str = "summary.json") -> bool:
    return os.path.exists(os.path.join(workdir, name))


# Settings that do not change what a finished run made (where files live, how it was started),
# and the paths the demo sets per run (init_from, rl.reference, eval.params): they follow the
# workdir's layout, so a workdir that was moved or copied is reused, not refused.
_REUSE_IGNORES = ("compilation_cache_dir", "distributed", "cpu_devices", "init_from")
_REUSE_IGNORES_NESTED = (("rl", "reference"), ("eval", "params"))


def _check_finished(workdir: str, cfg) -> None:
    """A finished run is reused only if its config.json is this run's config: an override of
    a finished run's settings is refused in one line instead of being ignored."""
    file = os.path.join(workdir, "config.json")
    if not os.path.exists(file):
        return
    theirs, mine = metrics.read_json(file), json.loads(json.dumps(dataclasses.asdict(cfg)))
    for key in _REUSE_IGNORES:
        theirs.pop(key, None)
        mine.pop(key, None)
    for section, key in _REUSE_IGNORES_NESTED:
        for c in (theirs, mine):
            if isinstance(c.get(section), dict):
                c[section].pop(key, None)
    difference = harness.identity_difference(theirs, mine)
    if difference:
        raise harness.WorkdirError(f"{workdir} is a finished run made with other settings ({difference}); use a "
                                   "new --workdir, or remove that run's directory to rerun it with these.")


class _Seed:
    """The runs of one seed, each made on first use (and skipped when already finished).

    With ``execute=False`` nothing runs: every run's resolved config is appended to
    ``self.planned`` as (path, config) (``plan``)."""

    def __init__(self, cfg: settings.DemoConfig, workdir: str, index: int, shared: "_Seed | None" = None,
                 execute: bool = True):
        self.cfg, self.workdir, self.index = cfg, workdir, index
        self.shared = shared  # demo.shared_base: the seed whose pretrain/ and base/ this one uses
        self.execute = execute
        self.planned: list[tuple[str, object]] = []
        self._made: set[str] = set()

    def rel(self, name: str) -> str:
        return f"seed{self.index}/{name}"

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, self.rel(name))

    def own(self, cfg, name: str):
        """``cfg`` as the run ``name`` of this seed: the demo's seed, the run's own index."""
        return dataclasses.replace(cfg, seed=self.cfg.seed, run=run_index(self.rel(name)))

    # ---------------------------------------------------------------- training runs

    def _train(self, name: str, job, cfg, **kw) -> str:
        wd = self.path(name)
        cfg = self.own(cfg, name)
        if name not in self._made:
            self.planned.append((self.rel(name), cfg))
            if self.execute and _done(wd):
                _check_finished(wd, cfg)
            elif self.execute:
                log.info("demo seed %d: %s", self.index, name)
                harness.start(cfg, wd, dataclasses.asdict(cfg))
                if job(cfg, wd, **kw).get("stopped_early"):
                    raise Stopped(name)
        self._made.add(name)
        return _export(wd)

    def pretrain(self) -> str:
        if self.shared is not None:
            return self.shared.pretrain()
        return self._train("pretrain", sft.run, dataclasses.replace(self.cfg.pretrain, init_from=""))  # random init

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
        cfg = self.cfg.stage2
        if init == self.base():
            # A Stage II run from the base model (naive_rl, no_stage1) gets SCoRe's whole RL
            # budget, Stage I's steps and Stage II's, so no row wins by training longer.
            cfg = dataclasses.replace(cfg, total_steps=self.cfg.stage1.total_steps + cfg.total_steps)
        return self._rl(name, cfg, init, **changes)

    def star(self) -> str:
        params = self.base()
        for r in range(self.cfg.demo.star_rounds):
            params = self._self_sft(f"star_r{r}", params, "star")
        return params

    def pair_sft(self) -> str:
        return self._self_sft("pair_sft", self.base(), "pair")

    def _self_sft(self, name: str, init: str, kind: str) -> str:
        """Fine-tunes ``init`` on records built from its own samples (baselines.py)."""
        cfg, d, ev = self.cfg, self.cfg.demo, self.cfg.eval
        sft_cfg = dataclasses.replace(cfg.sft, init_from=init, total_steps=d.baseline_sft_steps,
                                      optim=dataclasses.replace(cfg.sft.optim, warmup_steps=0,
                                                                learning_rate=d.baseline_learning_rate
                                                                or cfg.sft.optim.learning_rate),
                                      data=dataclasses.replace(cfg.sft.data, seq_len=d.baseline_seq_len))
        if not self.execute or _done(self.path(name)):
            return self._train(name, sft.run, sft_cfg)
        builder = inputs.dataset(cfg.sft.data)
        tok = inputs.tokenizer(cfg.sft.tokenizer, builder, cfg.sft.model)
        ps = inputs.prompts(builder, cfg.sft.data.train_split, tok, cfg.sft.task,
                            max_prompt_len=ev.eval.sampling.max_prompt_len, too_long=cfg.sft.data.too_long,
                            limit=d.star_prompts)
        mesh = harness.make_mesh(ev.mesh, ev.eval.batch_size, "eval.batch_size")
        params = eval_job.load_policy(init, ev.model, mesh)
        sampling = dataclasses.replace(ev.eval.sampling, temperature=cfg.stage1.rl.sampling.temperature, top_k=0,
                                       top_p=1.0, samples_per_prompt=d.star_samples)
        root = harness.root_key(self.own(sft_cfg, name))
        gen = eval_job.generate(ev.model, params, mesh, ps, tok, cfg.sft.task, sampling, 2, ev.eval.batch_size,
                                keys.key(root, "self_samples"))
        correct = eval_job.score(inputs.reward(cfg.sft.task.reward), gen, ps)
        source = builder.as_data_source(split=cfg.sft.data.train_split)
        records = (baselines.star_records(source, ps, gen, correct) if kind == "star"
                   else baselines.pair_records(source, ps, gen, correct, keys.seed(root, "self_samples")))
        log.info("demo seed %d: %s: %d training records from %d episodes", self.index, name, len(records),
                 len(gen["problem"]))
        if not records:  # nothing to learn from: this round leaves the model as it was
            log.warning("demo seed %d: %s found no records; keeping %s.", self.index, name, init)
            return init
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

    def evaluate(self, method: str, sampled: bool = False) -> dict | None:
        """eval.json of ``method``: greedy (``cfg.eval``), or sampled (demo.sampled_*)."""
        params = self.params_of(method)
        name = f"eval_{method}" + ("_sampled" if sampled else "")
        wd = self.path(name)
        ev, d = self.cfg.eval, self.cfg.demo
        task = ev.task
        if method == "self_refine":
            task = dataclasses.replace(task, correction=d.self_refine_correction)
        how = dict(params=params)
        if sampled:
            how["sampling"] = dataclasses.replace(ev.eval.sampling, temperature=d.sampled_temperature,
                                                  samples_per_prompt=d.sampled_samples)
        cfg = self.own(dataclasses.replace(ev, task=task, eval=dataclasses.replace(ev.eval, **how)), name)
        self.planned.append((self.rel(name), cfg))
        if not self.execute:
            return None
        if not _done(wd, "eval.json"):
            harness.start(cfg, wd, dataclasses.asdict(cfg))
            eval_job.run(cfg, wd)
        else:
            _check_finished(wd, cfg)
        return metrics.read_json(os.path.join(wd, "eval.json"))


def _seeds(cfg: settings.DemoConfig, workdir: str, execute: bool):
    """(seed index, its _Seed, whether it shares seed 0's base) of every seed this process runs."""
    d = cfg.demo
    first = _Seed(cfg, workdir, 0, execute=execute)
    for s in ([d.only_seed] if d.only_seed >= 0 else range(d.seeds)):
        shared = first if d.shared_base and s > 0 else None
        yield s, (first if s == 0 else _Seed(cfg, workdir, s, shared, execute=execute)), shared is not None


def plan(cfg: settings.DemoConfig, workdir: str) -> list[tuple[str, object]]:
    """(path, resolved config) of every run the demo would make, in order, running nothing."""
    out = []
    for _, runs, shared in _seeds(cfg, workdir, execute=False):
        for m in methods(cfg.demo):
            if shared and m in UNTRAINED:
                continue
            runs.evaluate(m)
            if cfg.demo.sampled_samples:
                runs.evaluate(m, sampled=True)
        out += [p for p in runs.planned if p not in out]
    return out


def run(cfg: settings.DemoConfig, workdir: str) -> dict:
    t0 = time.perf_counter()
    d = cfg.demo
    rows = methods(d)
    if not -1 <= d.only_seed < d.seeds:
        raise ValueError(f"demo.only_seed={d.only_seed} but demo.seeds={d.seeds}: choose -1 or 0..{d.seeds - 1}.")
    base0 = os.path.join(workdir, "seed0", "base")
    if d.shared_base and d.only_seed > 0 and not _done(base0):
        raise ValueError(
            f"demo.only_seed={d.only_seed} uses seed 0's base model (demo.shared_base), which is not finished at "
            f"{base0}: run the same command with --config.demo.only_seed=0 first (the other seeds can "
            "start once its base/ run is done), or set --config.demo.shared_base=False.")
    greedy: dict[str, list[dict]] = {m: [] for m in rows}
    sampled: dict[str, list[dict]] = {m: [] for m in rows}
    try:
        for s, runs, shared in _seeds(cfg, workdir, execute=True):
            for m in rows:
                if shared and m in UNTRAINED:
                    continue  # the same model as seed 0's row: evaluated once
                greedy[m].append(runs.evaluate(m))
                if d.sampled_samples:
                    sampled[m].append(runs.evaluate(m, sampled=True))
                log.info("demo seed %d: %s done (%.0f s so far)", s, m, time.perf_counter() - t0)
    except checkpoints.Stopped as e:  # a training run's or an evaluation's
        log.warning("Stopped during %s; run the same command again to resume.", e)
        return {"stopped_early": True}
    if d.only_seed >= 0:
        log.info("demo seed %d finished in %.0f s; with every seed finished, run the same command with "
                 "--config.demo.only_seed=-1 for the table.", d.only_seed, time.perf_counter() - t0)
        return {"seed": d.only_seed, "seconds": time.perf_counter() - t0}
    return demo_report.write(cfg, workdir, rows, greedy, sampled, time.perf_counter() - t0)
