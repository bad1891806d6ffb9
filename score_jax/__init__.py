"""score_jax: SCoRe (multi-turn RL for self-correction) in JAX."""
