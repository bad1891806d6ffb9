"""Sentencepiece tokenizer: the toy model round-trips its corpus; foreign models load by id."""

import io

import pytest
import sentencepiece as spm

from score_jax import prompts
from score_jax import tokenizer
from score_jax.data import toy


@pytest.fixture(scope="module")
def corpus():
    exs = toy.examples(seed=3, train_size=400, test_size=50)
    return exs, toy.tokenizer_corpus(exs["train"])


@pytest.fixture(scope="module")
def toy_model(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tokenizer.train_sentencepiece(
        corpus[1], path, vocab_size=256, user_symbols=prompts.TOY_SYMBOLS,
        required_chars=toy.PRINTABLE_ASCII,
    )
    return path


def test_round_trip_on_corpus(corpus, toy_model):
    tok = tokenizer.load(toy_model)
    exs, texts = corpus
    held_out = [
        prompts.render_turn(e["prompt"]) + e["response"] + prompts.END_OF_TURN for e in exs["test"]
    ]
    ascii_text = toy.PRINTABLE_ASCII + "\n two  spaces\n\n trailing "
    for text in texts + held_out + [ascii_text]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text


def test_special_ids_and_symbols(toy_model):
    tok = tokenizer.load(toy_model)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.vocab_size <= 256
    for piece in prompts.TOY_SYMBOLS + ("\n",):
        assert tok.encode(piece) == [tok.token_id(piece)]
    assert tok.encode("12") == [tok.token_id("1"), tok.token_id("2")]  # digits split
    with pytest.raises(KeyError, match="not a piece"):
        tok.token_id("no such piece")


def test_decode_skips_pad_keeps_everything_else(toy_model):
    tok = tokenizer.load(toy_model)
    ids = tok.encode("Answer: 5") + [tok.token_id("<eot>")]
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == "Answer: 5<eot>"


def test_training_is_deterministic(corpus, toy_model, tmp_path):
    again = tmp_path / "again.model"
    tokenizer.train_sentencepiece(
        corpus[1], again, vocab_size=256, user_symbols=prompts.TOY_SYMBOLS,
        required_chars=toy.PRINTABLE_ASCII,
    )
    assert again.read_bytes() == toy_model.read_bytes()


def test_load_directory_or_file(toy_model):
    by_dir = tokenizer.load(toy_model.parent)
    by_file = tokenizer.load(str(toy_model))
    assert by_dir.encode("What is 1 + 2?") == by_file.encode("What is 1 + 2?")


def test_missing_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
        tokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer.load(tmp_path / "tokenizer.model")


def _foreign_model(path, **ids):
    """A tiny sentencepiece model with another family's special ids and default normalisation."""
    text = ["The quick brown fox jumps over the lazy dog.", "Solve 12 + 30 = 42."] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=60, model_type="bpe",
        minloglevel=2, num_threads=1, **ids,
    )
    path.write_bytes(model.getvalue())
    return path


def test_loads_llama_style_model(tmp_path):
    path = _foreign_model(tmp_path / "tokenizer.model", unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    tok = tokenizer.load(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == tok.eos_id  # No pad piece: pad with eos, masked by `valid`.
    assert tok.vocab_size == 60
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    assert tok.encode("fox")[0] != tok.bos_id  # encode adds no bos
    assert path.exists()


def test_loads_gemma_style_model(tmp_path):
    _foreign_model(tmp_path / "tokenizer.model", pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    tok = tokenizer.load(tmp_path / "tokenizer.model")
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.decode([0] + tok.encode("quick fox") + [0]) == "quick fox"
