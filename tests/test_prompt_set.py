"""score_jax.data.prompt_set: prompts rendered and tokenised exactly (toy template, digits one
token each, so every length is known by hand), the three too_long modes with their counts and
messages, and the batch stream: seeded, per-epoch permutations, shards that make up the global
batch, and exact resumption from get_state()."""

import logging

import numpy as np
import pytest

from score_jax import chat
from score_jax.data import prompt_set

OVERHEAD = 4  # bos <user> ... <eot> <model>



def _ids(tok, text):
    return [tok.bos_id, tok.token_id("<user>"), *tok.encode(text), tok.token_id("<eot>"), tok.token_id("<model>")]


def _digits(tok, s):
    return [tok.token_id(c) for c in s]


def _build(source, tok, **kwargs):
    args = dict(max_prompt_len=8, too_long="error")
    return prompt_set.build(source, tok, chat.TOY, "{prompt}", **{**args, **kwargs})


# ----------------------------------------------------------------------------- build


def test_build_renders_tokenises_and_pads(tok):
    assert len(chat.encode_prompt(tok, chat.TOY, "")) == OVERHEAD
    source = [{"prompt": "12", "answer": "3"}, {"prompt": b"4", "answer": b"-5"}, {"prompt": "6789", "answer": "0"}]
    ps = _build(source, tok)
    b, u, e, m, p = tok.bos_id, tok.token_id("<user>"), tok.token_id("<eot>"), tok.token_id("<model>"), tok.pad_id
    d = {c: tok.token_id(c) for c in "0123456789"}
    want = [[b, u, d["1"], d["2"], e, m, p, p],
            [b, u, d["4"], e, m, p, p, p],
            [b, u, d["6"], d["7"], d["8"], d["9"], e, m]]
    assert ps.tokens.dtype == np.int32 and ps.tokens.shape == (3, 8)
    np.testing.assert_array_equal(ps.tokens, want)
    assert ps.lengths.dtype == np.int32
    np.testing.assert_array_equal(ps.lengths, [6, 5, 8])
    assert ps.answers == ("3", "-5", "0")  # bytes decoded, as TFDS sources give them
    assert ps.problems == ("12", "4", "6789")
    np.testing.assert_array_equal(ps.source_index, [0, 1, 2])
    assert (ps.too_long, ps.num_records, len(ps)) == (0, 3, 3)


def test_build_fills_the_prompt_template_and_honours_limit(tok):
    source = [{"question": str(i), "hint": "9", "answer": str(i)} for i in range(5)]
    ps = prompt_set.build(source, tok, chat.TOY, "{question}+{hint}", max_prompt_len=10, too_long="error", limit=2)
    assert ps.problems == ("0+9", "1+9")
    np.testing.assert_array_equal(ps.tokens[1, :7], _ids(tok, "1+9"))
    assert (ps.num_records, len(ps)) == (2, 2)
    assert len(prompt_set.build(source, tok, chat.TOY, "{question}", max_prompt_len=10, too_long="error",
                                limit=99)) == 5  # a limit beyond the source: all of it


def _mixed(n_long=2):
    """Records 0, 2, 4 fit in 8 tokens (4 digits); records 1 and 3 have 6 digits (10 tokens)."""
    return [{"prompt": "123456" if i in (1, 3)[:n_long] else "1234", "answer": str(i)} for i in range(5)]


def test_too_long_error_names_the_first_and_counts_all(tok):
    with pytest.raises(ValueError) as e:
        _build(_mixed(), tok, too_long="error")
    assert str(e.value) == ("2 of 5 prompts are longer than max_prompt_len=8; the first is record 1 (prompt '123456'), 10 tokens; raise "
                            "sampling.max_prompt_len (rl.sampling or eval.sampling) or set data.too_long to 'skip' "
                            "or 'truncate'.")


def test_too_long_skip_drops_them_and_says_so(tok, caplog):
    with caplog.at_level(logging.WARNING, logger=prompt_set.__name__):
        ps = _build(_mixed(), tok, too_long="skip")
    np.testing.assert_array_equal(ps.source_index, [0, 2, 4])
    assert ps.answers == ("0", "2", "4")
    assert (ps.too_long, ps.num_records, len(ps)) == (2, 5, 3)
    np.testing.assert_array_equal(ps.lengths, [8, 8, 8])
    assert [r.getMessage() for r in caplog.records] == [
        "2 of 5 prompts are longer than max_prompt_len=8: skipped them (data.too_long)."]


def test_too_long_truncate_cuts_the_user_text_and_keeps_the_markers(tok, caplog):
    with caplog.at_level(logging.WARNING, logger=prompt_set.__name__):
        ps = _build(_mixed(), tok, too_long="truncate")
    np.testing.assert_array_equal(ps.source_index, [0, 1, 2, 3, 4])
    assert (ps.too_long, ps.num_records, len(ps)) == (2, 5, 5)
    assert ps.problems == ("1234",) * 5  # 6 digits cut to the 4 that fit
    np.testing.assert_array_equal(ps.tokens, [_ids(tok, "1234")] * 5)
    np.testing.assert_array_equal(ps.lengths, [8] * 5)
    assert [r.getMessage() for r in caplog.records] == [
        "2 of 5 prompts are longer than max_prompt_len=8: truncated them (data.too_long)."]


def test_truncate_words_stays_within_budget_as_a_prefix(tok):
    text = "What is 62 * 5? Write each step."
    ps = _build([{"prompt": text, "answer": "310"}], tok, max_prompt_len=9, too_long="truncate")
    cut = ps.problems[0]
    assert text.startswith(cut) and 0 < len(cut) < len(text)
    ids = chat.encode_prompt(tok, chat.TOY, cut)
    assert int(ps.lengths[0]) == len(ids) <= 9
    np.testing.assert_array_equal(ps.tokens[0, :len(ids)], ids)
    assert list(ps.tokens[0, len(ids) - 2:len(ids)]) == [tok.token_id("<eot>"), tok.token_id("<model>")]
    assert ps.too_long == 1


def test_nothing_in_budget(tok):
    with pytest.raises(ValueError, match=r"^Every prompt is longer than max_prompt_len=8; raise it\.$"):
        _build([{"prompt": "123456", "answer": "0"}], tok, too_long="skip")
    with pytest.raises(ValueError, match=r"^max_prompt_len=4 cannot even hold the chat template's 4 marker "
                                         r"tokens; raise sampling\.max_prompt_len \(rl\.sampling or eval\.sampling\)\.$"):
        _build([{"prompt": "1", "answer": "0"}], tok, max_prompt_len=4, too_long="truncate")


def test_build_argument_and_record_errors(tok):
    with pytest.raises(ValueError, match=r"^too_long='drop'; choose one of \('error', 'skip', 'truncate'\)\.$"):
        _build([{"prompt": "1", "answer": "0"}], tok, too_long="drop")
    with pytest.raises(ValueError, match="^The prompt split is empty; build the dataset split"):
        _build([], tok)
    with pytest.raises(ValueError, match=r"Template field \{prompt\} is not in record 1"):
        _build([{"prompt": "1", "answer": "0"}, {"question": "2", "answer": "0"}], tok)
    with pytest.raises(ValueError, match=r"^Record 1 has no 'answer' field"):
        _build([{"prompt": "1", "answer": "0"}, {"prompt": "2"}], tok)


# ----------------------------------------------------------------------------- batches


def _set(m=6):
    """A prompt set whose row i is all i (so a batch's tokens say which rows it holds)."""
    return prompt_set.PromptSet(
        tokens=np.repeat(np.arange(m, dtype=np.int32)[:, None], 3, axis=1), lengths=np.arange(1, m + 1, dtype=np.int32),
        answers=tuple(map(str, range(m))), problems=tuple(map(str, range(m))), source_index=np.arange(m),
        too_long=0, num_records=m)


def _stream(ps, n, **kwargs):
    args = dict(global_batch_size=4, seed=0, shard_index=0, shard_count=1)
    it = prompt_set.batches(ps, **{**args, **kwargs})
    return [next(it) for _ in range(n)]


def test_batch_arrays_follow_the_index(tok):
    ps = _build([{"prompt": str(i) * (1 + i % 3), "answer": str(i)} for i in range(6)], tok)
    for batch in _stream(ps, 3, global_batch_size=4):
        assert set(batch) == {"tokens", "lengths", "index"}
        assert batch["tokens"].shape == (4, 8) and batch["tokens"].dtype == np.int32
        assert batch["lengths"].shape == (4,) and batch["lengths"].dtype == np.int32
        assert batch["index"].shape == (4,) and batch["index"].dtype == np.int64
        np.testing.assert_array_equal(batch["tokens"], ps.tokens[batch["index"]])
        np.testing.assert_array_equal(batch["lengths"], ps.lengths[batch["index"]])


def test_each_epoch_is_a_new_permutation():
    ps = _set(6)
    flat = np.concatenate([b["index"] for b in _stream(ps, 12, global_batch_size=2)])  # 4 epochs
    epochs = flat.reshape(4, 6)
    for e in epochs:
        assert sorted(e) == list(range(6))
    assert len({tuple(e) for e in epochs}) == 4
    assert list(epochs[0]) != list(range(6))  # shuffled, not source order


def test_same_seed_same_stream_other_seed_other_stream():
    ps = _set(6)
    a = [b["index"] for b in _stream(ps, 6, seed=7)]
    np.testing.assert_array_equal(a, [b["index"] for b in _stream(ps, 6, seed=7)])
    assert not np.array_equal(a, [b["index"] for b in _stream(ps, 6, seed=8)])


def test_batches_straddle_epochs():
    # 6 prompts in batches of 4: batch 1 holds the end of epoch 0 and the start of epoch 1.
    flat = np.concatenate([b["index"] for b in _stream(_set(6), 3, global_batch_size=4)])
    assert sorted(flat[:6]) == list(range(6)) and sorted(flat[6:]) == list(range(6))


@pytest.mark.parametrize("shards", [2, 4])
def test_shards_are_the_contiguous_blocks_of_the_global_batch(shards):
    ps = _set(6)
    glob = _stream(ps, 5, global_batch_size=8)
    parts = [_stream(ps, 5, global_batch_size=8, shard_index=k, shard_count=shards) for k in range(shards)]
    for t in range(5):
        for k in range(shards):
            assert parts[k][t]["index"].shape == (8 // shards,)
            # process k holds stream elements t*G + k*b .. t*G + (k+1)*b - 1: the rows of its devices
            b = 8 // shards
            np.testing.assert_array_equal(parts[k][t]["index"], glob[t]["index"][k * b:(k + 1) * b])
            np.testing.assert_array_equal(parts[k][t]["tokens"], glob[t]["tokens"][k * b:(k + 1) * b])


def test_shards_partition_the_stream_positions():
    # Distinct prompts per position within an epoch: 8 prompts, global batch 8 = one epoch per batch.
    ps = _set(8)
    shards = [_stream(ps, 3, global_batch_size=8, shard_index=k, shard_count=2) for k in (0, 1)]
    for t, glob in enumerate(_stream(ps, 3, global_batch_size=8)):
        parts = [shards[k][t]["index"] for k in (0, 1)]
        assert set(parts[0]).isdisjoint(parts[1])
        assert sorted(np.concatenate(parts)) == sorted(glob["index"]) == list(range(8))


@pytest.mark.parametrize("shard_index, shard_count", [(0, 1), (1, 2)])
def test_state_resumes_the_same_sequence(shard_index, shard_count):
    ps = _set(6)
    kwargs = dict(global_batch_size=4, seed=3, shard_index=shard_index, shard_count=shard_count)
    it = prompt_set.batches(ps, **kwargs)
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(5)]
    resumed = prompt_set.batches(ps, **kwargs)
    resumed.set_state(state)
    for a, b in zip(rest, [next(resumed) for _ in range(5)]):
        for k in ("tokens", "lengths", "index"):
            np.testing.assert_array_equal(a[k], b[k])
    # and the uninterrupted stream agrees: batches 3..7
    whole = _stream(ps, 8, **kwargs)
    for a, b in zip(rest, whole[3:]):
        np.testing.assert_array_equal(a["index"], b["index"])


def test_batch_argument_errors():
    ps = _set(6)
    with pytest.raises(ValueError, match=r"^batch_size=6 must be a positive multiple of the 4 processes\.$"):
        _stream(ps, 1, global_batch_size=6, shard_count=4)
    with pytest.raises(ValueError, match="^batch_size=0 must be a positive multiple"):
        _stream(ps, 1, global_batch_size=0)
    for seed in (-1, 2**32):
        with pytest.raises(ValueError, match=rf"^seed={seed} must be in \[0, 2\*\*32\)\.$"):
            _stream(ps, 1, seed=seed)


@pytest.mark.parametrize("index, count", [(2, 2), (-1, 2), (0, 0)])
def test_batches_refuse_a_shard_outside_the_process_count(tok, index, count):
    ps = _build([{"prompt": "1+1", "answer": "2"}] * 4, tok)
    with pytest.raises(ValueError, match=r"shard_index=.* must be in \[0, shard_count="):
        prompt_set.batches(ps, global_batch_size=2, seed=0, shard_index=index, shard_count=count)
