"""The CPU toy task: integer arithmetic with short step-by-step solutions, as a TFDS builder.

Each example is a dict of five texts:
    prompt   "What is 47 + 85?"
    response "7+5=12, write 2 carry 1\n4+8+1=13, write 13\nAnswer: 132"
    answer   "132"
    attempt1, attempt2   the toy base model's two attempts (its two-turn SFT targets): attempt 1
             forgets the carry / borrow of 1 in its first such column with probability 0.85
             ("4+8+1=12, write 12" ... "Answer: 122"); attempt 2 copies it or revises it,
             fixing a slip or slipping, independently of attempt 1 being right (see `attempts`)

Problems (since 2.0.0) are addition and subtraction of two 2-digit numbers in equal shares
(results may be negative); `solve` also writes 2-3 digit problems and multiplication by a
digit, which the builder no longer draws. The solution works one place value at a time (ones
first) and its last line is exactly `Answer: <integer>` (the format of
score_jax/rewards/toy.py, which scores it). A ~1M-parameter model pre-trained for a
few minutes gets ~98% of them right, so the base model's first-attempt errors are its taught
slips, which it can see (one line) and fix.

Everything is generated offline from a seed: the same seed and sizes give byte-identical
array_record files. Test and dev problems are each distinct, no problem is in both, and no
train problem appears in test or dev. Building also trains the toy sentencepiece tokenizer on
the train split and stores it as `tokenizer.model` in the dataset's directory, next to the
array_record files.
"""

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import example_serializer

from score_jax import chat, prompts
from score_jax import tokenizer
from score_jax.rewards import toy as toy_reward_lib

TOKENIZER_FILE = "tokenizer.model"
DEFAULT_SEED = 0
DEFAULT_TRAIN_SIZE = 20_000
DEFAULT_TEST_SIZE = 2_000
DEFAULT_VOCAB_SIZE = 256
DEFAULT_DEV_SIZE = 1_000  # since 2.0.0: a dev split, distinct from train and test
# The base model's attempts (see `attempts`): attempt 1 forgets the carry / borrow in the
# first column that takes exactly 1 with probability SLIP_RATE; attempt 2 revises with
# probability REVISE_RATES[tens digit of a is odd], else copies attempt 1.
DEFAULT_SLIP_RATE = 0.85
REVISE_RATES = (0.2, 0.8)
# The one-line slip of each operator ("forgot the carry / borrow"): the column's result is off by this.
SLIP_DELTA = {"+": -1, "-": 1, "*": -1}

# Characters the toy tokenizer always holds, so printable ASCII text encodes losslessly.
PRINTABLE_ASCII = "".join(map(chr, range(33, 127)))  # Space is always a piece.
_OPS = ("+", "-", "*")


# ----------------------------------------------------------------------------- solutions


def _digits(n: int, width: int) -> list[int]:
    """Digits of n >= 0, ones first, zero-padded to `width`."""
    return [(n // 10**i) % 10 for i in range(width)]


# A slip is (column, delta): that column's result is off by delta (+1 or -1) and the solution
# carries on consistently from the wrong line, so the error shows in one line only
# ("7+5=13, write 3 carry 1") and in the final answer. None = no slip.
Slip = tuple[int, int] | None


def _off(slip: Slip, column: int) -> int:
    return slip[1] if slip is not None and slip[0] == column else 0


def _add_steps(a: int, b: int, slip: Slip = None) -> tuple[list[str], int]:
    width = max(len(str(a)), len(str(b)))
    lines, carry, value = [], 0, 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
        total, d = x + y + carry, _off(slip, i)
        total = total + d if total + d >= 0 else total - d  # a slip never goes below 0
        expr = f"{x}+{y}" + ("+1" if carry else "")
        if i == width - 1:
            lines.append(f"{expr}={total}, write {total}")
            value += total * 10**i
        else:
            carry = total // 10
            lines.append(f"{expr}={total}, write {total % 10}" + (" carry 1" if carry else ""))
            value += (total % 10) * 10**i
    return lines, value


def _sub_steps(a: int, b: int, slip: Slip = None) -> tuple[list[str], int]:
    """Column subtraction for a >= b >= 0."""
    width = len(str(a))
    lines, borrow, value = [], 0, 0
    for i, (x, y) in enumerate(zip(_digits(a, width), _digits(b, width))):
        top = x - borrow
        borrow_out = int(top < y)
        diff = top + 10 * borrow_out - y
        d = _off(slip, i)
        diff = diff + d if 0 <= diff + d <= 9 else diff - d  # a slip stays a digit
        expr = f"{x + 10 * borrow_out}" + ("-1" if borrow else "") + f"-{y}"
        lines.append(f"{expr}={diff}, write {diff}" + (" borrow 1" if borrow_out else ""))
        value += diff * 10**i
        borrow = borrow_out
    return lines, value


def _mul_steps(a: int, d: int, slip: Slip = None) -> tuple[list[str], int]:
    width = len(str(a))
    lines, carry, value = [], 0, 0
    for i, x in enumerate(_digits(a, width)):
        total, off = x * d + carry, _off(slip, i)
        total = total + off if total + off >= 0 else total - off  # a slip never goes below 0
        expr = f"{x}*{d}" + (f"+{carry}" if carry else "")
        if i == width - 1:
            lines.append(f"{expr}={total}, write {total}")
            value += total * 10**i
        else:
            carry = total // 10
            lines.append(f"{expr}={total}, write {total % 10}" + (f" carry {carry}" if carry else ""))
            value += (total % 10) * 10**i
    return lines, value


def columns(op: str, a: int, b: int) -> int:
    """Number of column lines in the solution of `a op b` (where a slip can happen)."""
    if op == "-":
        return len(str(max(a, b)))
    return max(len(str(a)), len(str(b))) if op == "+" else len(str(a))


def solve(op: str, a: int, b: int, slip: Slip = None) -> tuple[str, str, str]:
    """Returns (prompt, response, answer) for `a op b`, with a, b >= 0 and op in "+-*".

    With a `slip` the response makes that one mistake and states the wrong result it leads
    to; `answer` is always the true result.
    """
    if op == "+":
        result = a + b
        lines, value = _add_steps(a, b, slip)
    elif op == "-":
        result = a - b
        if a >= b:
            lines, value = _sub_steps(a, b, slip)
        else:
            lines, value = _sub_steps(b, a, slip)
            lines, value = [f"{a}<{b}, so compute {b}-{a} and negate"] + lines, -value
    elif op == "*":
        result = a * b
        lines, value = _mul_steps(a, b, slip)
    else:
        raise ValueError(f"Unknown operator {op!r}; use one of {_OPS}.")
    lines.append(toy_reward_lib.answer_text(str(value)))  # the format the reward reads
    return f"What is {a} {op} {b}?", "\n".join(lines), str(result)


def carry_in_lines(op: str, a: int, b: int) -> list[int]:
    """Columns of `a op b`'s solution whose expression takes a carry or borrow of exactly 1
    (`4+8+1=13`, `15-1-7=7`, `4*6+1=25`): where the toy base model's attempt 1 slips. The same
    column arithmetic as `_add_steps`, `_sub_steps` (on max - min) and `_mul_steps`."""
    if op == "-":
        a, b = max(a, b), min(a, b)
    width = columns(op, a, b)
    xs = _digits(a, width)
    ys = _digits(b, width) if op != "*" else [b] * width
    cols, carry = [], 0
    for i, (x, y) in enumerate(zip(xs, ys)):
        if carry == 1:
            cols.append(i)
        carry = int(x - carry < y) if op == "-" else (x * y + carry if op == "*" else x + y + carry) // 10
    return cols


def slip_column(op: str, a: int, b: int) -> int | None:
    """The first column that takes a carry / borrow of exactly 1, or None."""
    cols = carry_in_lines(op, a, b)
    return cols[0] if cols else None


def revises(a: int) -> int:
    """1 iff the tens digit of `a` is odd: the base's attempt 2 then revises with probability
    REVISE_RATES[1], else REVISE_RATES[0]. Independent of whether attempt 1 is right."""
    return (a // 10) % 2


def attempts(op: str, a: int, b: int, rng: np.random.Generator, slip_rate: float = DEFAULT_SLIP_RATE,
             revise_rates: tuple[float, float] = REVISE_RATES) -> tuple[str, str]:
    """Two attempts at `a op b` as the toy *base* model should make them (its SFT targets).

    Attempt 1 is a careless solver with a habit: in the first column that takes a carry or
    borrow of exactly 1 it forgets it with probability `slip_rate` (the line shows it:
    `4+8+1=12`), and the rest follows consistently. The slip is a function of the problem
    (greedy decoding reproduces it), so the base's greedy and sampled first attempts agree.
    Attempt 2 revises with a probability that depends on the tens digit of `a` (see
    `revises`), not on attempt 1 being right, and otherwise copies attempt 1. A revision
    writes the true solution, so it fixes a slipped attempt 1 and, when attempt 1 was right,
    slips in the last column instead. So the base can see and fix its slips (one line to
    check) but revises without knowing when, and breaks more than it fixes when most first
    attempts are right: learning *when* to revise is what RL must add, while RL that only
    rewards attempt 1 can also just stop slipping (the paper's collapse).
    """
    right = solve(op, a, b)[1]
    col = slip_column(op, a, b)
    first = right
    if col is not None and rng.random() < slip_rate:
        first = solve(op, a, b, (col, SLIP_DELTA[op]))[1]
    if rng.random() >= revise_rates[revises(a)]:
        return first, first
    if first != right:
        return first, right
    return first, solve(op, a, b, (columns(op, a, b) - 1, SLIP_DELTA[op]))[1]


# Since 2.0.0 the problems are + and - of two 2-digit numbers: a few-minute toy model gets them
# near-perfect (multiplication, 2-3 digits by a digit, stayed at 32-57% greedy after 500 steps).
PROBLEM_OPS = ("+", "-")


def _sample_problem(rng: np.random.Generator) -> tuple[str, int, int]:
    op = PROBLEM_OPS[rng.integers(len(PROBLEM_OPS))]
    a, b = int(rng.integers(10, 100)), int(rng.integers(10, 100))
    return op, a, b


def _distinct(rng: np.random.Generator, size: int, seen: set, what: str) -> list[tuple[str, int, int]]:
    out = []
    for _ in range(100 * size + 1000):
        if len(out) == size:
            return out
        p = _sample_problem(rng)
        if p not in seen:
            seen.add(p)
            out.append(p)
    raise ValueError(f"Could not draw {size} distinct {what} problems; use a smaller size.")


def problems(seed: int, train_size: int, test_size: int,
             dev_size: int = DEFAULT_DEV_SIZE) -> dict[str, list[tuple[str, int, int]]]:
    """Returns {"train": [...], "test": [...], "dev": [...]} lists of (op, a, b), deterministic
    in all args.

    Test problems are drawn first and are unique, then dev problems (unique, none in test:
    held out from training for choosing hyperparameters); train problems may repeat but never
    appear in test or dev.
    """
    seen: set = set()
    test = _distinct(np.random.default_rng([seed, 0]), test_size, seen, "test")
    dev = _distinct(np.random.default_rng([seed, 3]), dev_size, seen, "dev") if dev_size else []
    train_rng = np.random.default_rng([seed, 1])
    train = []
    while len(train) < train_size:
        p = _sample_problem(train_rng)
        if p not in seen:
            train.append(p)
    out = {"train": train, "test": test}
    if dev_size:
        out["dev"] = dev
    return out


def examples(seed: int, train_size: int, test_size: int, slip_rate: float = DEFAULT_SLIP_RATE,
             revise_rates: tuple[float, float] = REVISE_RATES,
             dev_size: int = DEFAULT_DEV_SIZE) -> dict[str, list[dict[str, str]]]:
    """Returns {"train": [...], "test": [...], "dev": [...]} lists of {"prompt", "response",
    "answer", "attempt1", "attempt2"} dicts: the correct solution, and two attempts (see
    `attempts`)."""
    out = {}
    for stream, (split, ps) in enumerate(problems(seed, train_size, test_size, dev_size).items()):
        rng = np.random.default_rng([seed, 2, stream])
        rows = []
        for p in ps:
            row = dict(zip(("prompt", "response", "answer"), solve(*p)))
            row["attempt1"], row["attempt2"] = attempts(*p, rng, slip_rate, revise_rates)
            rows.append(row)
        out[split] = rows
    return out


def tokenizer_corpus(train_examples: list[dict[str, str]]) -> list[str]:
    """Texts the toy tokenizer is trained on.

    Each example as a two-turn episode in the toy template, so the correction instruction
    gets whole-word pieces.
    """
    return [chat.render_episode(chat.TOY, ex["prompt"], [ex["response"]] * 2, prompts.TOY_CORRECTION)
            for ex in train_examples]


# ----------------------------------------------------------------------------- TFDS builder


@contextlib.contextmanager
def sorted_feature_maps():
    """While active, TFDS serialises tf.Example feature maps in sorted key order.

    TFDS calls plain `SerializeToString()`, and protobuf orders map entries by a per-process
    hash seed, so the same records would get different bytes in different processes.
    """
    cls = example_serializer.ExampleSerializer
    original = cls.serialize_example

    def serialize_example(self, example):
        return self.get_tf_example(example).SerializeToString(deterministic=True)

    cls.serialize_example = serialize_example
    try:
        yield
    finally:
        cls.serialize_example = original


@dataclasses.dataclass(eq=False)
class ToyArithmeticConfig(tfds.core.BuilderConfig):
    """What a build generates; every field changes the data, so each lives in its own dir."""

    seed: int = DEFAULT_SEED
    train_size: int = DEFAULT_TRAIN_SIZE
    test_size: int = DEFAULT_TEST_SIZE
    vocab_size: int = DEFAULT_VOCAB_SIZE


def make_config(seed: int, train_size: int, test_size: int, vocab_size: int) -> ToyArithmeticConfig:
    """A config named after its fields, e.g. `seed0_train20000_test2000_vocab192`."""
    for field, value in (("train_size", train_size), ("test_size", test_size)):
        if value < 1:
            raise ValueError(f"{field} must be at least 1, got {value}.")
    name = f"seed{seed}_train{train_size}_test{test_size}_vocab{vocab_size}"
    return ToyArithmeticConfig(
        name=name, seed=seed, train_size=train_size, test_size=test_size, vocab_size=vocab_size
    )


class ToyArithmetic(tfds.core.GeneratorBasedBuilder):
    """TFDS builder `toy_arithmetic`: writes array_record splits train/test and tokenizer.model.

    Construct with `ToyArithmetic(data_dir=..., seed=..., train_size=..., test_size=...)`
    (or `config=` a `ToyArithmeticConfig`), then call `download_and_prepare()`; nothing is
    downloaded. Read with `as_data_source(split)`.
    """

    # TFDS's own lookup of this file imports `importlib_resources`, which tfds 4.9.10 declares
    # only for Python < 3.9; naming the file here skips that lookup.
    code_path = epath.Path(__file__)
    # The slip and copy rates are constants of a version: change them only with a new version.
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "Addition, subtraction, 2-3 digit by 1 digit multiplication.",
                     "1.1.0": "attempt1 / attempt2: the toy base model's two attempts (slip rate "
                              "0.3, copy rate 0.5; attempt 2 copies "
                              "or re-solves independently).",
                     "1.2.0": "attempt 2 copies or revises: fixes a slipped attempt 1, slips in a "
                              "correct one (see `attempts`).",
                     "2.0.0": "Addition and subtraction of two 2-digit numbers only (no "
                              "multiplication), so a pre-trained toy model is near-perfect; attempt 1 forgets the carry / borrow of 1 in its "
                              f"first such column with probability {DEFAULT_SLIP_RATE} (a function "
                              "of the problem, so greedy slips too); attempt 2 revises with "
                              f"probability {REVISE_RATES[1]} when the tens digit of a is odd, "
                              f"{REVISE_RATES[0]} otherwise, fixing a slip or slipping in the "
                              "last column (see `attempts`). A dev split of "
                              f"{DEFAULT_DEV_SIZE} problems, in neither train nor test."}
    BUILDER_CONFIGS = [
        make_config(DEFAULT_SEED, DEFAULT_TRAIN_SIZE, DEFAULT_TEST_SIZE, DEFAULT_VOCAB_SIZE)
    ]

    def __init__(
        self,
        *,
        seed: int | None = None,
        train_size: int | None = None,
        test_size: int | None = None,
        vocab_size: int | None = None,
        config: str | ToyArithmeticConfig | None = None,
        file_format: str = "array_record",
        **kwargs,
    ):
        fields = dict(seed=seed, train_size=train_size, test_size=test_size, vocab_size=vocab_size)
        if any(v is not None for v in fields.values()):
            if config is not None:
                raise ValueError("Pass either config or seed/train_size/test_size/vocab_size, not both.")
            base = self.BUILDER_CONFIGS[0]
            config = make_config(**{k: getattr(base, k) if v is None else v for k, v in fields.items()})
            known = {c.name for c in self.BUILDER_CONFIGS}
            config = config.name if config.name in known else config
        super().__init__(config=config, file_format=file_format, **kwargs)

    @property
    def tokenizer_path(self) -> str:
        """Path of the toy tokenizer written by `download_and_prepare`."""
        return os.path.join(os.fspath(self.data_dir), TOKENIZER_FILE)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` wants metadata files in a package dir.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "prompt": tfds.features.Text(),
                    "response": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    "attempt1": tfds.features.Text(),
                    "attempt2": tfds.features.Text(),
                }
            ),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        c = self.builder_config
        self._examples = examples(c.seed, c.train_size, c.test_size)
        return {split: self._generate_examples(exs) for split, exs in self._examples.items()}

    def _generate_examples(self, exs: list[dict[str, str]]) -> Iterator[tuple[int, dict[str, str]]]:
        yield from enumerate(exs)

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        with sorted_feature_maps():
            super()._download_and_prepare(dl_manager, download_config)
        # self.data_dir is TFDS's temporary directory here, renamed into place only on success,
        # so a dataset directory never lacks its tokenizer.
        tokenizer.train_sentencepiece(
            tokenizer_corpus(self._examples["train"]),
            self.tokenizer_path,
            vocab_size=self.builder_config.vocab_size,
            user_symbols=chat.TOY.special_pieces,
            required_chars=PRINTABLE_ASCII,
        )
