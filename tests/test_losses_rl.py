"""SCoRe RL losses: every expected number below is worked out by hand in the comments."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close_f32
from score_jax import losses

# ---- shaped rewards ------------------------------------------------------------------------
# Episodes: breaks (1 -> 0), fixes (0 -> 1), stays right (1 -> 1), stays wrong (0 -> 0).
R1 = jnp.array([1.0, 0.0, 1.0, 0.0])
R2 = jnp.array([0.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("shaping, want_r2_hat", [
    # r2 + 10 (r2 - r1): 0 + 10 (0 - 1) = -10; 1 + 10 (1 - 0) = 11; 1 + 0 = 1; 0 + 0 = 0.
    ("difference", [-10.0, 11.0, 1.0, 0.0]),
    # r2 + 10 * 1[r1 = 0, r2 = 1]: only the fix gets the bonus, 1 + 10 = 11; breaking gets 0.
    ("indicator", [0.0, 11.0, 1.0, 0.0]),
    ("none", [0.0, 1.0, 1.0, 0.0]),
])
def test_stage2_shaping_by_hand(shaping, want_r2_hat):
    r1_hat, r2_hat = losses.shaped_rewards(R1, R2, stage=2, alpha=10.0, shaping=shaping)
    np.testing.assert_array_equal(r1_hat, R1)  # r1_hat = r(y1)
    np.testing.assert_array_equal(r2_hat, want_r2_hat)


@pytest.mark.parametrize("shaping", losses.SHAPINGS)
def test_stage1_has_no_turn1_reward_and_no_shaping(shaping):
    r1_hat, r2_hat = losses.shaped_rewards(R1, R2, stage=1, alpha=10.0, shaping=shaping)
    np.testing.assert_array_equal(r1_hat, [0, 0, 0, 0])
    np.testing.assert_array_equal(r2_hat, R2)


def test_shaped_rewards_accepts_int_rewards():
    _, r2_hat = losses.shaped_rewards(jnp.array([1, 0]), jnp.array([0, 1]), stage=2, alpha=10.0,
                                      shaping="difference")
    assert r2_hat.dtype == jnp.float32
    np.testing.assert_array_equal(r2_hat, [-10.0, 11.0])


# ---- advantages ----------------------------------------------------------------------------
def test_loo_advantages_two_prompts_by_hand():
    # Prompt 0 = rows 0-1 with rewards [1, 0]: A = [1 - 0, 0 - 1] = [1, -1].
    # Prompt 1 = rows 2-3 with rewards [0, 0]: A = [0, 0].
    a = losses.advantages(jnp.array([1.0, 0.0, 0.0, 0.0]), baseline="loo", k=2)
    np.testing.assert_array_equal(a, [1.0, -1.0, 0.0, 0.0])
    # One prompt, k = 4: A0 = 1 - (0+0+0)/3 = 1; A1..3 = 0 - (1+0+0)/3 = -1/3. Sum 0.
    a = losses.advantages(jnp.array([1.0, 0.0, 0.0, 0.0]), baseline="loo", k=4)
    np.testing.assert_allclose(a, [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)


def test_loo_advantages_sum_to_zero_per_prompt_and_match_a_loop():
    k = 3
    r = np.asarray(jax.random.uniform(jax.random.key(0), (12,)))
    a = np.asarray(losses.advantages(jnp.asarray(r), baseline="loo", k=k))
    np.testing.assert_allclose(a.reshape(-1, k).sum(axis=1), 0.0, atol=1e-6)
    want = [r[i] - np.mean([r[j] for j in range(i // k * k, i // k * k + k) if j != i])
            for i in range(12)]
    np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-6)


def test_mean_and_no_baseline_by_hand():
    r = jnp.array([1.0, 0.0, 0.0, 0.0])
    # Batch mean 0.25: [0.75, -0.25, -0.25, -0.25]; k is ignored.
    np.testing.assert_array_equal(losses.advantages(r, baseline="mean", k=1),
                                  [0.75, -0.25, -0.25, -0.25])
    np.testing.assert_array_equal(losses.advantages(r, baseline="none", k=1), r)


def test_loo_needs_k_at_least_2_and_b_divisible_by_k():
    r = jnp.zeros((4,))
    with pytest.raises(ValueError, match="needs k >= 2"):
        losses.advantages(r, baseline="loo", k=1)
    with pytest.raises(ValueError, match="B divisible by k"):
        losses.advantages(r, baseline="loo", k=3)
    with pytest.raises(ValueError, match="baseline must be one of"):
        losses.advantages(r, baseline="median", k=2)


# ---- KL estimators -------------------------------------------------------------------------
LOG2 = math.log(2.0)  # 0.693147


@pytest.mark.parametrize("estimator, want", [
    # pi = 0.5, ref = 0.25 (first) and pi = 0.25, ref = 0.5 (second); log(pi/ref) = +-log 2.
    ("k1", [LOG2, -LOG2]),                               # logp - ref_logp
    ("k2", [0.5 * LOG2 ** 2, 0.5 * LOG2 ** 2]),          # 0.240227 both
    # ref/pi - log(ref/pi) - 1 = 0.5 + log 2 - 1 = 0.193147 and 2 - log 2 - 1 = 0.306853
    ("k3", [0.5 + LOG2 - 1.0, 2.0 - LOG2 - 1.0]),
])
def test_kl_estimators_by_hand(estimator, want):
    logp = jnp.log(jnp.array([[0.5, 0.25]]))
    ref = jnp.log(jnp.array([[0.25, 0.5]]))
    np.testing.assert_allclose(losses.kl_per_token(logp, ref, estimator), [want], rtol=1e-6)
    np.testing.assert_array_equal(losses.kl_per_token(logp, logp, estimator), [[0.0, 0.0]])


def test_kl_estimator_unknown_raises():
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        losses.kl_per_token(jnp.zeros((1, 1)), jnp.zeros((1, 1)), "k4")


# ---- token normalisation -------------------------------------------------------------------
def test_reduce_tokens_by_hand():
    # Row 0: 3 tokens [1, 2, 3]; row 1: 1 token [4], then padding holding garbage.
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 100.0, jnp.nan]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0]])
    # sequence: (mean [1,2,3] = 2 + mean [4] = 4) / 2 = 3.
    np.testing.assert_allclose(losses.reduce_tokens(x, mask, "sequence"), 3.0, rtol=1e-6)
    # token: (1 + 2 + 3 + 4) / 4 tokens = 2.5.
    np.testing.assert_allclose(losses.reduce_tokens(x, mask, "token"), 2.5, rtol=1e-6)
    # constant: 10 / (B * T = 2 * 3) = 1.666667.
    np.testing.assert_allclose(losses.reduce_tokens(x, mask, "constant"), 10 / 6, rtol=1e-6)


def test_reduce_tokens_empty_rows():
    x = jnp.array([[1.0, 3.0], [5.0, 5.0]])
    mask = jnp.array([[1, 1], [0, 0]])
    # sequence: the empty row is not a sequence to average over: mean [1, 3] = 2.
    np.testing.assert_allclose(losses.reduce_tokens(x, mask, "sequence"), 2.0)
    np.testing.assert_allclose(losses.reduce_tokens(x, mask, "token"), 2.0)  # 4 / 2
    np.testing.assert_allclose(losses.reduce_tokens(x, mask, "constant"), 1.0)  # 4 / 4
    for how in losses.REDUCTIONS:
        assert float(losses.reduce_tokens(x, jnp.zeros((2, 2)), how)) == 0.0
    with pytest.raises(ValueError, match="normalize must be one of"):
        losses.reduce_tokens(x, mask, "batch")


# ---- the stage objectives ------------------------------------------------------------------
# 2 prompts x k = 2. r1 = [1, 0, 0, 0], r2 = [1, 1, 0, 0], alpha = 10, difference shaping:
#   r1_hat = [1, 0, 0, 0]; r2_hat = r2 + 10 (r2 - r1) = [1, 11, 0, 0].
#   LOO: A1 = [1 - 0, 0 - 1, 0, 0] = [1, -1, 0, 0]; A2 = [1 - 11, 11 - 1, 0, 0] = [-10, 10, 0, 0].
# Turn 1 (T1 = 3) lengths [2, 1, 3, 3] (9 tokens); turn 2 (T2 = 2) lengths [2, 2, 1, 2] (7 tokens).
MASK1 = jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]])
MASK2 = jnp.array([[1, 1], [1, 1], [1, 0], [1, 1]])
N1 = np.array([2, 1, 3, 3])[:, None]
N2 = np.array([2, 2, 1, 2])[:, None]
A1 = np.array([1.0, -1.0, 0.0, 0.0])[:, None]
A2 = np.array([-10.0, 10.0, 0.0, 0.0])[:, None]
BASE = {"r1": jnp.array([1.0, 0.0, 0.0, 0.0]), "r2": jnp.array([1.0, 1.0, 0.0, 0.0]),
        "alpha": 10.0, "beta1": 0.5, "beta2": 0.25, "shaping": "difference", "baseline": "loo",
        "k": 2, "mask1": MASK1, "mask2": MASK2, "kl_in_reward": False}
STATIC = ("stage", "shaping", "baseline", "k", "kl_estimator", "kl_in_reward", "normalize")
# Policy log-prob -1 at every token, reference -1.5: k1 = 0.5, k2 = 0.125 per token.
LOGP1, REF1 = jnp.full((4, 3), -1.0), jnp.full((4, 3), -1.5)
LOGP2, REF2 = jnp.full((4, 2), -1.0), jnp.full((4, 2), -1.5)


def grads(logp1=LOGP1, ref1=REF1, logp2=LOGP2, ref2=REF2, **kw):
    """d loss / d (logp1, ref_logp1, logp2, ref_logp2), and the metrics."""
    def f(lp1, rf1, lp2, rf2):
        return losses.score_loss(logp1=lp1, ref_logp1=rf1, logp2=lp2, ref_logp2=rf2,
                                 **{**BASE, **kw})
    g, metrics = jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True)(logp1, ref1, logp2, ref2)
    return [np.asarray(x) for x in g], metrics


def masked(per_row, mask):
    return np.where(np.asarray(mask, bool), per_row, 0.0)


@pytest.mark.parametrize("normalize, norm1, norm2", [
    ("sequence", N1 * 4, N2 * 4),  # own length x B sequences
    ("token", 9.0, 7.0),           # all tokens of the turn
    ("constant", 4 * 3.0, 4 * 2.0),  # B * T
])
def test_stage2_gradients_by_hand(normalize, norm1, norm2):
    # d/dlogp of -A log pi is -A; of beta1 * k1 = beta1 (logp - ref) is beta1 = 0.5.
    # e.g. "sequence", turn 1, row 0: (-1 + 0.5) / (2 * 4) = -0.0625; row 1: (1 + 0.5) / 4 = 0.375;
    #      turn 2, row 0: (10 + 0.5) / 8 = 1.3125; row 1: (-10 + 0.5) / 8 = -1.1875.
    (g1, gr1, g2, gr2), _ = grads(stage=2, kl_estimator="k1", normalize=normalize)
    np.testing.assert_allclose(g1, masked((-A1 + 0.5) / norm1, MASK1), rtol=1e-6)
    np.testing.assert_allclose(g2, masked((-A2 + 0.5) / norm2, MASK2), rtol=1e-6)
    assert not gr1.any() and not gr2.any()  # the reference gets no gradient


def test_stage2_loss_and_metrics_by_hand():
    _, m = grads(stage=2, kl_estimator="k1", normalize="token")
    # pg1 = sum over tokens of -A1 * (-1) / 9 = (1 * 2 tokens - 1 * 1 token) / 9 = 1/9.
    # pg2 = (-10 * 2 + 10 * 2) / 7 = 0. KL: 0.5 per token, so kl_loss = 0.5 * 0.5 = 0.25 per turn.
    want = {"pg1": 1 / 9, "pg2": 0.0, "kl_loss1": 0.25, "kl_loss2": 0.25, "loss": 1 / 9 + 0.5,
            "kl1": 0.5, "kl2": 0.5, "reward1": 0.25, "reward2": 0.5, "shaped_reward1": 0.25,
            "shaped_reward2": 3.0, "adv1_mean": 0.0, "adv2_mean": 0.0,
            "adv1_std": math.sqrt(0.5),    # sqrt(mean [1, 1, 0, 0])
            "adv2_std": math.sqrt(50.0)}   # sqrt(mean [100, 100, 0, 0])
    assert set(m) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(m[key], value, rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("normalize", losses.REDUCTIONS)
@pytest.mark.parametrize("estimator", losses.KL_ESTIMATORS)
def test_stage1_no_policy_gradient_into_turn1(normalize, estimator):
    ks = jax.random.split(jax.random.key(1), 4)
    logp1, ref1 = -jax.random.uniform(ks[0], (4, 3)) - 0.1, -jax.random.uniform(ks[1], (4, 3)) - 0.1
    logp2, ref2 = -jax.random.uniform(ks[2], (4, 2)) - 0.1, -jax.random.uniform(ks[3], (4, 2)) - 0.1
    kw = {"stage": 1, "kl_estimator": estimator, "normalize": normalize, "logp1": logp1,
          "ref1": ref1, "logp2": logp2, "ref2": ref2}
    (g1, *_), m = grads(**kw)
    kl_only = jax.grad(lambda lp: 0.25 * losses.reduce_tokens(
        losses.kl_per_token(lp, ref1, estimator), MASK1, normalize))(logp1)  # beta2 KL(turn 1)
    # The same terms, though score_loss may order its products and sums otherwise: a few ulps
    # (masked entries exactly 0 in both).
    np.testing.assert_allclose(g1, kl_only, rtol=1e-6, atol=0)
    # Whatever the rewards, turn 1's gradient is the same: no reward reaches it.
    (g1_other, *_), _ = grads(**kw, r1=jnp.array([0.0, 1.0, 1.0, 0.0]),
                              r2=jnp.array([0.0, 1.0, 0.0, 1.0]))
    np.testing.assert_array_equal(g1_other, g1)
    assert float(m["pg1"]) == 0.0 and float(m["adv1_std"]) == 0.0


def test_stage1_gradients_by_hand():
    # Stage I: r2_hat = r2. BASE's r2 gives A2 = 0, so use r2 = [1, 0, 0, 1]: A2 = [1, -1, -1, 1].
    # k2 = (logp - ref)^2 / 2 has d/dlogp = logp - ref = 0.5. "token" normalisation.
    # turn 1: beta2 * 0.5 / 9 = 0.25 * 0.5 / 9 = 0.0138889 at every token, no -A1 part.
    # turn 2: (-A2 + beta1 * 0.5) / 7 = (-A2 + 0.25) / 7: row 0 -0.75/7 = -0.107143, row 1 1.25/7.
    (g1, _, g2, _), m = grads(stage=1, kl_estimator="k2", normalize="token",
                              r2=jnp.array([1.0, 0.0, 0.0, 1.0]))
    np.testing.assert_allclose(g1, masked(np.full((4, 1), 0.25 * 0.5 / 9), MASK1), rtol=1e-6)
    a2 = np.array([1.0, -1.0, -1.0, 1.0])[:, None]
    np.testing.assert_allclose(g2, masked((-a2 + 0.25) / 7, MASK2), rtol=1e-6)
    # kl_loss1 = beta2 * 0.125 = 0.03125; kl_loss2 = beta1 * 0.125 = 0.0625.
    np.testing.assert_allclose([m["kl_loss1"], m["kl_loss2"]], [0.03125, 0.0625], rtol=1e-6)
    np.testing.assert_allclose(m["shaped_reward1"], 0.0)


def test_kl_in_reward_changes_advantages_and_adds_no_kl_loss():
    # k1, beta1 = 0.5, "token". Turn 1: logp -1; ref -1.5 (KL 0.5/token), row 3 ref -2 (KL 1/token).
    #   sequence KL1 = [0.5*2, 0.5*1, 0.5*3, 1*3] = [1, 0.5, 1.5, 3]
    #   reward1 = r1_hat - 0.5 KL1 = [1 - 0.5, 0 - 0.25, -0.75, -1.5] = [0.5, -0.25, -0.75, -1.5]
    #   LOO A1 = [0.5 + 0.25, -0.25 - 0.5, -0.75 + 1.5, -1.5 + 0.75] = [0.75, -0.75, 0.75, -0.75]
    # Turn 2: logp -1; ref -1.5 (KL 0.5/token), row 0 ref -1 (KL 0).
    #   sequence KL2 = [0, 0.5*2, 0.5*1, 0.5*2] = [0, 1, 0.5, 1]
    #   reward2 = r2_hat - 0.5 KL2 = [1, 11 - 0.5, -0.25, -0.5] = [1, 10.5, -0.25, -0.5]
    #   LOO A2 = [1 - 10.5, 10.5 - 1, -0.25 + 0.5, -0.5 + 0.25] = [-9.5, 9.5, 0.25, -0.25]
    ref1 = REF1.at[3].set(-2.0)
    ref2 = REF2.at[0].set(-1.0)
    (g1, gr1, g2, gr2), m = grads(stage=2, kl_estimator="k1", normalize="token", kl_in_reward=True,
                                  ref1=ref1, ref2=ref2)
    a1 = np.array([0.75, -0.75, 0.75, -0.75])[:, None]
    a2 = np.array([-9.5, 9.5, 0.25, -0.25])[:, None]
    # Only -A / normaliser: no beta1 term in the gradient.
    np.testing.assert_allclose(g1, masked(-a1 / 9, MASK1), rtol=1e-6)
    np.testing.assert_allclose(g2, masked(-a2 / 7, MASK2), rtol=1e-6)
    assert not gr1.any() and not gr2.any()
    assert float(m["kl_loss1"]) == 0.0 and float(m["kl_loss2"]) == 0.0
    # pg only: (0.75*2 - 0.75*1 + 0.75*3 - 0.75*3) / 9 = 0.75/9; (-9.5*2 + 9.5*2 + 0.25 - 0.5) / 7.
    np.testing.assert_allclose(m["loss"], 0.75 / 9 - 0.25 / 7, rtol=1e-6)
    # The KL metric still reports the per-token KL: (0.5*2 + 0.5 + 0.5*3 + 1*3) / 9 = 6/9.
    np.testing.assert_allclose(m["kl1"], 6 / 9, rtol=1e-6)


def test_kl_in_reward_stage1_turn1_reward_is_the_kl_alone():
    # Stage I: reward1 = 0 - beta2 * KL1 = -0.25 * [1, 0.5, 1.5, 3] = [-0.25, -0.125, -0.375, -0.75]
    #   LOO A1 = [-0.125, 0.125, 0.375, -0.375]; gradient -A1 / 9 ("token").
    (g1, *_), m = grads(stage=1, kl_estimator="k1", normalize="token", kl_in_reward=True,
                        ref1=REF1.at[3].set(-2.0))
    a1 = np.array([-0.125, 0.125, 0.375, -0.375])[:, None]
    np.testing.assert_allclose(g1, masked(-a1 / 9, MASK1), rtol=1e-6)
    np.testing.assert_allclose(m["shaped_reward1"], 0.0)


def test_padding_garbage_does_not_leak():
    # inf / nan in padded positions must not reach the loss or the gradients (k3 uses exp).
    pad1 = ~np.asarray(MASK1, bool)
    logp1 = jnp.where(pad1, -jnp.inf, LOGP1)
    ref1 = jnp.where(pad1, jnp.nan, REF1)
    (g1, *_), m = grads(stage=2, kl_estimator="k3", normalize="sequence", logp1=logp1, ref1=ref1)
    (g1_clean, *_), m_clean = grads(stage=2, kl_estimator="k3", normalize="sequence")
    np.testing.assert_array_equal(g1, g1_clean)
    np.testing.assert_array_equal(m["loss"], m_clean["loss"])


def test_score_loss_jit_compiles_and_matches_eager():
    kw = dict(**BASE, stage=2, kl_estimator="k3", normalize="constant",
              logp1=LOGP1, ref_logp1=REF1, logp2=LOGP2, ref_logp2=REF2)
    eager, m_eager = losses.score_loss(**kw)
    jitted = jax.jit(losses.score_loss, static_argnames=STATIC)
    got, m_got = jitted(**kw)
    # jit may fuse and reorder: the loss sums 12 + 8 terms of size up to |A| |log pi| = 10 (the
    # policy-gradient terms cancel to pg2 = 0); adv2_std is a mean of 4 squares of |A| <= 10.
    assert_close_f32(got, eager, 20, magnitude=10.0)
    assert_close_f32(m_got["adv2_std"], m_eager["adv2_std"], 4, magnitude=10.0)
    # alpha and the betas may be traced (e.g. a schedule).
    traced = jax.jit(functools.partial(losses.score_loss, **{k: kw[k] for k in STATIC}))
    rest = {k: v for k, v in kw.items() if k not in STATIC}
    assert_close_f32(traced(**rest)[0], eager, 20, magnitude=10.0)


@pytest.mark.parametrize("bad, message", [
    ({"stage": 3}, "stage must be one of 1, 2"),
    ({"shaping": "diff"}, "shaping must be one of"),
    ({"baseline": "gae"}, "baseline must be one of"),
    ({"k": 1}, "needs k >= 2"),
    ({"kl_estimator": "k4"}, "kl_estimator must be one of"),
    ({"normalize": "mean"}, "normalize must be one of"),
    ({"kl_in_reward": "yes"}, "kl_in_reward must be one of"),
    ({"mask2": jnp.ones((4, 3))}, "turn 2: logp, ref_logp and mask must share one shape"),
    ({"r2": jnp.ones((3,))}, "must agree on B"),
])
def test_score_loss_invalid_options_raise(bad, message):
    kw = dict(**BASE, stage=2, kl_estimator="k1", normalize="token", logp1=LOGP1, ref_logp1=REF1,
              logp2=LOGP2, ref_logp2=REF2)
    with pytest.raises(ValueError, match=message):
        losses.score_loss(**{**kw, **bad})


# ---- metrics helpers -----------------------------------------------------------------------
