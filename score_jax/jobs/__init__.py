"""The jobs ``score_jax.main`` runs (``config.job``), each a short file that reads top to bottom:
sft, rl (stage1 / stage2), eval, demo; and what they share: harness (mesh, resume-or-init, the
step loop, export), inputs (dataset, tokenizer, prompts, params, the sampler program), keys
(every random key from one table of purposes)."""
