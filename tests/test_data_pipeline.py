"""The grain SFT loader: arrays and masks, sharding, resumable state, and data errors."""

import collections
import json

import numpy as np
import pytest

from score_jax import data
from score_jax import chat
from score_jax import tokenizer
from score_jax.data import pipeline
from score_jax.data import toy

SEQ = 96


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(train data source, toy tokenizer) of a small toy_arithmetic build."""
    builder = data.prepare(
        "toy_arithmetic", tmp_path_factory.mktemp("tfds"), seed=1, train_size=200, test_size=20
    )
    return builder.as_data_source("train"), tokenizer.load(builder.data_dir)


@pytest.fixture(scope="module")
def unique_source():
    """An in-memory source of 96 records with distinct prompts, so rows identify records."""
    return [dict(zip(("prompt", "response", "answer"), toy.solve("+", 10 + i, 7))) for i in range(96)]


def _loader(source, tok, **kwargs):
    args = dict(seq_len=SEQ, global_batch_size=8, seed=0, shard_index=0, shard_count=1)
    return pipeline.sft_loader(source, tok, **{**args, **kwargs})


def _rows(batch):
    return [tuple(r) for r in batch["tokens"]]


def test_shapes_and_dtypes(built):
    source, tok = built
    batch = next(_loader(source, tok, global_batch_size=8, shard_count=2, shard_index=1))
    assert set(batch) == {"tokens", "loss_mask", "valid"}
    for v in batch.values():
        assert v.shape == (4, SEQ) and v.dtype == np.int32


def test_masks_mark_response_and_end_tokens(built):
    source, tok = built
    texts = {}
    for r in source:
        r = {k: v.decode() for k, v in r.items()}
        texts[chat.TOY.first_prompt(r["prompt"])] = r["response"]
    eot = tok.token_id(chat.TOY.model_end)
    batch = next(_loader(source, tok, global_batch_size=16))
    for tokens, mask, valid in zip(batch["tokens"], batch["loss_mask"], batch["valid"]):
        n = int(valid.sum())
        assert valid[:n].all() and not valid[n:].any()
        assert (tokens[n:] == tok.pad_id).all()
        assert tokens[0] == tok.bos_id and tokens[n - 1] == tok.eos_id and tokens[n - 2] == eot
        first = int(np.argmax(mask))
        assert mask[first:n].all() and not mask[:first].any() and not mask[n:].any()
        assert tokens[first - 1] == tok.token_id(chat.TOY.model_start)
        context = tok.decode(tokens[1:first])
        assert tok.decode(tokens[first:n]) == texts[context] + chat.TOY.model_end


def test_deterministic_and_seeded(built):
    source, tok = built
    a = [_rows(next(it)) for it in [_loader(source, tok)] for _ in range(3)]
    it = _loader(source, tok)
    assert [_rows(next(it)) for _ in range(3)] == a
    it = _loader(source, tok, seed=1)
    assert [_rows(next(it)) for _ in range(3)] != a


def test_shards_are_disjoint_and_make_the_global_batch(unique_source, built):
    tok = built[1]
    whole = _loader(unique_source, tok, global_batch_size=8)
    shards = [_loader(unique_source, tok, global_batch_size=8, shard_index=k, shard_count=2) for k in (0, 1)]
    for _ in range(15):  # Crosses an epoch boundary (96 records = 12 global batches).
        expected = _rows(next(whole))
        got = [_rows(next(s)) for s in shards]
        assert len(got[0]) == len(got[1]) == 4
        assert not set(got[0]) & set(got[1])
        assert sorted(got[0] + got[1]) == sorted(expected)


def test_each_epoch_sees_every_record_once_in_new_order(unique_source, built):
    tok = built[1]
    it = _loader(unique_source, tok, global_batch_size=8)
    epochs = [[row for _ in range(12) for row in _rows(next(it))] for _ in range(2)]
    for epoch in epochs:
        assert len(set(epoch)) == 96
    assert set(epochs[0]) == set(epochs[1]) and epochs[0] != epochs[1]
    finite = _loader(unique_source, tok, global_batch_size=8, num_epochs=1)
    assert sum(1 for _ in finite) == 12


@pytest.mark.parametrize("too_long", ["error", "skip"])
def test_state_restores_identical_continuation(built, unique_source, too_long):
    source, tok = built
    if too_long == "skip":  # Some records are dropped, so batches straddle skipped indices.
        long = "1+1=2\n" * 30 + "Answer: 2"
        source = [dict(r, response=long) if i % 5 == 0 else r for i, r in enumerate(unique_source)]
    it = _loader(source, tok, shard_index=1, shard_count=2, too_long=too_long)
    for _ in range(30):  # 30 * 4 records > half of either source: past the first epoch.
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = _loader(source, tok, shard_index=1, shard_count=2, too_long=too_long)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def _with_bad_record(unique_source, index, **change):
    source = [dict(r) for r in unique_source[:8]]
    source[index].update(change)
    source[index] = {k: v for k, v in source[index].items() if v is not None}
    return source


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(response=None), r"Record 5 has no 'response' field"),
        (dict(prompt=12), r"Field 'prompt' of record 5 is int, not text"),
        (dict(answer="forty"), r"Record 5 answer 'forty' is not an integer"),
    ],
)
def test_malformed_record_errors(unique_source, built, change, message):
    source = _with_bad_record(unique_source, 5, **change)
    with pytest.raises(ValueError, match=message):
        next(_loader(source, built[1], global_batch_size=8))


def test_free_form_answers_allowed_when_asked(unique_source, built):
    source = _with_bad_record(unique_source, 5, answer="\\frac{1}{2}")
    batch = next(_loader(source, built[1], global_batch_size=8, integer_answer=False))
    assert batch["tokens"].shape == (8, SEQ)


def test_too_long(unique_source, built):
    tok = built[1]
    source = _with_bad_record(unique_source, 3, response="1+1=2\n" * 30 + "Answer: 2")
    with pytest.raises(ValueError, match=r"^Record 3 \(prompt 'What is 13 \+ 7\?'\) is \d+ tokens, longer than seq_len=96; raise seq_len"):
        next(_loader(source, tok, global_batch_size=8))

    rows = [r for b in _loader(source, tok, global_batch_size=2, too_long="skip", num_epochs=1) for r in _rows(b)]
    assert len(rows) == 6  # 7 records fit; the last partial batch is dropped.
    assert all(r[int(np.sum(np.array(r) != tok.pad_id)) - 1] == tok.eos_id for r in rows)

    batch = next(_loader(source, tok, global_batch_size=8, too_long="truncate"))
    full = batch["valid"].sum(axis=1) == SEQ
    assert full.sum() == 1
    assert batch["loss_mask"][full][0, -1] == 1 and batch["tokens"][full][0, -1] != tok.eos_id


def test_argument_errors(built):
    source, tok = built
    with pytest.raises(ValueError, match="positive multiple of shard_count=3"):
        _loader(source, tok, global_batch_size=8, shard_count=3)
    with pytest.raises(ValueError, match="shard_index=2"):
        _loader(source, tok, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="too_long='drop'"):
        _loader(source, tok, too_long="drop")
    with pytest.raises(ValueError, match="empty"):
        _loader([], tok)


def test_mask_counts_match_tokenizer(built):
    """loss_mask sums to len(response) + len(<eot>) + 1 (eos): the targets, nothing else."""
    source, tok = built
    lengths = collections.Counter()
    for r in source:
        r = {k: v.decode() for k, v in r.items()}
        lengths[chat.TOY.first_prompt(r["prompt"])] = len(tok.encode(r["response"])) + 2
    batch = next(_loader(source, tok, global_batch_size=16))
    for tokens, mask in zip(batch["tokens"], batch["loss_mask"]):
        first = int(np.argmax(mask))
        assert mask.sum() == lengths[tok.decode(tokens[1:first])]


@pytest.mark.parametrize("saved_shards, resumed_shards", [(2, 2), (2, 1), (1, 2), (2, 4)])
def test_a_saved_position_resumes_on_any_number_of_shards(built, unique_source, saved_shards, resumed_shards):
    """The global batches after a resume are those of an uninterrupted run, whatever the
    number of processes before and after (as multisets: shards interleave rows differently)."""
    _, tok = built

    def loaders(n):
        return [_loader(unique_source, tok, shard_index=k, shard_count=n) for k in range(n)]

    def global_batches(its, steps):
        return [sorted(map(bytes, np.concatenate([next(it)["tokens"] for it in its]))) for _ in range(steps)]

    want = global_batches(loaders(1), 5)
    first = loaders(saved_shards)
    assert global_batches(first, 3) == want[:3]
    saved = pipeline.saved_positions([it.get_state() for it in first], saved_shards)
    resumed = loaders(resumed_shards)
    for k, it in enumerate(resumed):
        it.set_state(pipeline.resume_state(saved, k, resumed_shards))
    assert global_batches(resumed, 2) == want[3:]
