"""Math reward: answer extraction, LaTeX normalisation, math-verify equivalence, timeouts."""
import concurrent.futures
import multiprocessing
import time

import pytest

from score_jax.rewards import math as math_reward_lib


def paper(answer: str) -> str:
    """A completion in the paper's final-answer form."""
    return f"Let us think.\nFinal Answer: The final answer is ${answer}$. I hope it is correct."


# ---------------------------------------------------------------------------------- extraction

@pytest.mark.parametrize("completion, expected", [
    (paper("\\frac{1}{2}"), "\\frac{1}{2}"),
    ("The final answer is $3$. I hope it is correct.\nWait.\n" + paper("4"), "4"),
    ("Final Answer: The final answer is $$x^2$$. I hope it is correct.", "x^2"),
    ("The final answer is 12. I hope it is correct.", "12"),
    ("so we get \\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{1} then \\boxed{\\{1, \\{2\\}\\}}", "\\{1, \\{2\\}\\}"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}",
     "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("the answer is \\boxed 7.", "7."),
    ("I don't know.", None),
    ("\\boxed{unbalanced", None),
])
def test_extract_answer(completion, expected):
    assert math_reward_lib.extract_answer(completion) == expected


def test_extract_answer_with_pattern_takes_the_last_match():
    text = "Answer: 1\nmore\nAnswer: -42\n"
    assert math_reward_lib.extract_answer(text, pattern=r"Answer: (?P<answer>-?\d+)") == "-42"
    assert math_reward_lib.extract_answer(text, pattern=r"Answer: (-?\d+)") == "-42"
    assert math_reward_lib.extract_answer(text, pattern=r"Result: (\d+)") is None


def test_reference_may_be_a_solution_with_a_boxed_answer():
    assert math_reward_lib.reference_answer("so it is $\\boxed{\\dfrac{3}{4}}$.") == "\\dfrac{3}{4}"
    assert math_reward_lib.reference_answer(" 42 ") == "42"


# ------------------------------------------------------------------------------- normalisation

@pytest.mark.parametrize("raw, normalised", [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("\\frac1{2}", "\\frac{1}{2}"),
    ("\\frac{a}b", "\\frac{a}{b}"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("10\\text{ cm}", "10"),
    ("10 \\text{cm}^2", "10"),
    ("5 inches", "5"),
    ("\\text{(B)}", "(B)"),
    ("\\text{Monday}", "Monday"),
    ("1,000,000", "1000000"),
    ("(1,234)", "(1,234)"),  # a pair, not a thousands separator
    ("5.0", "5"),
    ("5.00", "5"),
    ("2.50", "2.50"),
    ("1.05", "1.05"),
    ("50\\%", "50"),
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("\\$ 4.50", "4.50"),
    (".5", "0.5"),
    ("x = 3", "3"),
    ("2 \\pi r", "2\\pi r"),
    ("\\boxed{\\boxed{7}}", "7"),
    ("$\\sqrt2$", "\\sqrt{2}"),
    ("1\\,000", "1000"),
    ("3.", "3"),
])
def test_normalize_answer(raw, normalised):
    assert math_reward_lib.normalize_answer(raw) == normalised


# --------------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("answer, reference", [
    ("\\frac{1}{2}", "\\dfrac{1}{2}"),
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\{2, 1\\}", "\\{1,2\\}"),
    ("10\\text{ cm}", "10"),
    ("1,000", "1000"),
    ("5.0", "5"),
    ("30^\\circ", "30"),
    ("\\left[1, 3\\right)", "[1,3)"),
    ("\\pi r^2", "r^2\\pi"),
    ("y = 2x + 3", "y=2x+3"),
])
def test_equal_answers_score_one(answer, reference):
    assert math_reward_lib.math_reward(paper(answer), reference) == 1.0


@pytest.mark.parametrize("answer, reference", [
    ("3", "4"),
    ("\\frac{1}{3}", "0.33"),
    ("x^2", "x^3"),
    ("(1,2)", "(2,1)"),
    ("\\sqrt{2}", "2"),
    ("-5", "5"),
])
def test_different_answers_score_zero(answer, reference):
    assert math_reward_lib.math_reward(paper(answer), reference) == 0.0


def test_boxed_completion_against_boxed_reference():
    completion, reference = "thus \\boxed{\\tfrac{3}{4}}", "we get $\\boxed{0.75}$"
    assert math_reward_lib.math_reward(completion, reference) == 1.0


def test_no_answer_scores_zero():
    assert math_reward_lib.math_reward("I give up.", "4") == 0.0
    assert math_reward_lib.math_reward(paper(""), "4") == 0.0


def test_gold_answer_goes_first():
    # math-verify is not symmetric: an equation as gold accepts its right-hand side.
    assert math_reward_lib.answers_match("2x+3", "y=2x+3")


# ---------------------------------------------------------------------------- timeouts, threads

def test_a_hanging_check_times_out_and_the_pool_recovers():
    start = time.monotonic()
    assert not math_reward_lib.answers_match("2^{2^{2^{100}}}", "1", timeout_s=1.0)
    assert time.monotonic() - start < 3.0
    assert math_reward_lib.answers_match("0.25", "\\frac14")


def test_checks_run_in_threads():
    pairs = [(paper("0.5"), "\\frac{1}{2}"), (paper("3"), "4")] * 4
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: math_reward_lib.math_reward(*p), pairs))
    assert got == [1.0, 0.0] * 4


def _reward(pair):
    return math_reward_lib.math_reward(*pair)


def test_checks_run_in_daemonic_worker_processes():
    pairs = [(paper("0.5"), "\\frac{1}{2}"), (paper("x^2"), "x^3")]
    with multiprocessing.get_context("spawn").Pool(2) as pool:  # pool workers are daemonic
        assert pool.map(_reward, pairs) == [1.0, 0.0]


def test_batch_form_matches_one_by_one():
    completions = [paper("0.5"), paper("7"), "nothing"]
    references = ["\\frac12", "8", "1"]
    assert math_reward_lib.math_rewards(completions, references) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="one reference per completion"):
        math_reward_lib.math_rewards(completions, references[:2])


# ------------------------------------------------------------------------ exactness (issue 14)

# (answer, reference, expected score). Exact values are compared exactly, a float with a
# relative tolerance of about 1e-9; the first half are near misses a tolerance-based checker
# (math-verify rounds floats to 6 decimals and chops differences below ~1e-15) scores 1.0.
EXACTNESS_TABLE = [
    # near misses: 0.0
    ("1/2004!", "1/2006!", 0.0),
    ("10^{-20}", "10^{-21}", 0.0),
    ("1/3^{40}", "1/3^{41}", 0.0),
    ("e^{-50}", "e^{-51}", 0.0),
    ("0.333333", "1/3", 0.0),
    ("0.333333", "\\frac{1}{3}", 0.0),
    ("\\frac{1}{2^{100}}", "\\frac{1}{2^{101}}", 0.0),
    ("1+10^{-20}", "1", 0.0),
    ("\\sqrt{2}+10^{-20}", "\\sqrt{2}", 0.0),
    ("\\frac{\\sqrt{2}}{10^{20}}", "\\frac{\\sqrt{3}}{10^{20}}", 0.0),
    ("10^{-7}", "0", 0.0),
    ("\\frac{1}{2004!}", "0", 0.0),
    ("e^{-100}", "0", 0.0),
    ("0.0000001", "0", 0.0),
    ("0.000000000001", "0", 0.0),
    ("0.1234567", "0.1234568", 0.0),
    ("1.0000001", "1", 0.0),
    ("3.1415926", "\\pi", 0.0),
    ("2.7182818", "e", 0.0),
    ("1.414214", "\\sqrt{2}", 0.0),
    ("0.33333333", "\\frac{1}{3}", 0.0),
    ("-10^{-20}", "10^{-20}", 0.0),
    ("10^{20}+1", "10^{20}", 0.0),
    ("(10^{-20}, 1)", "(10^{-21}, 1)", 0.0),
    ("[0, 10^{-20}]", "[0, 10^{-21}]", 0.0),
    ("\\{10^{-20}, 2\\}", "\\{10^{-21}, 2\\}", 0.0),
    ("\\begin{pmatrix} 10^{-20} \\\\ 1 \\end{pmatrix}",
     "\\begin{pmatrix} 10^{-21} \\\\ 1 \\end{pmatrix}", 0.0),
    ("x+10^{-20}", "x", 0.0),
    ("y = x + 10^{-20}", "y = x", 0.0),
    # equal answers: 1.0
    ("1/2004!", "\\frac{1}{2004!}", 1.0),
    ("\\frac{2005 \\cdot 2006}{2006!}", "\\frac{1}{2004!}", 1.0),
    ("\\frac{2006!}{2006}", "2005!", 1.0),
    ("10^{-20}", "\\frac{1}{10^{20}}", 1.0),
    ("0.00000000000000000001", "10^{-20}", 1.0),
    ("3^{-40}", "1/3^{40}", 1.0),
    ("\\frac{1}{e^{50}}", "e^{-50}", 1.0),
    ("0.3333333333333333", "\\frac{1}{3}", 1.0),
    ("1.4142135623731", "\\sqrt{2}", 1.0),
    ("0.5", "\\frac{1}{2}", 1.0),
    ("\\frac{1}{2}", "0.5", 1.0),
    ("1.5", "\\frac{3}{2}", 1.0),
    ("0.1", "\\frac{1}{10}", 1.0),
    ("\\sqrt{18}", "3\\sqrt2", 1.0),
    ("\\sqrt{3+2\\sqrt{2}}", "1+\\sqrt{2}", 1.0),
    ("\\cos\\frac{\\pi}{3}", "\\frac{1}{2}", 1.0),
    ("2^{10}", "1024", 1.0),
    ("10\\text{ cm}", "10", 1.0),
    ("50\\%", "50", 1.0),
    ("30^\\circ", "30", 1.0),
    ("(10^{-20}, 1)", "(\\frac{1}{10^{20}}, 1)", 1.0),
    ("\\left[1, 3\\right)", "[1,3)", 1.0),
    ("\\{2, 1\\}", "\\{1,2\\}", 1.0),
    ("(x+1)^2", "x^2+2x+1", 1.0),
    ("0.5x", "\\frac{x}{2}", 1.0),
    ("0.1+0.2-0.3", "0", 1.0),
]


def test_exactness_table_is_large_and_half_near_misses():
    assert len(EXACTNESS_TABLE) >= 40
    assert sum(expected == 0.0 for _, _, expected in EXACTNESS_TABLE) >= len(EXACTNESS_TABLE) / 2


@pytest.mark.parametrize("answer, reference, expected", EXACTNESS_TABLE)
def test_exactness_table(answer, reference, expected):
    assert math_reward_lib.math_reward(paper(answer), reference) == expected
