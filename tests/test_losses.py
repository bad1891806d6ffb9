import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close_f32, logprob_scale
from score_jax import losses


def test_token_logprobs_by_hand():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    got = losses.token_logprobs(logits, jnp.array([[1, 2]]))
    np.testing.assert_allclose(got, np.log([[0.25, 0.8]]), rtol=1e-6)


def test_masked_mean_nll_with_empty_mask_is_zero():
    loss, n = losses.masked_mean_nll(jnp.full((2, 3), -1.0), jnp.zeros((2, 3)))
    assert float(loss) == 0.0 and float(n) == 0.0


@pytest.mark.parametrize("chunk", [0, 1, 3, 4, 7, 100])
def test_chunked_logprobs_match_unchunked_values_and_grads(chunk):
    B, T, D, V = 2, 7, 5, 11
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (B, T, D))
    w = jax.random.normal(k2, (D, V))
    targets = jax.random.randint(k3, (B, T), 0, V)

    def f(w, h, c):
        return losses.chunked_token_logprobs(lambda x: x @ w, h, targets, c)

    full, chunked = f(w, hidden, 0), f(w, hidden, chunk)
    # Chunks of positions go through the matmul and log-softmax (D + V terms) apart: other
    # blocking, so float32 rounding at the scale of the logits and their logsumexp (~20 here).
    scale = logprob_scale(hidden @ w)
    assert_close_f32(chunked, full, D + V, magnitude=scale)
    g_full = jax.grad(lambda w, h: f(w, h, 0).sum(), argnums=(0, 1))(w, hidden)
    g_chunk = jax.grad(lambda w, h: f(w, h, chunk).sum(), argnums=(0, 1))(w, hidden)
    # dw also sums over the B * T positions; each gradient at its own scale.
    for a, b, name in zip(g_chunk, g_full, ("dw", "dhidden")):
        assert_close_f32(a, b, D + V + B * T, err_msg=name)


def test_chunked_entropy_by_hand():
    """The entropy the learner logs (chunked_logprobs_and_entropy), at three hand-made positions."""
    import math
    logits = jnp.array([[[0.0, 0.0, 0.0, 0.0],                   # uniform over 4: log 4
                         [0.0, -jnp.inf, -jnp.inf, -jnp.inf],    # certain: 0 (-inf logits are fine)
                         jnp.log(jnp.array([0.5, 0.25, 0.25, 1e-30])).tolist()]])  # 1.5 log 2
    hidden = jnp.arange(3.0)[None, :, None]  # [1, 3, 1]: position t's "hidden state" is t
    unembed = lambda h: logits[0][h[..., 0].astype(jnp.int32)]  # noqa: E731  row t of the logits above
    for chunk in (0, 1, 2):
        logp, ent = losses.chunked_logprobs_and_entropy(unembed, hidden, jnp.array([[0, 0, 1]]), chunk)
        np.testing.assert_allclose(ent[0], [math.log(4), 0.0, 1.5 * math.log(2)], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(logp[0], [-math.log(4), 0.0, math.log(0.25)], rtol=1e-5)
