"""One tokenizer interface over sentencepiece (`tokenizer.model`) and Hugging Face `tokenizer.json`.

`load(path)` takes a tokenizer file or a checkpoint directory and returns a `Tokenizer`:
`tokenizer.model` is read with sentencepiece (the toy tokenizer, Gemma, Llama 2), `tokenizer.json`
with the `tokenizers` library (Llama 3, Qwen). A directory holding both (Gemma and Llama 2
checkpoints ship both) is read with sentencepiece, the format those families were released in.
`train_sentencepiece` trains the small toy tokenizer; `score_jax.data.toy` calls it when it
builds the dataset.

Special ids come from the files, never from a family table:
- sentencepiece: the model file (toy pad=0, unk=1, bos=2, eos=3; Gemma pad=0, eos=1, bos=2;
  Llama 2 has no pad piece).
- tokenizer.json: each of bos/eos/pad is the first of `tokenizer_config.json`'s `bos_token` /
  `eos_token` / `pad_token` (a string, or an `{"content": ...}` dict in older files), then
  `generation_config.json`'s and `config.json`'s `*_token_id` (an int, or a list whose first
  entry is taken). `eos_ids` keeps every eos id any of the three files declares (Llama 3.1
  Instruct: <|eot_id|>, <|end_of_text|>, <|eom_id|>). Llama 3 declares no pad: pad_id is then
  eos_id (see `HFTokenizer.pad_id`). Qwen declares no bos in tokenizer_config.json and never
  prepends one; bos_id is then generation_config.json's (<|endoftext|>), or eos_id if no file
  names one; chat templates of such families set `bos=False`, so it is never written.

Text that contains a special token's string (e.g. "<|im_end|>") is encoded as that special id
by both backends (sentencepiece only for user-defined pieces), as Hugging Face does by default.
"""

import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import sentencepiece as spm
import tokenizers

SENTENCEPIECE_FILE = "tokenizer.model"
JSON_FILE = "tokenizer.json"
# Files of a Hugging Face checkpoint that declare special tokens, in the order they are read.
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"

# Fixed special ids of tokenizers trained here.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class TokenizerNotFoundError(FileNotFoundError, ValueError):
    """No tokenizer file where one was asked for. A ValueError too, so that main.py reports it
    in one line (and a FileNotFoundError, as callers caught before)."""


class Tokenizer(Protocol):
    """What the rest of score_jax needs from a tokenizer.

    `encode` adds no bos/eos. `decode` skips pad ids and stops at nothing: eos and turn
    markers are decoded like any other id (sentencepiece control pieces such as bos/eos
    decode to "", tokenizer.json special tokens to their text, e.g. "<|begin_of_text|>").
    `vocab_size` is one more than the largest id (a model's embedding may be larger: Qwen pads
    it). `eos_ids` lists every id the checkpoint declares as eos, `eos_id` first.
    """

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def eos_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, piece: str) -> int: ...


class SentencePieceTokenizer:
    """A `Tokenizer` over a sentencepiece model file (toy, Gemma, Llama 2 style)."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise TokenizerNotFoundError(f"No sentencepiece model at {path}; pass a tokenizer.model file.")
        with open(path, "rb") as f:
            proto = f.read()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as e:
            raise ValueError(
                f"{path} is not a sentencepiece model (Llama 3's original/tokenizer.model is tiktoken); "
                f"pass the checkpoint's {JSON_FILE} instead."
            ) from e
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

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The model file declares one eos id."""
        return (self.eos_id,)

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


def _read_config(directory: str, name: str) -> dict:
    """The JSON object in `directory/name`, or {} if the checkpoint has no such file."""
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = len(raw[raw.rfind(b"\n", 0, e.start) + 1:e.start].decode("utf-8")) + 1
        raise ValueError(f"{path} line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
                         "restore the checkpoint's original file.") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore the checkpoint's original file.") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a {type(value).__name__}, not a JSON object; restore the original file.")
    return value


def _as_ids(value) -> list[int]:
    """A config's `*_token_id` (None, an int, or a list of ints) as a list."""
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


class HFTokenizer:
    """A `Tokenizer` over a Hugging Face `tokenizer.json` (Llama 3, Qwen, or any fast tokenizer).

    Special ids are read from the checkpoint files next to `tokenizer.json` (module docstring).
    Padding and truncation configured in the file are turned off: callers pad and cut.
    """

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise TokenizerNotFoundError(f"No {JSON_FILE} at {path}; pass a tokenizer.json file or its directory.")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust library raises a bare Exception on bad files
            raise ValueError(f"{path} is not a tokenizer.json the tokenizers library can read ({e}); "
                             "restore the checkpoint's original file.") from e
        self._tok.no_padding()
        self._tok.no_truncation()
        self.path = path
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

        directory = os.path.dirname(path) or "."
        configs = [(name, _read_config(directory, name))
                   for name in (TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE, MODEL_CONFIG_FILE)]
        bos, eos, pad = (self._declared(configs, kind) for kind in ("bos", "eos", "pad"))
        if not eos:
            raise ValueError(f"{directory} declares no eos token in {TOKENIZER_CONFIG_FILE}, "
                             f"{GENERATION_CONFIG_FILE} or {MODEL_CONFIG_FILE}; add the model's eos_token "
                             f"to {TOKENIZER_CONFIG_FILE}.")
        self._eos_ids = tuple(dict.fromkeys(eos))
        self._bos_id = bos[0] if bos else self._eos_ids[0]
        self._pad_id = pad[0] if pad else None

    def _declared(self, configs: list[tuple[str, dict]], kind: str) -> list[int]:
        """Ids the checkpoint declares for `kind` ("bos", "eos", "pad"), in file order."""
        ids = []
        for name, config in configs:
            token = config.get(f"{kind}_token") if name == TOKENIZER_CONFIG_FILE else None
            if isinstance(token, dict):
                token = token.get("content")
            if token is not None:
                i = self._tok.token_to_id(str(token))
                if i is None:
                    raise ValueError(f"{name} names {kind}_token {token!r}, which is not a token of "
                                     f"{self.path}; use the tokenizer files of one checkpoint together.")
                ids.append(i)
            for i in _as_ids(config.get(f"{kind}_token_id")):
                if not 0 <= i < self._vocab_size:
                    raise ValueError(f"{name} declares {kind}_token_id {i}, outside the tokenizer's "
                                     f"{self._vocab_size} ids; use the tokenizer files of one checkpoint together.")
                ids.append(i)
        return ids

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        """The declared pad id; for checkpoints without one (Llama 3) the eos id.

        Padding is always marked separately (the data pipeline's `valid`), so reusing eos is
        safe; `decode` then skips nothing.
        """
        return self._pad_id if self._pad_id is not None else self.eos_id

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_ids[0]

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the bos/eos the file's post-processor would add."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included, with the declared pad id (if any) left out."""
        return self._tok.decode([int(i) for i in ids if i != self._pad_id], skip_special_tokens=False)

    def token_id(self, piece: str) -> int:
        """Id of the single token `piece` (e.g. "<|eot_id|>"); raises KeyError if it is not one."""
        i = self._tok.token_to_id(piece)
        if i is None:
            raise KeyError(f"{piece!r} is not a token of {self.path}; use a tokenizer that has it.")
        return i


def load(path: str | os.PathLike) -> Tokenizer:
    """Loads the tokenizer at `path`: a `tokenizer.model` or `tokenizer.json` file, or a
    checkpoint directory holding one (`tokenizer.model` wins if it holds both)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in (SENTENCEPIECE_FILE, JSON_FILE):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise TokenizerNotFoundError(_no_tokenizer_in(path))
    if not os.path.exists(path):
        raise TokenizerNotFoundError(
            f"Tokenizer {path} does not exist; pass a {SENTENCEPIECE_FILE} or {JSON_FILE} file or its directory."
        )
    if path.endswith(".json"):
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


def _no_tokenizer_in(directory: str, shown: int = 5) -> str:
    """The message for a directory without a tokenizer file: what it holds instead, and which
    subdirectory (if any: a parent of checkpoint directories) has one."""
    names = sorted(os.listdir(directory))
    if not names:
        holds = "it is empty"
    else:
        listed = [n + "/" * os.path.isdir(os.path.join(directory, n)) for n in names[:shown]]
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        holds = f"it holds {', '.join(listed)}{more}"
    message = f"Directory {directory} has neither {SENTENCEPIECE_FILE} nor {JSON_FILE} ({holds}); "
    for name in names:
        sub = os.path.join(directory, name)
        found = [f for f in (SENTENCEPIECE_FILE, JSON_FILE) if os.path.isfile(os.path.join(sub, f))]
        if found:
            return message + f"{sub} has {found[0]}: point config.tokenizer there."
    return message + "point config.tokenizer at the model's checkpoint directory or its tokenizer file."


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
