"""The toy_arithmetic builder: offline, deterministic, disjoint splits, correct answers."""

import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from score_jax import chat
from score_jax import data, prompts
from score_jax import tokenizer
from score_jax.data import toy
from score_jax.rewards import toy as toy_reward_lib

TRAIN, TEST = 300, 60
_PROMPT = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")


def _no_network(*args, **kwargs):
    raise AssertionError("The toy build tried to open a network connection.")


def _build(root, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        return data.prepare("toy_arithmetic", root, seed=seed, train_size=TRAIN, test_size=TEST)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two builds with seed 7 in separate fresh directories, and one with seed 8."""
    return (
        _build(tmp_path_factory.mktemp("a"), 7),
        _build(tmp_path_factory.mktemp("b"), 7),
        _build(tmp_path_factory.mktemp("c"), 8),
    )


def _records(builder, split):
    return [
        {k: v.decode("utf-8") for k, v in r.items()} for r in builder.as_data_source(split)
    ]


def _bytes(builder, filename):
    with open(os.path.join(builder.data_dir, filename), "rb") as f:
        return f.read()


def _record_files(builder):
    return sorted(f for f in os.listdir(builder.data_dir) if ".array_record" in f)


def test_builder_identity(builds):
    builder = builds[0]
    assert builder.name == "toy_arithmetic"
    assert str(builder.version) == "2.0.0"
    assert set(builder.info.features) == {"prompt", "response", "answer", "attempt1", "attempt2"}
    assert builder.info.splits["train"].num_examples == TRAIN
    assert builder.info.splits["test"].num_examples == TEST
    assert builder.info.splits["dev"].num_examples == toy.DEFAULT_DEV_SIZE
    assert _record_files(builder) == [
        "toy_arithmetic-dev.array_record-00000-of-00001",
        "toy_arithmetic-test.array_record-00000-of-00001",
        "toy_arithmetic-train.array_record-00000-of-00001",
    ]
    assert os.path.isfile(builder.tokenizer_path)
    assert os.path.dirname(builder.tokenizer_path) == os.fspath(builder.data_dir)


def test_same_seed_gives_identical_files(builds):
    a, b, _ = builds
    for name in _record_files(a) + [toy.TOKENIZER_FILE]:
        assert _bytes(a, name) == _bytes(b, name), name


def test_another_process_writes_identical_files(builds, tmp_path):
    """Protobuf map order is seeded per process, so this catches unsorted serialisation."""
    code = (
        "import sys; from score_jax import data; "
        f"data.prepare('toy_arithmetic', sys.argv[1], seed=7, train_size={TRAIN}, test_size={TEST})"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=root, capture_output=True)
    a = builds[0]
    other = os.path.join(tmp_path, os.path.relpath(a.data_dir, a.data_dir_root))
    for name in _record_files(a) + [toy.TOKENIZER_FILE]:
        with open(os.path.join(other, name), "rb") as f:
            assert f.read() == _bytes(a, name), name


def test_different_seed_differs(builds):
    a, _, c = builds
    for split in ("train", "test"):
        assert {r["prompt"] for r in _records(a, split)} != {r["prompt"] for r in _records(c, split)}


def test_splits_disjoint_and_test_unique(builds):
    train = [r["prompt"] for r in _records(builds[0], "train")]
    test = [r["prompt"] for r in _records(builds[0], "test")]
    dev = [r["prompt"] for r in _records(builds[0], "dev")]
    assert len(set(test)) == len(test) and len(set(dev)) == len(dev)
    assert not set(train) & set(test) and not set(train) & set(dev) and not set(dev) & set(test)


@pytest.mark.parametrize("split", ["train", "test", "dev"])
def test_answers_are_true_results(builds, split):
    ops = set()
    for r in _records(builds[0], split):
        a, op, b = _PROMPT.match(r["prompt"]).groups()
        ops.add(op)
        a, b = int(a), int(b)
        truth = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert r["answer"] == str(truth)
        assert r["response"].splitlines()[-1] == f"Answer: {truth}"
        assert toy_reward_lib.toy_reward(r["response"], r["answer"])
        assert not toy_reward_lib.toy_reward(r["response"], str(truth + 1))
    assert ops == set(toy.PROBLEM_OPS) == {"+", "-"}


def test_examples_fit_token_budget(builds):
    tok = tokenizer.load(builds[0].data_dir)
    # The toy configs' lengths: configs/sft.py seq_len 64 (single turn), configs/demo.py's base
    # SFT seq_len 152 (two turns), configs/tasks.py max_prompt_len 16 and max_new_tokens 56.
    for split in ("train", "test", "dev"):
        for r in _records(builds[0], split):
            prompt = chat.TOY.first_prompt(r["prompt"])
            text = prompt + chat.TOY.response(r["response"])
            ids = tok.encode(text)
            assert len(ids) <= 64 and len(tok.encode(prompt)) <= 16
            assert tok.decode(ids) == text
            for attempt in (r["response"], r["attempt1"], r["attempt2"]):
                assert len(tok.encode(attempt)) < 56
            episode = chat.render_episode(chat.TOY, r["prompt"], [r["attempt1"], r["attempt2"]], prompts.TOY_CORRECTION)
            assert len(tok.encode(episode)) <= 152


def test_prepare_is_idempotent(builds):
    builder = builds[0]
    root = os.fspath(builder.data_dir_root)
    before = {f: os.stat(os.path.join(builder.data_dir, f)).st_mtime_ns for f in os.listdir(builder.data_dir)}
    again = data.prepare("toy_arithmetic", root, seed=7, train_size=TRAIN, test_size=TEST)
    assert os.fspath(again.data_dir) == os.fspath(builder.data_dir)
    after = {f: os.stat(os.path.join(builder.data_dir, f)).st_mtime_ns for f in os.listdir(builder.data_dir)}
    assert before == after


def test_prepare_rejects_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
        data.prepare("nope", tmp_path)


def test_solve_writes_place_value_steps():
    assert toy.solve("+", 347, 85) == (
        "What is 347 + 85?",
        "7+5=12, write 2 carry 1\n4+8+1=13, write 3 carry 1\n3+0+1=4, write 4\nAnswer: 432",
        "432",
    )
    assert toy.solve("-", 42, 305)[1] == (
        "42<305, so compute 305-42 and negate\n5-2=3, write 3\n10-4=6, write 6 borrow 1\n"
        "3-1-0=2, write 2\nAnswer: -263"
    )
    assert toy.solve("*", 47, 6)[1] == "7*6=42, write 2 carry 4\n4*6+4=28, write 28\nAnswer: 282"


def test_slips_change_one_line_and_the_answer_consistently():
    """A slip puts one column's result off by one; the rest follows from the wrong line."""
    assert toy.solve("+", 347, 85, slip=(1, 1))[1] == (
        "7+5=12, write 2 carry 1\n4+8+1=14, write 4 carry 1\n3+0+1=4, write 4\nAnswer: 442")
    assert toy.solve("*", 47, 6, slip=(0, -1))[1] == "7*6=41, write 1 carry 4\n4*6+4=28, write 28\nAnswer: 281"
    # A carry that the wrong sum creates is carried on: 9+0 = 10 writes 0 and carries 1.
    assert toy.solve("+", 19, 10, slip=(0, 1))[1] == "9+0=10, write 0 carry 1\n1+1+1=3, write 3\nAnswer: 30"
    # Subtraction stays a digit: 9 - 0 cannot slip up to 10, so it slips down.
    assert toy.solve("-", 59, 10, slip=(0, 1))[1].startswith("9-0=8, write 8")
    for op, a, b in (("+", 347, 85), ("-", 42, 305), ("*", 47, 6), ("+", 10, 90), ("-", 100, 99)):
        truth = int(toy.solve(op, a, b)[2])
        for column in range(toy.columns(op, a, b)):
            for delta in (-1, 1):
                _, response, answer = toy.solve(op, a, b, slip=(column, delta))
                assert int(answer) == truth  # the reference stays the true result
                assert int(toy_reward_lib.extract_answer(response)) != truth, (op, a, b, column, delta)
                clean = toy.solve(op, a, b)[1].splitlines()
                changed = [i for i, (x, y) in enumerate(zip(response.splitlines(), clean)) if x != y]
                assert changed[-1] == len(clean) - 1  # the answer line


def test_base_attempts_revise_without_knowing_when():
    exs = toy.examples(seed=5, train_size=6000, test_size=10, dev_size=10)["train"]
    probs = [tuple(_PROMPT.match(e["prompt"]).groups()) for e in exs]
    probs = [(op, int(a), int(b)) for a, op, b in probs]
    right1 = np.array([toy_reward_lib.toy_reward(e["attempt1"], e["answer"]) for e in exs]).astype(bool)
    right2 = np.array([toy_reward_lib.toy_reward(e["attempt2"], e["answer"]) for e in exs]).astype(bool)
    copies = np.array([e["attempt1"] == e["attempt2"] for e in exs])
    can_slip = np.array([toy.slip_column(*p) is not None for p in probs])
    odd = np.array([toy.revises(p[1]) for p in probs]).astype(bool)
    # Attempt 1 slips only where a column takes a carry / borrow of 1, at the slip rate there.
    assert right1[~can_slip].all()
    assert abs((1 - right1[can_slip].mean()) - toy.DEFAULT_SLIP_RATE) < 0.03
    # The slip forgets the carry / borrow in the first such column: one written line changes.
    for e, p, r1 in zip(exs[:400], probs, right1):
        if not r1:
            assert e["attempt1"] == toy.solve(*p, (toy.slip_column(*p), toy.SLIP_DELTA[p[0]]))[1]
    # Attempt 2 revises at a rate set by the tens digit of a, not by attempt 1 being right.
    lo, hi = toy.REVISE_RATES
    assert abs((~copies[odd]).mean() - hi) < 0.03 and abs((~copies[~odd]).mean() - lo) < 0.03
    assert abs((~copies[right1]).mean() - (~copies[~right1]).mean()) < 0.05
    # A revision fixes every slipped first attempt and breaks every correct one.
    assert (right2[~right1 & ~copies]).all() and not right2[right1 & ~copies].any()
    assert (~right1 & right2).mean() < (right1 & ~right2).mean()  # Delta < 0
    # A revision of a correct attempt differs from it in the last column's line and the answer.
    for e, r1, same in zip(exs[:300], right1, copies):
        if r1 and not same:
            diff = [x != y for x, y in zip(e["attempt1"].splitlines(), e["attempt2"].splitlines())]
            assert sum(diff[:-1]) == 1 and diff[-2] and diff[-1]
