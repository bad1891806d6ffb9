"""Every default of every job lives here; job configs (sft.py, stage1.py ...) start from these.

Configs are Python files with ``get_config(arg)``; pick one with
``--config=configs/sft.py:tiny`` and override any field with ``--config.key=value``.
Configs are locked, so a misspelt override fails before any work is done.
"""

import os

import ml_collections

from configs import models


def mesh() -> ml_collections.ConfigDict:
    # Axis sizes; one may be -1 to take the remaining devices.
    return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))


def data() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="toy_arithmetic",  # a key of score_jax.data.BUILDERS
        data_dir=os.path.expanduser("~/tensorflow_datasets"),  # TFDS data_dir; built here if missing
        manual_dir="",  # where math / mbpp / gsm8k read the files you provide ("" = TFDS's default)
        builder_seed=0,  # the toy task's generation seed (part of the dataset's identity)
        num_train=20_000,
        num_test=2_000,
        train_split="train",  # training jobs (sft, stage1, stage2); the eval job reads eval.split
        seq_len=128,  # sft: tokens per example, prompt and response together
        too_long="error",  # error | skip | truncate: an SFT example over seq_len, a prompt over sampling.max_prompt_len
        # sft: the targets, record fields, one per attempt ("attempt1,attempt2" = two-turn episodes
        # with task.correction between the attempts).
        sft_fields="response",
    ))


def optim() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        learning_rate=1e-3,
        schedule="cosine",  # cosine | constant (both after linear warmup)
        warmup_steps=50,
        end_lr_fraction=0.1,  # cosine decays to learning_rate * end_lr_fraction
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.0,
        clip_norm=1.0,  # clip by global norm; 0 disables
        grad_accum_steps=1,  # optax.MultiSteps: one update every this many batches
        max_nonfinite_steps=10,  # stop (after saving) after this many consecutive non-finite steps
    ))


def checkpoint() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        every_steps=100,
        keep=3,
        async_save=True,
    ))


def task() -> ml_collections.ConfigDict:
    """What the model is asked and how it is scored (the toy task; configs/tasks.py has the rest)."""
    from score_jax import prompts  # plain strings; imports nothing heavy
    return ml_collections.ConfigDict(dict(
        reward="toy",  # a key of score_jax.rewards.REWARDS
        chat_template="toy",  # a key of score_jax.chat.TEMPLATES
        # Turn-1 user text; str.format fields are the dataset record's text fields.
        prompt_template="{prompt}",
        # SCoRe's fixed instruction between attempts (says nothing about correctness).
        correction=prompts.TOY_CORRECTION,
    ))


def rl() -> ml_collections.ConfigDict:
    """SCoRe Stage I / II (score_jax/jobs/rl.py). Paper values (Appendix B) in configs/stage*.py."""
    return ml_collections.ConfigDict(dict(
        # Objective per step: a string over {1, 2}, cycled in blocks of `schedule_block_steps`
        # steps ("1" = Stage I only, "2" = Stage II only, "12" = interleaved I, II, I, ...).
        schedule="1",
        schedule_block_steps=0,  # 0 = one block (the schedule must then be one stage)
        alpha=10.0,  # Stage II shaping: r2_hat = r(y2) + alpha * (r(y2) - r(y1))
        shaping="difference",  # difference (paper) | indicator (fixing only) | none
        beta1=0.01,  # KL weight on both turns (Stage II) and on turn 2 (Stage I)
        beta2=0.1,  # Stage I KL weight on turn 1 (large: attempt 1 stays near the base)
        baseline="loo",  # loo (leave-one-out over the k samples of a prompt) | mean | none
        kl_estimator="k2",  # k1 | k2 | k3; k2's gradient is that of KL(pi || ref) (losses.py)
        kl_in_reward=False,  # False: beta * KL is a loss term; True: subtracted from the reward
        # Token normalisation of the policy-gradient and KL terms: "constant" = sum over tokens
        # / (episodes * max_new_tokens), i.e. the paper's sequence-level REINFORCE and sequence
        # KL up to one fixed factor; "sequence" = per-sequence mean (GRPO); "token" = batch mean.
        normalize="constant",
        # Training samples (paper: temperature 1.0; log-probs are always at temperature 1);
        # samples_per_prompt is k, the leave-one-out group.
        sampling=sampling(temperature=1.0, samples_per_prompt=4, max_new_tokens=64),
        # The frozen reference (the base model): a params export or a Hugging Face directory.
        reference="",
        keep_best=True,  # export the params with the best training reward to <workdir>/best
        samples_every=20,  # steps between whole episodes written to <workdir>/samples.jsonl
        samples_per_write=4,
    ))


def sampling(*, temperature: float, samples_per_prompt: int, max_new_tokens: int) -> ml_collections.ConfigDict:
    """How episodes are sampled (score_jax/sampler.py): RL rollouts (rl.sampling) and the eval
    job (eval.sampling) share these fields."""
    return ml_collections.ConfigDict(dict(
        max_prompt_len=32,  # tokens of x1 (template included); longer prompts: data.too_long
        max_new_tokens=max_new_tokens,  # per attempt
        temperature=temperature,  # 0 = greedy
        top_k=0,  # 0 = off
        top_p=1.0,  # 1 = off
        samples_per_prompt=samples_per_prompt,  # episodes per prompt (RL: k; eval: per problem)
        chunk_len=64,  # sampler KV-cache chunk (score_jax/sampler.py)
    ))


def evaluation() -> ml_collections.ConfigDict:
    """The eval job (score_jax/jobs/eval.py); also the evaluations inside configs/demo.py."""
    return ml_collections.ConfigDict(dict(
        params="",  # a params export (<run>/export or <run>/best)
        split="test",
        num_problems=0,  # the first N problems of the split; 0 = all
        num_attempts=2,  # attempts per episode, each after the correction instruction
        batch_size=64,  # problems per sampler call
        # Greedy (temperature 0, the paper's evaluation), one episode per problem.
        sampling=sampling(temperature=0.0, samples_per_prompt=1, max_new_tokens=80),
        # Inference-time scaling study: this many two-attempt episodes per problem at
        # scaling_temperature, majority-voted at budgets 2, 4, ... (paper: 32 at 0.7); 0 = off.
        scaling_samples=0,
        scaling_temperature=0.7,
    ))


def base(model_preset: str = "tiny") -> ml_collections.ConfigDict:
    """Fields shared by every job."""
    c = ml_collections.ConfigDict()
    c.job = "sft"
    c.seed = 0  # root PRNG seed: split by purpose (score_jax/jobs/keys.py), folded with the step
    # This run's index among runs that share a seed (configs/demo.py numbers its runs): part of
    # the root key, so such runs never draw the same keys or data order.
    c.run = 0
    c.model_preset = model_preset
    c.model = models.get(model_preset)
    c.mesh = mesh()
    c.data = data()
    c.task = task()
    c.optim = optim()
    c.checkpoint = checkpoint()
    c.batch_size = 32  # global batch, in examples
    c.total_steps = 500
    c.log_every = 10  # console and TensorBoard
    # Positions per vocabulary-projection chunk in the loss (0 = all at once). With 128k-256k
    # vocabularies the [batch, length, vocab] logits dominate memory; chunks of 128-512 fix that.
    c.loss_chunk = 0
    c.init_from = ""  # a params-only export directory to start from; "" = random init
    c.tokenizer = ""  # a tokenizer file or checkpoint directory; "" = the dataset's own (toy)
    c.distributed = False  # call jax.distributed.initialize() (multi-host TPU pods)
    # CPU backend only: split the host into this many JAX devices (jax_num_cpu_devices), so
    # that the data-parallel mesh keeps every core busy; 0 = JAX's own count (1, or XLA_FLAGS'
    # --xla_force_host_platform_device_count). No effect on TPU or GPU runs.
    c.cpu_devices = 0
    # Persistent XLA compilation cache: a resumed or repeated run skips recompiling. "" = off.
    c.compilation_cache_dir = os.path.expanduser("~/.cache/score_jax/xla")
    return c
