import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bfpack_spark.packing import best_fit_decreasing

from reference import reference_bfd


@st.composite
def items(draw, max_len=64, max_items=300):
    seq_len = draw(st.integers(1, max_len))
    lengths = draw(st.lists(st.integers(1, seq_len), max_size=max_items))
    return lengths, seq_len


@settings(max_examples=400, deadline=None)
@given(items())
def test_matches_reference_assignment(case):
    lengths, seq_len = case
    assert best_fit_decreasing(lengths, seq_len).tolist() == reference_bfd(lengths, seq_len)


@settings(max_examples=50, deadline=None)
@given(items(max_len=4096, max_items=2000))
def test_matches_reference_on_long_sequences(case):
    lengths, seq_len = case
    assert best_fit_decreasing(lengths, seq_len).tolist() == reference_bfd(lengths, seq_len)


@settings(max_examples=200, deadline=None)
@given(items(max_len=512, max_items=3000))
def test_every_item_placed_once_and_no_sequence_overflows(case):
    lengths, seq_len = case
    seqs = best_fit_decreasing(lengths, seq_len)
    assert seqs.shape == (len(lengths),) and seqs.dtype == np.int64
    if lengths:
        fill = np.bincount(seqs, weights=lengths)
        assert fill.max() <= seq_len
        # numbered 0, 1, 2, ... with no gaps
        assert set(seqs.tolist()) == set(range(int(seqs.max()) + 1))
        assert fill.sum() == sum(lengths)


def test_sequences_are_numbered_in_opening_order():
    # Longest first: 8 opens 0, both 6s open 1 and 2, 4 opens 3, then 3 fits the 4-gap of 3.
    assert best_fit_decreasing([6, 8, 4, 6, 3], 8).tolist() == [1, 0, 3, 2, 3]


def test_best_fit_picks_tightest_gap():
    # Gaps after the big items: 10-7=3, 10-5=5. A 3 must go to the 3-gap, not the 5-gap.
    assert best_fit_decreasing([7, 5, 3], 10).tolist() == [0, 1, 0]


def test_reruns_are_identical():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 2049, size=100_000)
    first = best_fit_decreasing(lengths, 2048)
    assert np.array_equal(first, best_fit_decreasing(lengths, 2048))
    assert np.array_equal(first, best_fit_decreasing(lengths.astype(np.int32), 2048))


def test_close_to_lower_bound_on_long_tailed_lengths():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(300), 1.2, size=200_000).astype(np.int64), 1, 2048)
    n_seqs = int(best_fit_decreasing(lengths, 2048).max()) + 1
    lower = -(-int(lengths.sum()) // 2048)
    assert n_seqs - lower <= max(2, lower // 10_000)


def test_empty_input():
    out = best_fit_decreasing(np.array([], dtype=np.int64), 16)
    assert out.shape == (0,) and out.dtype == np.int64


@pytest.mark.parametrize(
    "lengths, seq_len, message",
    [
        ([3, 0, 2], 8, "item 1 has length 0"),
        ([3, -2], 8, "item 1 has length -2"),
        ([3, 9], 8, "at most seq_len=8; item 1 has length 9"),
        ([1.5, 2.0], 8, "integer dtype"),
        ([True, False], 8, "integer dtype"),
        ([[1, 2]], 8, "one-dimensional"),
        ([1, 2], 0, "seq_len must be at least 1"),
        ([1, 2], 2.5, "seq_len must be an integer"),
    ],
)
def test_invalid_input_is_named(lengths, seq_len, message):
    with pytest.raises(ValueError, match=message):
        best_fit_decreasing(lengths, seq_len)
