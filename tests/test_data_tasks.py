"""Task datasets (math, mbpp, humaneval, gsm8k) on fixture files in the real formats, the
paper's prompts, and configs/tasks.py.

The code-reward checks run programs in the real bubblewrap sandbox, like
tests/test_rewards_code.py (bubblewrap must be installed; these tests fail without it).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from configs import tasks
from score_jax import data
from score_jax import prompts
from score_jax import rewards
from score_jax.data import gsm8k
from score_jax.data import mbpp
from score_jax.rewards import math as math_reward


def _no_network(*args, **kwargs):
    raise AssertionError("A dataset build tried to open a network connection.")


def _build(name, data_dir, manual_dir=None):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        return data.prepare(name, data_dir, manual_dir=manual_dir)


def _records(builder, split):
    return [{k: v.decode("utf-8") for k, v in r.items()} for r in builder.as_data_source(split)]


def _ids(builder, split):
    ids = [r["id"] for r in _records(builder, split)]
    assert len(ids) == len(set(ids))
    return set(ids)


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


# ----------------------------------------------------------------------------------------- MATH

def _problem(text, solution, level="Level 2", subject="Algebra"):
    return {"problem": text, "level": level, "type": subject, "solution": solution}


MATH_FILES = {
    "train/algebra/1.json": _problem("What is $2+3$?", "We add: $2+3=\\boxed{5}$."),
    "train/geometry/2.json": _problem(
        "A square has side 3. What is its area?", "The area is $3^2 = \\boxed{9}$.",
        "Level 1", "Geometry"),
    # The release has solutions like this: an empty box, so no reference answer.
    "train/number_theory/3.json": _problem(
        "How many primes lie strictly between $n!+1$ and $n!+n$?",
        "All are composite, so there are $\\boxed{}$ primes.", "Level 5", "Number Theory"),
    "test/precalculus/807.json": _problem(
        "Compute $\\cos 60^\\circ$.",
        "Since $\\cos 60^\\circ = \\boxed{1}$ is wrong, we note $\\cos 60^\\circ = "
        "\\boxed{\\frac{1}{2}}$.", "Level 1", "Precalculus"),
    "test/algebra/10.json": _problem("Solve $x+1=3$.", "So $x = \\boxed{2}$."),
    "test/counting_and_probability/5.json": _problem(
        "In how many ways can 3 books be ordered?", "There are $3! = \\boxed{6}$ ways.",
        "Level 2", "Counting & Probability"),
}
MATH500_IDS = ("test/precalculus/807.json", "test/algebra/10.json")


def _math500_rows(ids):
    problems = {i: MATH_FILES[i]["problem"] for i in MATH_FILES}
    return [{"problem": problems[i], "answer": "", "unique_id": i} for i in ids]


@pytest.fixture(scope="module")
def math_build(tmp_path_factory):
    """The Hendrycks layout inside a MATH/ folder (as MATH.tar extracts), plus math500.jsonl."""
    manual_dir = tmp_path_factory.mktemp("math_manual")
    for path, problem in MATH_FILES.items():
        _write_json(os.path.join(manual_dir, "MATH", path), problem)
    _write_jsonl(os.path.join(manual_dir, "math500.jsonl"), _math500_rows(MATH500_IDS))
    return _build("math", tmp_path_factory.mktemp("math_data"), manual_dir)


def test_math_splits_are_exact(math_build):
    assert _ids(math_build, "train") == {"train/algebra/1.json", "train/geometry/2.json"}
    assert _ids(math_build, "test") == {p for p in MATH_FILES if p.startswith("test/")}
    assert _ids(math_build, "math500") == set(MATH500_IDS)
    assert _ids(math_build, "test_minus_math500") == {"test/counting_and_probability/5.json"}
    assert _ids(math_build, "train+test_minus_math500") == {
        "train/algebra/1.json", "train/geometry/2.json", "test/counting_and_probability/5.json"}


def test_math_record_takes_the_last_boxed_answer(math_build):
    [record] = [r for r in _records(math_build, "math500") if r["id"].endswith("807.json")]
    source = MATH_FILES["test/precalculus/807.json"]
    assert record == {"id": "test/precalculus/807.json", "prompt": source["problem"],
                      "answer": "\\frac{1}{2}", "response": source["solution"],
                      "level": "Level 1", "type": "Precalculus"}
    assert math_reward.math_reward(record["response"], record["answer"]) == 1.0
    assert math_reward.math_reward("The final answer is $1$.", record["answer"]) == 0.0


def test_math_jsonl_layout_matches_math500_by_problem_text(tmp_path, caplog):
    """JSONL files without ids (as many copies of MATH are): MATH500 found by problem text."""
    for split in ("train", "test"):
        _write_jsonl(tmp_path / "manual" / f"{split}.jsonl",
                     [p for path, p in MATH_FILES.items() if path.startswith(split)])
    _write_jsonl(tmp_path / "manual" / "math500.jsonl", _math500_rows(MATH500_IDS))
    builder = _build("math", tmp_path / "data", tmp_path / "manual")
    assert _ids(builder, "train") == {"train/1", "train/2"}  # line 3 boxes no answer
    assert "MATH train: skipped 1 record(s) whose solution boxes no answer: " \
           f"{tmp_path}/manual/train.jsonl line 3" in caplog.text
    assert _ids(builder, "test") == {"test/1", "test/2", "test/3"}
    assert {r["prompt"] for r in _records(builder, "math500")} == {
        MATH_FILES[i]["problem"] for i in MATH500_IDS}
    assert [r["answer"] for r in _records(builder, "test_minus_math500")] == ["6"]


def _math_manual(root, files=MATH_FILES, math500=MATH500_IDS):
    for path, problem in files.items():
        _write_json(os.path.join(root, path), problem)
    _write_jsonl(os.path.join(root, "math500.jsonl"), _math500_rows(math500))
    return root


def test_math_malformed_records_fail_naming_the_file(tmp_path):
    broken = dict(MATH_FILES, **{"test/algebra/10.json": {"level": "Level 1", "solution": "x"}})
    manual_dir = _math_manual(tmp_path / "a", broken)
    with pytest.raises(ValueError, match=r"test/algebra/10\.json has no 'problem' field"):
        _build("math", tmp_path / "data_a", manual_dir)

    manual_dir = _math_manual(tmp_path / "b")
    with open(manual_dir / "math500.jsonl", "a") as f:
        f.write(json.dumps({"problem": "Not in MATH.", "unique_id": "test/algebra/99.json"}) + "\n")
    with pytest.raises(ValueError, match=r"math500\.jsonl line 3 lists 'test/algebra/99\.json', "
                                         r"which is not in the test split"):
        _build("math", tmp_path / "data_b", manual_dir)

    manual_dir = _math_manual(tmp_path / "c", math500=MATH500_IDS + MATH500_IDS[:1])
    with pytest.raises(ValueError, match=r"line 3 lists test record .*807\.json' again"):
        _build("math", tmp_path / "data_c", manual_dir)

    manual_dir = _math_manual(tmp_path / "d")
    (manual_dir / "math500.jsonl").write_text('{"unique_id": "test/algebra/10.json"\n')
    with pytest.raises(ValueError, match=r"math500\.jsonl line 1 is not valid JSON"):
        _build("math", tmp_path / "data_d", manual_dir)


def test_missing_manual_files_fail_before_any_work(tmp_path):
    manual_dir = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        _build("math", tmp_path / "data", manual_dir)
    message = str(e.value)
    assert f"manual_dir {manual_dir} (which does not exist)" in message
    assert "train/<subject>/<n>.json" in message and "math500.jsonl" in message
    assert not (tmp_path / "data").exists()

    _math_manual(tmp_path / "no500")
    os.remove(tmp_path / "no500" / "math500.jsonl")
    with pytest.raises(FileNotFoundError, match=r"; missing: math500\.jsonl\.$"):
        _build("math", tmp_path / "data", tmp_path / "no500")

    # Without manual_dir, the TFDS default under data_dir, named in the message.
    with pytest.raises(FileNotFoundError, match=f"manual_dir {tmp_path}/data/downloads/manual/"
                                                r"mbpp \(which does not exist\)"):
        _build("mbpp", tmp_path / "data")
    (tmp_path / "gsm").mkdir()
    _write_jsonl(tmp_path / "gsm" / "train.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(FileNotFoundError, match=r"test\.jsonl \(the official GSM8K files\) in "
                                                rf"manual_dir {tmp_path}/gsm, or set data.manual_dir "
                                                r"\(manual_dir= in Python\) to where they are; missing: "
                                                r"test\.jsonl\.$"):
        _build("gsm8k", tmp_path / "data", tmp_path / "gsm")


def test_prepare_rejects_a_manual_dir_for_builders_that_need_none(tmp_path):
    with pytest.raises(ValueError, match="'humaneval' reads no manual files"):
        data.prepare("humaneval", tmp_path, manual_dir=tmp_path)
    assert not data.needs_manual_dir("humaneval") and data.needs_manual_dir("math")


# ----------------------------------------------------------------------------------------- MBPP

def _mbpp_row(task_id, setup=""):
    return {"task_id": task_id, "text": f"Write a function f that returns {task_id}.",
            "code": f"def f():\r\n    return {task_id}", "test_setup_code": setup,
            "test_list": [f"assert f() == {task_id}", "assert f() + 1 > f()"],
            "challenge_test_list": []}


MBPP_ROWS = [_mbpp_row(1)] + [
    dict(task_id=e["task_id"], text=e["text"], code=e["code"], test_list=list(e["test_list"]),
         test_setup_code="", challenge_test_list=[]) for e in prompts.MBPP_EXAMPLES
] + [_mbpp_row(i) for i in (10, 11, 510, 511, 600, 601)] + [_mbpp_row(974, "N = 974")]


@pytest.fixture(scope="module")
def mbpp_build(tmp_path_factory):
    manual_dir = tmp_path_factory.mktemp("mbpp_manual")
    _write_jsonl(os.path.join(manual_dir, "mbpp.jsonl"), MBPP_ROWS)
    return _build("mbpp", tmp_path_factory.mktemp("mbpp_data"), manual_dir)


def test_mbpp_task_id_splits(mbpp_build):
    assert _ids(mbpp_build, "prompt") == {"1", "2", "3", "4", "10"}
    assert _ids(mbpp_build, "test") == {"11", "510"}
    assert _ids(mbpp_build, "validation") == {"511", "600"}
    assert _ids(mbpp_build, "train") == {"601", "974"}
    assert [mbpp.split_of(i) for i in (1, 10, 11, 510, 511, 600, 601, 974)] == [
        "prompt", "prompt", "test", "test", "validation", "validation", "train", "train"]


def test_mbpp_records_and_their_tests_run_in_the_sandbox(mbpp_build):
    records = {r["id"]: r for r in _records(mbpp_build, "prompt") + _records(mbpp_build, "train")}
    assert records["974"] == {
        "id": "974", "prompt": "Write a function f that returns 974.",
        "tests": "assert f() == 974\nassert f() + 1 > f()",
        "answer": "N = 974\nassert f() == 974\nassert f() + 1 > f()\n",
        "response": "def f():\n    return 974"}
    # Reference programs as a model would write them after the 3-shot prompt's [BEGIN].
    ids = ["2", "3", "4", "974"]
    completions = [records[i]["response"] + "\n[DONE]\nYou are an expert Python programmer"
                   for i in ids]
    answers = [records[i]["answer"] for i in ids]
    wrong = "def is_not_prime(n):\n    return False\n[DONE]"
    assert rewards.REWARDS["code"].score_batch(completions + [wrong], answers + [records["3"]["answer"]]) \
        == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_mbpp_malformed_records_fail_naming_file_and_line(tmp_path):
    for name, rows, message in [
        ("no_tests", MBPP_ROWS[:2] + [{k: v for k, v in _mbpp_row(12).items() if k != "test_list"}],
         r"mbpp\.jsonl line 3 has no 'test_list' field"),
        ("id_type", [dict(_mbpp_row(12), task_id="12")], r"line 1 field 'task_id' is str, not int"),
        ("id_zero", [_mbpp_row(0)], r"line 1 has task_id 0"),
        ("twice", [_mbpp_row(12), _mbpp_row(12)], r"split 'test' has two records with id '12'"),
    ]:
        _write_jsonl(tmp_path / name / "mbpp.jsonl", rows)
        with pytest.raises(ValueError, match=message):
            _build("mbpp", tmp_path / "data", tmp_path / name)


# ------------------------------------------------------------------------------------ HumanEval

@pytest.fixture(scope="module")
def humaneval_build(tmp_path_factory):
    return _build("humaneval", tmp_path_factory.mktemp("humaneval_data"))


def test_humaneval_is_the_packaged_164_and_its_answers_score_the_canonical_solution(
        humaneval_build):
    records = {r["id"]: r for r in _records(humaneval_build, "test")}
    assert set(records) == {f"HumanEval/{i}" for i in range(164)}
    first = records["HumanEval/0"]
    assert first["entry_point"] == "has_close_elements"
    assert first["prompt"].startswith("from typing import List\n\n\ndef has_close_elements(")
    assert first["answer"].endswith("\n\ncheck(has_close_elements)\n")
    chosen = [records["HumanEval/0"], records["HumanEval/100"]]
    completions = [f"```python\n{r['response']}```" for r in chosen]
    completions += [f"```python\n{r['prompt']}    pass\n```" for r in chosen]
    answers = [r["answer"] for r in chosen] * 2
    assert rewards.REWARDS["code"].score_batch(completions, answers) == [1.0, 1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------- GSM8K

GSM8K = {
    "train": [
        {"question": "Ann has 3 apples and buys 4. How many does she have?",
         "answer": "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
        {"question": "A car costs $1,000 and a bike $80. What do both cost?",
         "answer": "Together 1000 + 80 = <<1000+80=1080>>1080.\n#### 1,080"},
    ],
    "test": [{"question": "What is half of 10?", "answer": "10 / 2 = <<10/2=5>>5\n#### 5"}],
}


def test_gsm8k_records_and_final_answers(tmp_path):
    for split, rows in GSM8K.items():
        _write_jsonl(tmp_path / "manual" / f"{split}.jsonl", rows)
    builder = _build("gsm8k", tmp_path / "data", tmp_path / "manual")
    train = sorted(_records(builder, "train"), key=lambda r: r["id"])
    assert train == [
        {"id": "train/1", "prompt": GSM8K["train"][0]["question"], "answer": "7",
         "response": GSM8K["train"][0]["answer"]},
        {"id": "train/2", "prompt": GSM8K["train"][1]["question"], "answer": "1,080",
         "response": GSM8K["train"][1]["answer"]},
    ]
    assert _ids(builder, "test") == {"test/1"}
    paper_form = "Final Answer: The final answer is $1080$. I hope it is correct."
    assert math_reward.math_reward(paper_form, train[1]["answer"]) == 1.0
    assert gsm8k.final_answer("#### 3\nso\n####  -4 ") == "-4"
    # A finished build is reused as it is: its manual files are no longer needed.
    again = _build("gsm8k", tmp_path / "data", tmp_path / "gone")
    assert again.data_dir == builder.data_dir and _ids(again, "test") == {"test/1"}


def test_gsm8k_answer_without_final_line_fails(tmp_path):
    _write_jsonl(tmp_path / "manual" / "train.jsonl",
                 GSM8K["train"] + [{"question": "q", "answer": "It is 3."}])
    _write_jsonl(tmp_path / "manual" / "test.jsonl", GSM8K["test"])
    with pytest.raises(ValueError, match=r"train\.jsonl line 3 has no '#### <answer>' line"):
        _build("gsm8k", tmp_path / "data", tmp_path / "manual")


# -------------------------------------------------------------------------------------- prompts

MBPP_3SHOT_TEXT = """\
You are an expert Python programmer, and here is your task: Write a function to find the \
similar elements from the given two tuple lists. Your code should pass these tests:

assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)
assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)
assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)
[BEGIN]
def similar_elements(test_tup1, test_tup2):
  res = tuple(set(test_tup1) & set(test_tup2))
  return (res) \n[DONE]

You are an expert Python programmer, and here is your task: Write a python function to \
identify non-prime numbers. Your code should pass these tests:

assert is_not_prime(2) == False
assert is_not_prime(10) == True
assert is_not_prime(35) == True
[BEGIN]
import math
def is_not_prime(n):
    result = False
    for i in range(2,int(math.sqrt(n)) + 1):
        if n % i == 0:
            result = True
    return result
[DONE]

You are an expert Python programmer, and here is your task: Write a function to find the \
largest integers from a given list of numbers using heap queue algorithm. Your code should \
pass these tests:

assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] \n\
assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] \n\
assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]
[BEGIN]
import heapq as hq
def heap_queue_largest(nums,n):
  largest_nums = hq.nlargest(n, nums)
  return largest_nums
[DONE]

You are an expert Python programmer, and here is your task: Write a function f that returns \
974. Your code should pass these tests:

assert f() == 974
assert f() + 1 > f()
[BEGIN]
"""


def test_mbpp_prompt_is_the_standard_3_shot_text(mbpp_build):
    [record] = [r for r in _records(mbpp_build, "train") if r["id"] == "974"]
    assert prompts.render(prompts.MBPP_PROMPT, record) == MBPP_3SHOT_TEXT


def test_math_prompt_and_the_paper_instructions(math_build):
    [record] = [r for r in _records(math_build, "math500") if r["id"] == "test/algebra/10.json"]
    assert prompts.render(prompts.MATH_PROMPT, record) == (
        "You are a math expert. When you respond, respond only with the Solution of the final "
        "Problem, thinking step by step. At the end of the Solution, when you give your final "
        "answer, write it in the form \"Final Answer: The final answer is $answer$. I hope it "
        "is correct.\"\n\nProblem:\nSolve $x+1=3$.\n\nSolution:")
    assert prompts.MATH_CORRECTION == (
        "There might be an error in the solution above because of lack of understanding of the "
        "question. Please correct the error, if any, and rewrite the solution. Only output the "
        "final solution! At the end of the Solution, when you give your final answer, write it "
        "in the form \"Final Answer: The final answer is $answer$. I hope it is correct.\"")
    assert prompts.CODE_CORRECTION == (
        "There might be an error in the code above because of lack of understanding of the "
        "question. Please correct the error, if any, and rewrite the solution. Only output the "
        "final correct Python program!")
    assert prompts.TOY_CORRECTION == (
        "There might be an error in the solution above. Please correct the error, if any, and "
        "rewrite the solution. End with the line Answer: <integer>.")
    # A completion in the form the instructions ask for scores through the math reward.
    completion = "x = 2.\nFinal Answer: The final answer is $2$. I hope it is correct."
    assert rewards.REWARDS["math"].score(completion, record["answer"]) == 1.0


def test_humaneval_prompt(humaneval_build):
    record = _records(humaneval_build, "test")[0]
    text = prompts.render(prompts.HUMANEVAL_PROMPT, record)
    assert text.startswith("Complete the following Python function.")
    assert text.endswith("\n\n```python\n" + record["prompt"] + "```")


def test_render_fills_text_fields_and_names_a_missing_one():
    template = "{prompt} | {tests}"
    assert prompts.render(template, {"prompt": b"caf\xc3\xa9", "tests": "t", "x": 1}) == "café | t"
    with pytest.raises(ValueError, match=r"Template field \{tests\} is not in the record \(it "
                                         r"has \['answer', 'prompt'\]\)"):
        prompts.render(template, {"prompt": "p", "answer": "a"})
    with pytest.raises(ValueError, match=r"\{prompt\[0\]\} is not a plain field name"):
        prompts.render("{prompt[0]}", {"prompt": "p"})
    with pytest.raises(ValueError, match="Field 'prompt' of the record is int, not text"):
        prompts.render("{prompt}", {"prompt": 3})
    with pytest.raises(ValueError, match=r"Template field \{tests\} is not in record 7"):
        prompts.render(template, {"prompt": "p"}, 7)
    assert prompts.render("{{literal}} {prompt}", {"prompt": "p"}) == "{literal} p"


# ---------------------------------------------------------------------------------------- tasks

FIELDS = {"dataset", "train_split", "eval_split", "reward", "prompt_template", "correction",
          "manual_dir", "max_prompt_len", "max_new_tokens"}


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_task_configs_name_real_builders_rewards_and_fields(name):
    task = tasks.get(name)
    assert set(task.keys()) == FIELDS
    assert task.dataset in data.BUILDERS and task.reward in rewards.REWARDS
    assert bool(task.manual_dir) == data.needs_manual_dir(task.dataset)
    assert task.max_prompt_len > 0 and task.max_new_tokens > 0
    assert task.correction and "{" not in task.correction


def test_task_splits_and_templates_work_on_the_builds(math_build, mbpp_build, humaneval_build):
    builds = {"math": math_build, "mbpp": mbpp_build, "humaneval": humaneval_build}
    for name, builder in builds.items():
        task = tasks.get(name)
        for split in filter(None, (task.train_split, task.eval_split)):
            records = _records(builder, split)
            assert records, (name, split)
            assert prompts.render(task.prompt_template, records[0])
    assert tasks.get("gsm8k").prompt_template == prompts.MATH_PROMPT
    assert (tasks.get("toy").train_split, tasks.get("toy").eval_split) == ("train", "test")
    with pytest.raises(ValueError, match=r"Unknown task 'nope'; choose one of \['gsm8k'"):
        tasks.get("nope")


def test_task_configs_import_no_jax():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys; import configs.tasks; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
