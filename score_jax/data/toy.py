"""The CPU toy task: integer arithmetic with short step-by-step solutions, as a TFDS builder.

Each example is a dict of five texts:
    prompt   "What is 347 + 85?"
    response "7+5=12, write 2 carry 1\n4+8+1=13, write 3 carry 1\n3+0+1=4, write 4\nAnswer: 432"
    answer   "432"
    attempt1, attempt2   the toy base model's two attempts (its two-turn SFT targets): attempt 1
             slips once with probability 0.3 ("4+8+1=14, write 4 carry 1" ... "Answer: 442"),
             attempt 2 copies it or revises it, fixing a slip or slipping (see `attempts`)

Problems are drawn in equal shares: addition and subtraction of two 2-3 digit numbers (results
may be negative), and multiplication of a 2-3 digit number by a digit 2-9. (Train holds a few
percent fewer multiplications than test: the 2-digit by 1-digit space has only 720 problems,
and those in test are excluded from train.) The solution works one
place value at a time (ones first) and its last line is exactly `Answer: <integer>` (the format
of score_jax/rewards/toy.py, which scores it). Short
two-digit problems are easy and three-digit ones with carries or borrows are harder, so a
few-million-parameter model learns the task in minutes but stays imperfect.

Everything is generated offline from a seed: the same seed and sizes give byte-identical
array_record files. Test problems are distinct from each other, and no train problem appears
in test. Building also trains the toy sentencepiece tokenizer on the train split and stores it
as `tokenizer.model` in the dataset's directory, next to the array_record files.
"""

import contextlib
import dataclasses
import os
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
DEFAULT_SLIP_RATE = 0.3  # the base model's attempts: see `attempts`
DEFAULT_COPY_RATE = 0.5

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


def attempts(op: str, a: int, b: int, rng: np.random.Generator, slip_rate: float,
             copy_rate: float) -> tuple[str, str]:
    """Two attempts at `a op b` as the toy *base* model should make them (its SFT targets).

    Attempt 1 makes one slip with probability `slip_rate`. Attempt 2 copies attempt 1 with
    probability `copy_rate`; otherwise it revises it: a slipped attempt 1 is corrected (the
    true solution), a correct one is changed by a new slip. So the base model knows how to
    find and fix a slip, but revises without knowing whether it should: it breaks correct
    first attempts more often than it fixes wrong ones (with the defaults, 35% of all
    attempts broken against 15% fixed, Delta = -20 points). That is the situation SCoRe
    starts from (the paper's base model fixes 4.6% and breaks 15.8% of MATH500); learning
    when to revise is what RL must add.
    """
    def slipped() -> str:
        slip = (int(rng.integers(columns(op, a, b))), int(rng.choice((-1, 1))))
        return solve(op, a, b, slip)[1]

    right = solve(op, a, b)[1]
    first = slipped() if rng.random() < slip_rate else right
    if rng.random() < copy_rate:
        return first, first
    return first, right if first != right else slipped()


def _sample_problem(rng: np.random.Generator) -> tuple[str, int, int]:
    op = _OPS[rng.integers(len(_OPS))]
    ndigits_a = int(rng.integers(2, 4))
    a = int(rng.integers(10 ** (ndigits_a - 1), 10**ndigits_a))
    if op == "*":
        b = int(rng.integers(2, 10))
    else:
        ndigits_b = int(rng.integers(2, 4))
        b = int(rng.integers(10 ** (ndigits_b - 1), 10**ndigits_b))
    return op, a, b


def problems(seed: int, train_size: int, test_size: int) -> dict[str, list[tuple[str, int, int]]]:
    """Returns {"train": [...], "test": [...]} lists of (op, a, b), deterministic in all args.

    Test problems are drawn first and are unique; train problems may repeat but never
    appear in test.
    """
    test_rng = np.random.default_rng([seed, 0])
    test, seen = [], set()
    for _ in range(100 * test_size + 1000):
        if len(test) == test_size:
            break
        p = _sample_problem(test_rng)
        if p not in seen:
            seen.add(p)
            test.append(p)
    else:
        raise ValueError(f"Could not draw {test_size} distinct test problems; use a smaller test_size.")
    train_rng = np.random.default_rng([seed, 1])
    train = []
    while len(train) < train_size:
        p = _sample_problem(train_rng)
        if p not in seen:
            train.append(p)
    return {"train": train, "test": test}


def examples(seed: int, train_size: int, test_size: int, slip_rate: float = DEFAULT_SLIP_RATE,
             copy_rate: float = DEFAULT_COPY_RATE) -> dict[str, list[dict[str, str]]]:
    """Returns {"train": [...], "test": [...]} lists of {"prompt", "response", "answer",
    "attempt1", "attempt2"} dicts: the correct solution, and two attempts (see `attempts`)."""
    out = {}
    for stream, (split, ps) in enumerate(problems(seed, train_size, test_size).items()):
        rng = np.random.default_rng([seed, 2, stream])
        rows = []
        for p in ps:
            row = dict(zip(("prompt", "response", "answer"), solve(*p)))
            row["attempt1"], row["attempt2"] = attempts(*p, rng, slip_rate, copy_rate)
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
    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "Addition, subtraction, 2-3 digit by 1 digit multiplication.",
                     "1.1.0": "attempt1 / attempt2: the toy base model's two attempts (slip rate "
                              f"{DEFAULT_SLIP_RATE}, copy rate {DEFAULT_COPY_RATE}; attempt 2 copies "
                              "or re-solves independently).",
                     "1.2.0": "attempt 2 copies or revises: fixes a slipped attempt 1, slips in a "
                              "correct one (see `attempts`)."}
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
