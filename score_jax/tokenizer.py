"""One tokenizer interface, backed by sentencepiece (a tokenizer.json backend can join later).

`load(path)` takes a `tokenizer.model` file, or a directory holding one, and returns a
`Tokenizer`. `train_sentencepiece` trains the small toy tokenizer; `score_jax.data.toy` calls
it when it builds the dataset.

Ids come from the model file: the toy tokenizer uses pad=0, unk=1, bos=2, eos=3; Gemma uses
pad=0, eos=1, bos=2; Llama 2 has no pad piece (see `SentencePieceTokenizer.pad_id`).
"""

import io
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import sentencepiece as spm

SENTENCEPIECE_FILE = "tokenizer.model"

# Fixed special ids of tokenizers trained here.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer(Protocol):
    """What the rest of score_jax needs from a tokenizer.

    `encode` adds no bos/eos. `decode` skips pad ids and stops at nothing: eos and turn
    markers are decoded like any other id (control ids such as bos/eos decode to "").
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, piece: str) -> int: ...


class SentencePieceTokenizer:
    """A `Tokenizer` over a sentencepiece model file (toy, Gemma, Llama 2 style)."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No sentencepiece model at {path}; pass a tokenizer.model file.")
        with open(path, "rb") as f:
            self._sp = spm.SentencePieceProcessor(model_proto=f.read())
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        """The model's pad id; for models without one (Llama 2) the eos id.

        Padding is always marked separately (the data pipeline's `valid`), so reusing eos is
        safe.
        """
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos or eos."""
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` with pad ids left out (only if the model has a pad piece)."""
        pad = self._sp.pad_id()
        return self._sp.decode([int(i) for i in ids if i != pad])

    def token_id(self, piece: str) -> int:
        """Id of the single piece `piece` (e.g. "<eot>"); raises KeyError if it is not one."""
        i = self._sp.piece_to_id(piece)
        if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
            raise KeyError(f"{piece!r} is not a piece of {self.path}; use a tokenizer that has it.")
        return i


def load(path: str | os.PathLike) -> Tokenizer:
    """Loads the tokenizer at `path`: a `tokenizer.model` file or a directory containing one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, SENTENCEPIECE_FILE)
        if not os.path.isfile(candidate):
            raise FileNotFoundError(
                f"Directory {path} has no {SENTENCEPIECE_FILE}; pass the tokenizer file itself "
                "or build the dataset that writes it."
            )
        path = candidate
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Tokenizer {path} does not exist; pass a {SENTENCEPIECE_FILE} file or its directory."
        )
    return SentencePieceTokenizer(path)


def train_sentencepiece(
    texts: Iterable[str],
    out_path: str | os.PathLike,
    vocab_size: int,
    user_symbols: Sequence[str] = (),
    required_chars: str = "",
) -> None:
    """Trains a small BPE sentencepiece model on `texts` and writes it to `out_path`.

    `vocab_size` is an upper bound: a corpus with few distinct strings yields fewer pieces.

    The result encodes text losslessly: decode(encode(s)) == s for any s over characters
    seen in `texts` or listed in `required_chars` (no normalisation, spaces and newlines kept, digits split one per
    token). Ids: pad=0, unk=1, bos=2, eos=3, then `user_symbols` and "\\n" as single pieces.
    Training is single-threaded, so the same texts give the same file.
    """
    symbols = list(dict.fromkeys([*user_symbols, "\n"]))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        user_defined_symbols=symbols,
        required_chars=required_chars,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=1,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    with open(out_path, "wb") as f:
        f.write(model.getvalue())
