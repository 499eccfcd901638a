import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bfpack_spark.packing import bfd_layout
from bfpack_spark.packing.plan import plan_bfd, plan_concat


def lognormal(n, median, sigma, seed=0):
    rng = np.random.default_rng(seed)
    return np.maximum(rng.lognormal(np.log(median), sigma, n).astype(np.int64), 1)


def contiguous_groups(n_docs, n_groups):
    return np.arange(n_docs) * n_groups // n_docs


def check_plan(plan, lengths, groups, seq_len):
    """Every token of every document lands exactly once, no sequence is over-full."""
    order = np.lexsort((plan.start, plan.doc))
    assert (order == np.arange(len(order))).all(), "segments are in canonical order"
    covered = np.bincount(plan.doc, weights=plan.length, minlength=len(lengths))
    assert covered.tolist() == list(lengths)
    fill = np.bincount(plan.seq, weights=plan.length, minlength=plan.n_sequences)
    assert (fill <= seq_len).all() and (fill > 0).all()
    layout = plan.layout()
    assert layout.n_sequences == plan.n_sequences
    for s in range(plan.n_sequences):  # slots number each sequence's segments 0..k-1
        mine = np.flatnonzero(plan.seq == s)
        assert sorted(plan.slot[mine].tolist()) == list(range(len(mine)))
        g = groups[plan.doc[mine]]
        assert plan.local[mine].all() == (g.min() == g.max())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=80), st.integers(1, 64), st.integers(1, 5),
       st.integers(1, 6), st.sampled_from(["in_place", "shuffle"]), st.sampled_from([0.0, 0.9, 1.0]))
def test_plans_place_every_token_once(lengths, seq_len, n_groups, n_parts, placement, threshold):
    groups = contiguous_groups(len(lengths), n_groups) if lengths else np.zeros(0, np.int64)
    plan = plan_bfd(lengths, groups, n_groups, seq_len, n_parts, threshold, placement)
    check_plan(plan, lengths, groups, seq_len)
    # best-fit never cuts a document that fits
    pieces = np.bincount(plan.doc, minlength=len(lengths))
    assert pieces.tolist() == [-(-n // seq_len) for n in lengths]
    check_plan(plan_concat(lengths, groups, seq_len), lengths, groups, seq_len)


@pytest.mark.parametrize("median, sigma", [(600, 1.2), (300, 1.2), (3000, 1.0)])
@pytest.mark.parametrize("n_parts", [1, 3, 8])
@pytest.mark.parametrize("placement", ["in_place", "shuffle"])
def test_partitioned_packing_is_as_tight_as_one_process_bfd(median, sigma, n_parts, placement):
    lengths = lognormal(200_000, median, sigma)
    groups = contiguous_groups(len(lengths), 8)
    one_process = bfd_layout(lengths, 2048).n_sequences
    plan = plan_bfd(lengths, groups, 8, 2048, n_parts, 0.99, placement)
    assert plan.n_sequences <= one_process + max(2, one_process // 10_000)


def test_in_place_keeps_most_sequences_local_and_shuffle_does_not():
    lengths = lognormal(100_000, 600, 1.2, seed=3)
    groups = contiguous_groups(len(lengths), 4)
    in_place = plan_bfd(lengths, groups, 4, 2048, 4, 0.99, "in_place")
    shuffled = plan_bfd(lengths, groups, 4, 2048, 4, 0.99, "shuffle")
    moved = lambda p: p.length[~p.local].sum() / p.length.sum()  # noqa: E731
    assert moved(in_place) < 0.25 < 0.4 < moved(shuffled)
    assert in_place.n_sequences == shuffled.n_sequences


def test_one_partition_without_residue_is_one_process_bfd():
    lengths = lognormal(20_000, 600, 1.2, seed=4)
    plan = plan_bfd(lengths, np.zeros(len(lengths), np.int64), 1, 2048, 1, 0.0)
    layout = bfd_layout(lengths, 2048)
    assert plan.residual_items == 0
    got = plan.layout()
    assert np.array_equal(got.seg_offsets, layout.seg_offsets)
    assert np.array_equal(got.doc, layout.doc) and np.array_equal(got.start, layout.start)


def test_plans_are_deterministic():
    lengths = lognormal(30_000, 600, 1.2, seed=5)
    groups = contiguous_groups(len(lengths), 5)
    a = plan_bfd(lengths, groups, 5, 1024, 3)
    b = plan_bfd(lengths, groups, 5, 1024, 3)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("seq", "slot", "local"))


def test_concat_plan_sequences_are_local_inside_a_group():
    plan = plan_concat([4, 4, 4, 4], [0, 0, 1, 1], 8)
    assert plan.seq.tolist() == [0, 0, 1, 1]
    assert plan.local.all()
    plan = plan_concat([6, 6], [0, 1], 8)  # second document straddles the cut
    assert plan.seq.tolist() == [0, 0, 1] and plan.local.tolist() == [False, False, True]


@pytest.mark.parametrize("kwargs, message", [
    ({"placement": "random"}, "unknown placement"),
    ({"n_partitions": 0}, "n_partitions must be at least 1"),
    ({"fill_threshold": 1.5}, "fill_threshold"),
])
def test_bad_plan_arguments(kwargs, message):
    args = dict(doc_lengths=[3], doc_group=[0], n_groups=1, seq_len=8, n_partitions=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        plan_bfd(**args)
