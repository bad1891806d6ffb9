"""Both tokenizer backends: the toy sentencepiece model round-trips its corpus; foreign
sentencepiece models load by id; tokenizer.json checkpoints (Gemma, Llama 3, Qwen layouts) read
their special ids from the checkpoint files."""

import functools
import io
import json

import pytest
import sentencepiece as spm
import tokenizers

from score_jax import chat
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
        corpus[1], path, vocab_size=256, user_symbols=chat.TOY.special_pieces,
        required_chars=toy.PRINTABLE_ASCII,
    )
    return path


def test_round_trip_on_corpus(corpus, toy_model):
    tok = tokenizer.load(toy_model)
    exs, texts = corpus
    held_out = [
        chat.TOY.first_prompt(e["prompt"]) + e["response"] + chat.TOY.model_end for e in exs["test"]
    ]
    ascii_text = toy.PRINTABLE_ASCII + "\n two  spaces\n\n trailing "
    for text in texts + held_out + [ascii_text]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text


def test_special_ids_and_symbols(toy_model):
    tok = tokenizer.load(toy_model)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.vocab_size <= 256
    for piece in chat.TOY.special_pieces + ("\n",):
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
        corpus[1], again, vocab_size=256, user_symbols=chat.TOY.special_pieces,
        required_chars=toy.PRINTABLE_ASCII,
    )
    assert again.read_bytes() == toy_model.read_bytes()


def test_load_directory_or_file(toy_model):
    by_dir = tokenizer.load(toy_model.parent)
    by_file = tokenizer.load(str(toy_model))
    assert by_dir.encode("What is 1 + 2?") == by_file.encode("What is 1 + 2?")


def test_missing_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has neither tokenizer.model nor tokenizer.json"):
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


# ----------------------------------------------------------------------------- tokenizer.json
#
# Checkpoints laid out as on the Hugging Face hub: tokenizer.json (a small BPE trained here with
# the family's normaliser, pre-tokeniser and decoder, and its special tokens at their real ids
# and strings), tokenizer_config.json, generation_config.json and config.json declaring them as
# the real checkpoints do (Gemma 3 it, Llama 3.1 Instruct, Qwen2.5 Instruct).

BPE_TEXT = [
    "What is 2+2? The answer is 4. Solve 12 + 30 = 42 step by step.",
    "There might be an error in the solution above. Please correct the error, if any.",
    "user model assistant system\n\n  indented line\n\ttab Final Answer: $\\frac{1}{2}$",
] * 20

_LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
                    128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>",
                    128009: "<|eot_id|>", 128010: "<|python_tag|>"}
# The pre-tokeniser regexes of Llama 3 and Qwen2 (they differ in how many digits stay together).
_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

FAMILIES = {
    "gemma": dict(
        pipeline="sentencepiece",
        specials={0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>"},
        tokenizer_config={"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                          "pad_token": "<pad>", "unk_token": "<unk>"},
        generation_config={"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0},
        config={"model_type": "gemma3_text", "vocab_size": 262144, "bos_token_id": 2, "eos_token_id": [1, 106],
                "pad_token_id": 0},
        bos_piece="<bos>",
    ),
    "llama3": dict(
        pipeline=_SPLIT % "{1,3}",
        # Every id from 128000 to 128255 is special; the unnamed ones are reserved.
        specials={i: _LLAMA3_SPECIALS.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, 128256)},
        tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                          "eos_token": "<|eot_id|>"},  # no pad_token
        generation_config={"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
        config={"model_type": "llama", "vocab_size": 128256, "bos_token_id": 128000,
                "eos_token_id": [128001, 128008, 128009]},
        bos_piece="<|begin_of_text|>",
    ),
    "qwen": dict(
        pipeline=_SPLIT % "",
        specials={151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"},
        tokenizer_config={"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                          "pad_token": "<|endoftext|>"},
        generation_config={"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643},
        config={"model_type": "qwen2", "vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151645},
        bos_piece=None,  # Qwen never prepends a bos token
    ),
}


def _bpe(family, vocab=None, merges=None):
    """An (untrained if no vocab) BPE tokenizer with `family`'s text pipeline."""
    pipeline = FAMILIES[family]["pipeline"]
    if pipeline == "sentencepiece":  # Gemma: spaces as "▁", unknown characters as byte pieces
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True,
                                                         fuse_unk=True))
        tok.normalizer = tokenizers.normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Split(" ", "merged_with_previous")
        tok.decoder = tokenizers.decoders.Sequence([
            tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()])
    else:  # Llama 3, Qwen: byte-level BPE after a regex split (Qwen also NFC-normalises)
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
        if family == "qwen":
            tok.normalizer = tokenizers.normalizers.NFC()
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(pipeline), "isolated"),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = tokenizers.decoders.ByteLevel()
    return tok


@functools.cache
def _tokenizer_json(family):
    """`family`'s tokenizer.json text (built once per test session)."""
    spec = FAMILIES[family]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, show_progress=False)
    if spec["pipeline"] != "sentencepiece":
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=400, show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok = _bpe(family)
    tok.train_from_iterator(BPE_TEXT, trainer)
    model = json.loads(tok.to_str())["model"]
    trained = sorted(model["vocab"], key=model["vocab"].get)
    if spec["pipeline"] == "sentencepiece":
        trained += [f"<0x{b:02X}>" for b in range(256)]
    specials = spec["specials"]
    # Specials at their ids; the trained tokens fill the other ids in order, unreachable
    # fillers the rest (Llama 3's and Qwen's specials sit after >128k ordinary tokens).
    size = max(max(specials) + 1, len(trained) + len(specials))
    fill = iter(trained)
    vocab = {specials[i] if i in specials else next(fill, f"<filler_{i}>"): i for i in range(size)}
    tok = _bpe(family, vocab, [tuple(m) for m in model["merges"]])
    tok.add_special_tokens([tokenizers.AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])
    if spec["bos_piece"]:  # like the real files: encoding with special tokens prepends bos
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{spec['bos_piece']} $A", special_tokens=[(spec["bos_piece"], tok.token_to_id(spec["bos_piece"]))])
    return tok.to_str()


def write_checkpoint(directory, family, chat_template=None, files=("tokenizer_config", "generation_config", "config")):
    """Writes `family`'s tokenizer.json and the config `files` into `directory` (with
    `chat_template` in tokenizer_config.json) and returns the directory."""
    spec = FAMILIES[family]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(_tokenizer_json(family), encoding="utf-8")
    contents = {"tokenizer_config": dict(spec["tokenizer_config"]),
                "generation_config": spec["generation_config"], "config": spec["config"]}
    if chat_template is not None:
        contents["tokenizer_config"]["chat_template"] = chat_template
    for name in files:
        (directory / f"{name}.json").write_text(json.dumps(contents[name], indent=2))
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: write_checkpoint(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def json_toks(checkpoints):
    """Family -> its checkpoint's tokenizer, loaded from the directory."""
    return {family: tokenizer.load(directory) for family, directory in checkpoints.items()}


def test_json_special_ids_follow_the_checkpoint_files(json_toks):
    gemma, llama, qwen = (json_toks[f] for f in ("gemma", "llama3", "qwen"))
    assert all(isinstance(t, tokenizer.HFTokenizer) for t in (gemma, llama, qwen))
    assert (gemma.pad_id, gemma.eos_id, gemma.bos_id, gemma.eos_ids) == (0, 1, 2, (1, 106))
    # Llama 3.1 Instruct: eos is <|eot_id|>; generation_config.json adds <|end_of_text|> and
    # <|eom_id|>; no pad is declared, so pad is eos.
    assert (llama.bos_id, llama.eos_id, llama.eos_ids) == (128000, 128009, (128009, 128001, 128008))
    assert llama.pad_id == llama.eos_id
    assert llama.vocab_size == 128256
    # Qwen2.5: tokenizer_config.json's bos_token is null; generation_config.json names <|endoftext|>.
    assert (qwen.bos_id, qwen.eos_id, qwen.eos_ids, qwen.pad_id) == (151643, 151645, (151645, 151643), 151643)
    assert qwen.vocab_size == 151646


def test_json_round_trips_text_and_adds_no_special_tokens(checkpoints, json_toks):
    texts = ["What is 2+2?", "  two  spaces\n\n\ttab\r\n", "Ünïcödé 你好 🙂 $\\frac{1}{2}$", "", "\n"]
    assert isinstance(tokenizer.load(checkpoints["gemma"] / "tokenizer.json"), tokenizer.HFTokenizer)
    for tok in json_toks.values():
        for text in texts:
            assert tok.decode(tok.encode(text)) == text
        ids = tok.encode("What is 2+2?")
        assert tok.bos_id not in ids and tok.eos_id not in ids
    raw = tokenizers.Tokenizer.from_file(str(checkpoints["llama3"] / "tokenizer.json"))
    assert raw.encode("What").ids[0] == 128000  # the file's post-processor would add bos; encode does not


def test_json_special_tokens_are_single_ids(json_toks):
    cases = {"gemma": {"<start_of_turn>": 105, "<end_of_turn>": 106, "<bos>": 2},
             "llama3": {"<|eot_id|>": 128009, "<|start_header_id|>": 128006, "<|begin_of_text|>": 128000},
             "qwen": {"<|im_start|>": 151644, "<|im_end|>": 151645, "<|endoftext|>": 151643}}
    for family, pieces in cases.items():
        tok = json_toks[family]
        for piece, i in pieces.items():
            assert tok.token_id(piece) == i
            assert tok.encode(f"a{piece}b") == tok.encode("a") + [i] + tok.encode("b")
        with pytest.raises(KeyError, match="is not a token of"):
            tok.token_id("<|no such token|>")


def test_json_decode_skips_declared_pad_only(json_toks):
    qwen = json_toks["qwen"]
    ids = qwen.encode("Answer: 5") + [qwen.token_id("<|im_end|>")]
    assert qwen.decode(ids + [qwen.pad_id, qwen.pad_id]) == "Answer: 5<|im_end|>"
    llama = json_toks["llama3"]  # pad falls back to <|eot_id|>, which is kept
    assert llama.decode(llama.encode("Answer: 5") + [llama.pad_id]) == "Answer: 5<|eot_id|>"


def test_json_reads_old_and_partial_configs(tmp_path):
    # Older tokenizer_config.json files spell tokens as AddedToken dicts.
    old = write_checkpoint(tmp_path / "old", "gemma", files=())
    (old / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"__type": "AddedToken", "content": "<bos>"},
         "eos_token": {"__type": "AddedToken", "content": "<end_of_turn>"}}))
    tok = tokenizer.load(old)
    assert (tok.bos_id, tok.eos_ids) == (2, (106,))
    # Only config.json: ids are read from it, an int eos included; no bos -> bos falls back to eos.
    bare = write_checkpoint(tmp_path / "bare", "gemma", files=("config",))
    (bare / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    tok = tokenizer.load(bare)
    assert (tok.eos_id, tok.eos_ids, tok.bos_id, tok.pad_id) == (1, (1,), 1, 1)


def test_json_config_errors(tmp_path):
    bad = write_checkpoint(tmp_path / "bad", "gemma", files=())
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match="names eos_token '</s>', which is not a token of"):
        tokenizer.load(bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match="declares no eos token"):
        tokenizer.load(bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    size = tokenizer.load(bad).vocab_size
    (bad / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, size]}))
    with pytest.raises(ValueError, match=f"declares eos_token_id {size}, outside the tokenizer's {size} ids"):
        tokenizer.load(bad)
    (bad / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        tokenizer.load(bad)


def test_load_picks_the_backend(toy_model, tmp_path):
    both = tmp_path / "gemma_both"
    write_checkpoint(both, "gemma")
    (both / "tokenizer.model").write_bytes(toy_model.read_bytes())
    assert isinstance(tokenizer.load(both), tokenizer.SentencePieceTokenizer)
    assert isinstance(tokenizer.load(both / "tokenizer.json"), tokenizer.HFTokenizer)
    assert isinstance(tokenizer.load(toy_model.parent), tokenizer.SentencePieceTokenizer)
    assert tokenizer.load(toy_model).eos_ids == (tokenizer.EOS_ID,)


def test_not_a_sentencepiece_model(tmp_path):
    # Llama 3's original/tokenizer.model is a tiktoken file: base64 token, space, rank.
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")
    with pytest.raises(ValueError, match="is not a sentencepiece model"):
        tokenizer.load(tmp_path)


def test_json_ignores_padding_and_truncation_in_the_file(tmp_path):
    directory = write_checkpoint(tmp_path / "padded", "gemma")
    raw = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    raw.enable_truncation(max_length=2)
    raw.enable_padding(length=64, pad_id=0, pad_token="<pad>")
    raw.save(str(directory / "tokenizer.json"))
    text = "Solve 3 + 5, then 7 + 9."
    tok = tokenizer.load(directory)
    assert len(raw.encode(text).ids) == 64  # what the file alone would do
    assert tok.decode(tok.encode(text)) == text and len(tok.encode(text)) > 2
