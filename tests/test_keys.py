"""score_jax.jobs.keys: the two documented formulas hold exactly, every (seed, job, run,
purpose, index) gives its own key, equal inputs give equal keys, ``seed`` is a deterministic
31-bit int drawn from the same key, and bad job names or run indices are refused."""

import itertools
import re

import jax
import numpy as np
import pytest

from score_jax.jobs import keys


def _data(key) -> tuple[int, ...]:
    return tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())


def test_tables_have_distinct_codes():
    # Two purposes (or jobs) sharing a code would silently share every key.
    assert len(set(keys.PURPOSES.values())) == len(keys.PURPOSES)
    assert len(set(keys.JOBS.values())) == len(keys.JOBS)


def test_root_is_the_documented_formula():
    for seed, job, run in [(0, "sft", 0), (5, "stage2", 3), (123, "eval", 2**31 - 1)]:
        want = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), keys.JOBS[job]), run)
        assert _data(keys.root(seed, job, run)) == _data(want)


def test_key_is_the_documented_formula():
    root = keys.root(7, "stage1", 1)
    for purpose, index in [("init", 0), ("data", 0), ("sampling", 12), ("eval", 3), ("scaling", 1),
                           ("self_samples", 9)]:
        want = jax.random.fold_in(jax.random.fold_in(root, keys.PURPOSES[purpose]), index)
        assert _data(keys.key(root, purpose, index)) == _data(want)
    assert _data(keys.key(root, "data")) == _data(keys.key(root, "data", 0))  # index defaults to 0


def test_every_seed_job_run_purpose_and_index_gets_its_own_key():
    seen = {}
    for seed, job, run in itertools.product((0, 1), keys.JOBS, (0, 1)):
        root = keys.root(seed, job, run)
        for purpose, index in itertools.product(keys.PURPOSES, (0, 1, 7)):
            seen[(seed, job, run, purpose, index)] = _data(keys.key(root, purpose, index))
    assert len(seen) == 2 * 4 * 2 * 6 * 3
    assert len(set(seen.values())) == len(seen)
    roots = {_data(keys.root(s, j, r)) for s, j, r in itertools.product((0, 1), keys.JOBS, (0, 1))}
    assert len(roots) == 16


def test_equal_inputs_give_equal_keys():
    a = keys.key(keys.root(3, "stage2", 2), "sampling", 40)
    b = keys.key(keys.root(3, "stage2", 2), "sampling", 40)
    assert _data(a) == _data(b)


def test_seed_is_a_deterministic_31_bit_int_from_the_key():
    root = keys.root(0, "sft", 0)
    seeds = {}
    for purpose, index in itertools.product(keys.PURPOSES, (0, 1, 2)):
        s = keys.seed(root, purpose, index)
        assert type(s) is int and 0 <= s < 2**31
        assert s == keys.seed(root, purpose, index)
        assert s == _data(keys.key(root, purpose, index))[-1] & 0x7FFFFFFF
        seeds[(purpose, index)] = s
    assert len(set(seeds.values())) == len(seeds)
    assert keys.seed(keys.root(0, "sft", 1), "data") != keys.seed(root, "data")


def test_unknown_job_is_refused():
    with pytest.raises(ValueError, match=re.escape("No key table entry for job 'pretrain'; add it to keys.JOBS.")):
        keys.root(0, "pretrain", 0)


@pytest.mark.parametrize("run", [-1, 2**31])
def test_run_out_of_range_is_refused(run):
    with pytest.raises(ValueError, match=re.escape(f"run={run} must be in [0, 2**31).")):
        keys.root(0, "sft", run)
