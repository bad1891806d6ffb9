"""score_jax.bench.toy_episodes: the slip / other split and revise, fix and break rates of
hand-made toy episodes, exact."""

import json
import math

from score_jax.bench import toy_episodes
from score_jax.data import toy

PROBLEM = ("+", 47, 85)  # 7+5=12 carry 1, then 4+8+1: the base's slip forgets that carry


def _row(first: str, second: str) -> dict:
    answer = toy.solve(*PROBLEM)[2]
    correct = [float(t == toy.solve(*PROBLEM)[1]) for t in (first, second)]
    return {"problem": toy.solve(*PROBLEM)[0], "answer": answer, "attempts": [first, second], "correct": correct}


def test_rates_of_hand_made_episodes():
    right = toy.solve(*PROBLEM)[1]
    slip = toy.solve(*PROBLEM, (1, -1))[1]  # 4+8+1=12: a one-line slip
    other = right.replace("Answer: 132", "Answer: 7")  # wrong, and not one of the one-line slips
    assert slip != right and slip in toy_episodes.slips(*PROBLEM) and other not in toy_episodes.slips(*PROBLEM)
    rows = [
        _row(right, right),   # right, kept
        _row(right, slip),    # right, revised and broken
        _row(slip, right),    # slip, fixed
        _row(slip, slip),     # slip, kept
        _row(other, slip),    # other, revised, still wrong
    ]
    res = toy_episodes.analyse(rows)
    assert res["n"] == 5
    assert res["acc_t1"] == 2 / 5 and res["acc_t2"] == 2 / 5 and res["delta"] == 0.0
    assert res["t1_slip"] == 2 / 5 and res["t1_other"] == 1 / 5
    assert res["t2_slip"] == 3 / 5 and res["t2_other"] == 0.0
    assert res["revise_if_wrong"] == 2 / 3 and res["revise_if_right"] == 1 / 2
    assert res["fix_rate"] == 1 / 2 and res["fix_rate_slip"] == 1.0 and res["fix_rate_other"] == 0.0
    assert res["break_rate"] == 1.0
    assert res["i_to_c"] == 1 / 5 and res["c_to_i"] == 1 / 5


def test_rates_without_revisions_are_nan_and_main_prints_json(tmp_path, capsys):
    right = toy.solve(*PROBLEM)[1]
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps(_row(right, right)) + "\n")
    toy_episodes.main([str(path)])
    res = json.loads(capsys.readouterr().out)[str(path)]
    assert res["acc_t1"] == 1.0 and res["revise_if_right"] == 0.0
    assert math.isnan(res["fix_rate"]) and math.isnan(res["revise_if_wrong"])


def test_a_file_of_another_task_gets_one_clear_error():
    import pytest
    row = dict(_row("Answer: 1", "Answer: 1"), problem="Let x be a real number.")
    with pytest.raises(ValueError, match="not a toy_arithmetic problem"):
        toy_episodes.analyse([row])
