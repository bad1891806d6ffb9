"""score_jax.episodes, the host side of a rollout: local rows of a sharded array (8 fake CPU
devices, conftest.py), turn texts cut at their lengths and stop ids, one batched reward call
for all turns with its two refusals, and edit ratios on hand-made strings."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from score_jax import chat, episodes, sharding



# ----------------------------------------------------------------------------- local_rows


def _rows_array(mesh, rows=8, cols=3):
    host = np.arange(rows * cols, dtype=np.int32).reshape(rows, cols)
    return host, jax.device_put(host, sharding.batch_sharding(mesh, 2))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 1, 8)])
def test_local_rows_one_process_is_the_whole_array(shape):
    host, x = _rows_array(sharding.make_mesh(sharding.MeshConfig(*shape)))
    got = episodes.local_rows(x)
    assert isinstance(got, np.ndarray) and got.dtype == np.int32
    np.testing.assert_array_equal(got, host)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4), (1, 1, 8)])
def test_local_rows_multi_process_path_dedups_replicas_in_row_order(shape, monkeypatch):
    # One process holds every device here, so the per-shard path must rebuild the whole array:
    # replicas over the tensor axis counted once, shards put back in global row order.
    host, x = _rows_array(sharding.make_mesh(sharding.MeshConfig(*shape)))
    starts = sorted({s.index[0].start or 0 for s in x.addressable_shards})
    assert len(starts) == 8 // shape[2]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    got = episodes.local_rows(x)
    np.testing.assert_array_equal(got, host)
    assert got.dtype == np.int32


def test_local_rows_multi_process_path_keeps_trailing_axes(monkeypatch):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=1, tensor=2))
    host = np.arange(8 * 2 * 3, dtype=np.float32).reshape(8, 2, 3)
    x = jax.device_put(host, sharding.batch_sharding(mesh, 3))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    np.testing.assert_array_equal(episodes.local_rows(x), host)


# ----------------------------------------------------------------------------- turn_texts


def test_turn_texts_cut_at_length_and_drop_one_final_stop(tok):
    eot, eos, pad = tok.token_id(chat.TOY.model_end), tok.eos_id, tok.pad_id
    e = tok.encode
    rows = [
        (e("Answer: 5") + [eot], None),  # the usual turn: its stop id dropped
        (e("12") + [eot] + e("99"), 3),  # ids after the length are never read
        (e("1") + [eot] + e("2"), None),  # a stop id inside the turn is text
        (e("34"), None),  # no stop (the turn hit its token budget): all kept
        (e("7") + [eos], None),  # any of the stop ids counts
        (e("8") + [eot, eot], None),  # only the last one goes
        ([eot], None),  # an empty attempt
        (e("56"), 0),  # length 0
    ]
    N = 12
    tokens = np.full((len(rows), N), pad, np.int32)
    lengths = np.zeros(len(rows), np.int32)
    for r, (ids, n) in enumerate(rows):
        tokens[r, :len(ids)] = ids
        lengths[r] = len(ids) if n is None else n
    want = ["Answer: 5", "12", "1<eot>2", "34", "7", "8<eot>", "", ""]
    assert episodes.turn_texts(tok, tokens, lengths, (eot, eos)) == want
    # The sampler's outputs arrive as device arrays; stop ids as any int sequence.
    assert episodes.turn_texts(tok, jnp.asarray(tokens), jnp.asarray(lengths), [np.int32(eot), eos]) == want


def test_turn_texts_without_that_stop_id_keeps_it(tok):
    eot = tok.token_id(chat.TOY.model_end)
    tokens = np.asarray([tok.encode("42") + [eot]], np.int32)
    assert episodes.turn_texts(tok, tokens, np.asarray([3]), (tok.eos_id,)) == ["42<eot>"]
    assert episodes.turn_texts(tok, tokens, np.asarray([3]), chat.stop_ids(tok, chat.TOY)) == ["42"]


# ----------------------------------------------------------------------------- score_turns


def test_score_turns_one_call_turn_major_and_shape():
    calls = []

    def exact_match(completions, references):
        calls.append((list(completions), list(references)))
        return [float(c == r) for c, r in zip(completions, references)]

    texts = [["1", "x", "3"], ["1", "2", "y"], ["z", "2", "3"]]  # 3 turns x 3 rows
    got = episodes.score_turns(exact_match, texts, ("1", "2", "3"))
    assert calls == [(["1", "x", "3", "1", "2", "y", "z", "2", "3"], ["1", "2", "3"] * 3)]
    assert got.dtype == np.float32 and got.shape == (3, 3)
    np.testing.assert_array_equal(got, [[1, 0, 1], [1, 1, 0], [0, 1, 1]])


def test_score_turns_accepts_ints_and_bools():
    got = episodes.score_turns(lambda c, r: [1, 0, True, False], [["a", "b"], ["c", "d"]], ["r0", "r1"])
    np.testing.assert_array_equal(got, np.asarray([[1, 0], [1, 0]], np.float32))


def test_score_turns_wrong_number_of_rewards():
    with pytest.raises(RuntimeError, match=r"^The reward function returned 3 rewards for 4 completions\.$"):
        episodes.score_turns(lambda c, r: [1.0, 0.0, 1.0], [["a", "b"], ["c", "d"]], ["r0", "r1"])


@pytest.mark.parametrize("bad", [0.5, -1.0, 2.0, float("nan")])
def test_score_turns_non_binary_rewards(bad):
    with pytest.raises(ValueError, match=r"^Rewards must be binary \(0 or 1\); the task's reward function"):
        episodes.score_turns(lambda c, r: [1.0, bad], [["a"], ["b"]], ["r"])


# ----------------------------------------------------------------------------- edit_ratios


def test_edit_ratios_by_hand():
    a = ["abc", "", "kitten", "abc", "", "héllo", "Answer: 12", "ab"]
    b = ["abc", "", "sitting", "", "xy", "hello", "Answer: 13", "ba"]
    got = episodes.edit_ratios(a, b)
    assert got.dtype == np.float32 and got.shape == (8,)
    #        copy  both empty  3 edits / 7  deleted  written anew  é->e  one digit / 10  two subs / 2
    want = [1.0, 1.0, 1 - 3 / 7, 0.0, 0.0, 1 - 1 / 5, 1 - 1 / 10, 0.0]
    np.testing.assert_array_equal(got, np.asarray(want, np.float32))


def test_edit_ratios_are_symmetric():
    # Levenshtein is symmetric, so swapping y1 and y2 gives the same ratios.
    a, b = ["flaw", "intention", "a" * 5], ["lawn", "execution", "a" * 3]
    np.testing.assert_array_equal(episodes.edit_ratios(a, b), episodes.edit_ratios(b, a))
    np.testing.assert_array_equal(episodes.edit_ratios(a, b), np.asarray([0.5, 1 - 5 / 9, 0.6], np.float32))


def test_edit_ratios_empty_batch():
    got = episodes.edit_ratios([], [])
    assert got.dtype == np.float32 and got.shape == (0,)


def _levenshtein(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_edit_distance_ratio_by_hand_and_against_plain_dp():
    assert episodes.edit_distance_ratio("", "") == 1.0
    assert episodes.edit_distance_ratio("abc", "") == 0.0
    assert episodes.edit_distance_ratio("abc", "abc") == 1.0
    assert episodes.edit_distance_ratio("kitten", "sitting") == pytest.approx(1 - 3 / 7)  # 3 edits
    assert episodes.edit_distance_ratio("flaw", "lawn") == pytest.approx(0.5)  # 2 edits / 4
    assert episodes.edit_distance_ratio("x = π", "x = 3.14") == pytest.approx(1 - 4 / 8)
    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choice("abcé") for _ in range(rng.randrange(12)))
        b = "".join(rng.choice("abcé") for _ in range(rng.randrange(12)))
        want = 1.0 if not (a or b) else 1 - _levenshtein(a, b) / max(len(a), len(b))
        assert episodes.edit_distance_ratio(a, b) == pytest.approx(want), (a, b)
