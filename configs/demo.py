"""The CPU demonstration: base SFT, base evaluation, Stage I, Stage II, evaluation, the table.

    python -m score_jax.main --config=configs/demo.py --workdir=runs/demo          # base vs SCoRe
    python -m score_jax.main --config=configs/demo.py:table --workdir=runs/table   # every row, 3 seeds

Every sub-job's own settings are here (``--config.stage1.rl.beta2=...``,
``--config.sft.total_steps=...``). What the demo sets for all of them is set once at the top
level (``--config.model.d_model=...``, ``--config.data.num_train=...``, ``--config.task...``,
``--config.seed``) and is not a key of the sub-jobs, so ``--config.stage1.model.d_model=64``
fails like any unknown key instead of being ignored; so do the keys the demo sets per run
(``init_from``, ``rl.reference``, ``eval.params``). The two SFT phases keep their own
``data.seq_len`` and ``data.sft_fields``. Arguments: "" (the demo), "table" (the paper's table
at toy scale, writes RESULTS.md) and "tiny" (CI: seconds per step).
"""

import ml_collections

from configs import common
from configs import eval as eval_config
from configs import sft as sft_config
from configs import stage1 as stage1_config
from configs import stage2 as stage2_config
from score_jax import prompts

# Set by the demo for every sub-job (from the top level, or per run): not keys of the sub-jobs.
_SET_BY_DEMO = ("job", "seed", "run", "model_preset", "model", "mesh", "task", "distributed",
                "cpu_devices", "compilation_cache_dir")


def _sub(job_config, data_keys: tuple[str, ...] = ()):
    """A sub-job's own settings: ``job_config`` without what the demo sets itself."""
    c = ml_collections.ConfigDict(job_config.to_dict())  # an unlocked copy
    for key in _SET_BY_DEMO:
        del c[key]
    data = {k: c.data[k] for k in data_keys}
    del c.data
    if data:
        c.data = ml_collections.ConfigDict(data)
    if "init_from" in c:
        del c.init_from
    if "rl" in c:
        del c.rl.reference
    if "eval" in c:
        del c.eval.params
    return c


def get_config(arg: str = ""):
    preset = "tiny" if arg == "tiny" else "toy"
    c = ml_collections.ConfigDict()
    c.job = "demo"
    c.seed = 0
    c.model_preset = preset
    c.distributed = False
    base = common.base(preset)
    # Two CPU devices (data parallel over the host's cores): the toy RL step runs at 51.5
    # episodes/s against 41.5 on one device, its sampling 1.9x faster (docs/research/
    # issue13_lablog.md E16). Batch sizes below divide by 2.
    c.cpu_devices = 2
    c.compilation_cache_dir = base.compilation_cache_dir
    c.model, c.mesh, c.data, c.task = base.model, base.mesh, base.data, base.task
    del c.data.seq_len, c.data.sft_fields  # each SFT phase has its own

    # Pre-training: single-turn SFT on correct solutions (the model learns the arithmetic).
    # toy_arithmetic 2.0.0: a single-turn example is at most 62 tokens, a two-turn one 146.
    sft_data = ("seq_len", "sft_fields")
    c.pretrain = _sub(sft_config.get_config(preset), sft_data)
    c.pretrain.data.sft_fields = "response"
    c.pretrain.data.seq_len = 64
    c.pretrain.total_steps = 500
    # 500 x 64 (dev split, docs/research/issue13_lablog.md E2): 97.8% greedy single-turn;
    # 500 x 32 gave 91.4% (E7).
    c.pretrain.batch_size = 64
    c.pretrain.optim.learning_rate = 3e-3
    c.pretrain.log_every = 50
    # The base model: two-turn SFT on the base's attempts (data/toy.py `attempts`: attempt 1
    # forgets a carry / borrow of 1; attempt 2 copies or revises, independently of whether
    # attempt 1 was right). Dev split, greedy (E3): Acc@t1 58.7, Delta -14.0, fix rate 0.92.
    c.sft = _sub(sft_config.get_config(preset), sft_data)
    c.sft.data.sft_fields = "attempt1,attempt2"
    c.sft.data.seq_len = 152
    c.sft.total_steps = 150
    c.sft.optim.learning_rate = 1e-3
    c.sft.optim.warmup_steps = 10
    c.sft.log_every = 25
    c.stage1 = _sub(stage1_config.get_config(preset))
    c.stage2 = _sub(stage2_config.get_config(preset))
    # Chosen on the dev split (docs/research/issue13_lablog.md), never on test:
    # 32 prompts x k=4 = 128 episodes per step: the Stage I gradient noise scale at the 2.0.0
    # base is ~230 episodes (E4), so a step is ~36% signal (16 prompts: ~22%).
    # 40 + 40 steps at lr 1e-4 (the stage configs' default), beta2 0.1, alpha 10: SCoRe 71.2 /
    # 93.8 / Delta +22.6 on dev (E8). Stage II at lr 2e-4 broke more (Acc@t2 89.6), a 20 + 60
    # split traded Acc@t2 for Acc@t1 (83.0 / 93.0) (E10).
    for job in (c.stage1, c.stage2):
        job.total_steps = 40
        job.batch_size = 32
        job.log_every = 10
    c.eval = _sub(eval_config.get_config(preset))
    # Two evaluations of every row: greedy (the paper's protocol; the main table) and sampled
    # as in training (temperature 1, demo.sampled_samples episodes per problem), where the toy
    # base model's slips show.
    c.eval.eval.num_problems = 500
    c.eval.eval.batch_size = 250

    c.demo = ml_collections.ConfigDict(dict(
        rows="base,score",  # methods of score_jax/jobs/demo.py METHODS, or "all" (every row, in table order)
        seeds=1,
        # Self-Refine-style prompting: the base model, untrained, asked to review and fix.
        self_refine_correction=prompts.TOY_SELF_REFINE,
        star_rounds=2,  # STaR: sample, keep successful corrections, fine-tune; repeated
        star_prompts=2000,  # training prompts sampled per STaR round / for Pair-SFT
        star_samples=4,
        baseline_sft_steps=100,  # fine-tuning steps per STaR round and for Pair-SFT
        # Their peak learning rate (0 = the base SFT's, sft.optim's). Dev split (lab log E14,
        # E15): no rate or step count tried (1e-3..1e-4, 10..100 steps) keeps their Acc@t1
        # within a few points of the base's (even 10 steps at 1e-4 add 16-19 points), so the
        # rule is the highest dev Acc@t2, near-ties to the smaller Acc@t1 change: 1e-4 and 100
        # steps for both (STaR 83.2 / 92.2, Pair-SFT 81.4 / 87.2; the base 57.6 / 41.2).
        baseline_learning_rate=1e-4,
        # Tokens per STaR / Pair-SFT record: a whole episode the model sampled, so up to the
        # prompt (16), two attempts of up to 56 tokens and the instruction (~33) with markers;
        # the base SFT's 152 fit only the data's attempts (a 154-token Pair-SFT record was seen).
        baseline_seq_len=176,
        results_md="",
        sampled_temperature=1.0,
        sampled_samples=2,  # 0 = greedy evaluation only
        # Seeds 1.. start from seed 0's pretrain/ and base/ (one base model, as in the paper): a
        # seed then varies each method's own training and its evaluation sampling, and the base
        # and Self-Refine rows (nothing trained) are evaluated once, with intervals over problems.
        shared_base=False,
        # Run only this seed's runs and stop (no table): seeds in parallel processes or hosts,
        # then the same command with only_seed=-1 finds them finished and writes the table.
        only_seed=-1,
    ))
    if arg == "table":
        c.demo.rows = "all"
        c.demo.seeds = 3
        c.demo.shared_base = True
        c.demo.results_md = "RESULTS.md"
        c.eval.eval.num_problems = 1000  # the demo's runs, each with 3 seeds and a larger evaluation
    elif arg == "tiny":
        c.data.num_train, c.data.num_test = 2000, 200
        for job in (c.pretrain, c.sft):
            job.total_steps, job.log_every, job.batch_size = 4, 2, 8
        c.sft.data.seq_len = 192
        for job in (c.stage1, c.stage2):
            job.total_steps, job.log_every, job.batch_size = 3, 1, 4
            job.checkpoint.every_steps = 2
        c.eval.eval.num_problems, c.eval.eval.batch_size, c.demo.sampled_samples = 16, 8, 2
        c.demo.rows = "all"
        c.demo.star_rounds, c.demo.star_prompts, c.demo.star_samples, c.demo.baseline_sft_steps = 1, 16, 2, 2
    elif arg:
        raise ValueError(f"configs/demo.py takes '', 'table' or 'tiny', not {arg!r}.")
    c.lock()
    return c
