"""score_jax.evaluate on hand-made outcomes: exact metric values, intervals, voting, budgets."""

import numpy as np
import pytest

from score_jax import evaluate


def test_self_correction_metrics_by_hand():
    # 5 problems, 1 sample: t1 = 1 1 0 0 0, t2 = 1 0 1 1 0
    c = np.array([[1, 1, 0, 0, 0], [1, 0, 1, 1, 0]])
    m = evaluate.self_correction(c)
    assert m["acc_t1"]["mean"] == pytest.approx(0.4)
    assert m["acc_t2"]["mean"] == pytest.approx(0.6)
    assert m["delta"]["mean"] == pytest.approx(0.2)
    assert m["delta_i_to_c"]["mean"] == pytest.approx(0.4)  # problems 3 and 4
    assert m["delta_c_to_i"]["mean"] == pytest.approx(0.2)  # problem 2
    assert m["delta"]["mean"] == pytest.approx(m["delta_i_to_c"]["mean"] - m["delta_c_to_i"]["mean"])
    # Paired interval of delta: per-problem differences 0 -1 1 1 0, sd = sqrt(0.7).
    se = np.sqrt(0.7) / np.sqrt(5)
    assert m["delta"]["se"] == pytest.approx(se)
    assert m["delta"]["ci_low"] == pytest.approx(0.2 - evaluate.Z95 * se)
    assert m["delta"]["ci_high"] == pytest.approx(0.2 + evaluate.Z95 * se)
    assert m["acc_by_attempt"] == pytest.approx([0.4, 0.6])
    assert (m["num_problems"], m["samples_per_problem"], m["num_attempts"]) == (5, 1, 2)


def test_samples_are_averaged_within_a_problem_first():
    # 2 problems x 2 samples; problem 0: t1 = 1 0, t2 = 1 1; problem 1: t1 = 0 0, t2 = 0 1
    c = np.array([[[1, 0], [0, 0]], [[1, 1], [0, 1]]])
    m = evaluate.self_correction(c)
    assert m["acc_t1"]["mean"] == pytest.approx(0.25)
    assert m["acc_t2"]["mean"] == pytest.approx(0.75)
    assert m["delta_i_to_c"]["mean"] == pytest.approx(0.5)
    # Per-problem deltas are 0.5 and 0.5: no spread over problems, a zero-width interval.
    assert m["delta"]["se"] == pytest.approx(0.0)
    assert m["acc_t1"]["se"] == pytest.approx(np.std([0.5, 0.0], ddof=1) / np.sqrt(2))


def test_n_attempts_and_input_checks():
    c = np.array([[0, 0, 1], [0, 1, 1], [1, 1, 1]])
    assert evaluate.self_correction(c)["acc_by_attempt"] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert "acc_t2" not in evaluate.self_correction(c[:1])
    with pytest.raises(ValueError, match="only 0 and 1"):
        evaluate.self_correction(np.array([[0.5, 1]]))
    with pytest.raises(ValueError, match="shape"):
        evaluate.self_correction(np.zeros((2,)))


def test_majority_vote_ties_go_to_the_first_seen():
    assert evaluate.majority(["3", "4", "4", "3", None]) == "3"
    assert evaluate.majority([None, "5", "6", "6"]) == "6"
    assert evaluate.majority([None, None]) is None


def test_inference_scaling_budget_accounting():
    """4 episodes per problem; attempt-2 answers always right, attempt-1 right in episode 0 only."""
    S = 4
    answers = np.empty((2, 2, S), dtype=object)
    answers[0] = [["7", "1", "2", "3"], ["9", "1", "2", "3"]]
    answers[1] = [["7"] * S, ["9"] * S]
    refs = ["7", "9"]
    seen = []

    def is_correct(p, a):
        seen.append((p, a))
        return a == refs[p]

    out = evaluate.inference_scaling(answers, is_correct, [2, 4])
    assert out["budgets"] == [2, 4]
    assert out["samples_used"] == {"parallel": [2, 4], "sequential": [2, 4]}
    # Budget 2: parallel groups (episodes 0-1) and (2-3) -> votes "7"/"9" right, then "2" wrong:
    # 1/2; sequential uses B/2 = 1 episode per group, 4 groups, all right.
    assert out["parallel"] == pytest.approx([0.5, 1.0])  # budget 4: one group, tie -> first ("7")
    assert out["sequential"] == pytest.approx([1.0, 1.0])
    assert evaluate.scaling_budgets(32) == [2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="even"):
        evaluate.inference_scaling(answers, is_correct, [3])


def test_table_prints_percent_with_interval_half_widths():
    m = evaluate.self_correction(np.array([[1, 1, 0, 0, 0], [1, 0, 1, 1, 0]]))
    text = evaluate.table({"base": m})
    assert text.splitlines()[0].startswith("method | ")
    assert "  40.0 ±" in text and "  60.0 ±" in text and "  20.0 ±" in text


# Ten hand-made episodes: (y1 correct, y2 correct, y2 != y1).
_EPISODES = [(0, 0, 0), (0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 1),  # 5 wrong y1: 3 revised, 2 fixed
             (1, 1, 0), (1, 1, 0), (1, 1, 0), (1, 0, 1), (1, 1, 1)]  # 5 right y1: 2 revised, 1 broken


def test_revise_rates_by_hand():
    c1, c2, rev = (np.array(col, np.float64) for col in zip(*_EPISODES))
    r = evaluate.revise_rates(c1, c2, rev)
    assert (r["n_wrong1"], r["n_right1"], r["n_revised_wrong"], r["n_revised_right"]) == (5, 5, 3, 2)
    assert r["revise_if_wrong"] == pytest.approx(3 / 5) and r["revise_if_right"] == pytest.approx(2 / 5)
    assert r["fix_if_revised"] == pytest.approx(2 / 3) and r["break_if_revised"] == pytest.approx(1 / 2)
    # The paper's i->c and c->i factor through them (a copied attempt scores the same).
    m = evaluate.self_correction(np.stack([c1, c2]))
    assert m["delta_i_to_c"]["mean"] == pytest.approx(0.5 * r["revise_if_wrong"] * r["fix_if_revised"])
    assert m["delta_c_to_i"]["mean"] == pytest.approx(0.5 * r["revise_if_right"] * r["break_if_revised"])


def test_revise_rates_in_jit_equal_numpy_and_empty_conditions_are_zero():
    import jax
    import jax.numpy as jnp
    cols = [np.array(col, np.float32) for col in zip(*_EPISODES)]
    want = evaluate.revise_rates(*cols)
    got = jax.jit(evaluate.revise_rates)(*(jnp.asarray(c) for c in cols))
    assert set(got) == set(want)
    for k in want:
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-6), k
    # Every first attempt right and none revised: the wrong-conditioned rates are 0 with count 0.
    ones, zeros = np.ones(4), np.zeros(4)
    r = evaluate.revise_rates(ones, ones, zeros)
    assert (r["n_wrong1"], r["revise_if_wrong"], r["fix_if_revised"], r["revise_if_right"]) == (0, 0, 0, 0)
