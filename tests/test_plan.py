import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bfpack_spark.packing import bfd_layout
from bfpack_spark.packing.layout import concat_layout, concat_pieces
from bfpack_spark.packing.plan import (
    Routing,
    in_place_is_tight,
    length_buckets,
    merge_round,
    pack_in_place,
    pack_partition,
    packing_partitions,
)
from bfpack_spark.packing.reference import plan_bfd, plan_concat


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
    for s in range(plan.n_sequences):  # slots number each sequence's segments 0..k-1, in canonical order
        mine = np.flatnonzero(plan.seq == s)
        assert plan.slot[mine].tolist() == list(range(len(mine)))
        g = groups[plan.doc[mine]]
        assert plan.local[mine].all() == (g.min() == g.max())


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=80), st.integers(1, 64), st.integers(1, 5),
       st.integers(1, 6), st.sampled_from([0.0, 0.9, 1.0]), st.sampled_from([1, 3, 1000]),
       st.sampled_from([1, 4, 256]))
def test_plans_place_every_token_once(lengths, seq_len, n_groups, n_parts, threshold, merge_items, n_buckets):
    groups = contiguous_groups(len(lengths), n_groups) if lengths else np.zeros(0, np.int64)
    plan = plan_bfd(lengths, groups, n_groups, seq_len, n_parts, fill_threshold=threshold, merge_items=merge_items,
                    n_buckets=n_buckets)
    check_plan(plan, lengths, groups, seq_len)
    # best-fit never cuts a document that fits
    pieces = np.bincount(plan.doc, minlength=len(lengths))
    assert pieces.tolist() == [-(-n // seq_len) for n in lengths]
    check_plan(plan_concat(lengths, groups, seq_len), lengths, groups, seq_len)


@pytest.mark.parametrize("median, sigma, order", [(600, 1.2, "random"), (300, 1.2, "random"), (3000, 1.0, "random"),
                                                  (500, 1.2, "sorted"), (24, 0.8, "sorted")])
@pytest.mark.parametrize("n_parts", [1, 3, 8])
def test_partitioned_packing_is_as_tight_as_one_process_bfd(median, sigma, order, n_parts):
    lengths = lognormal(200_000, median, sigma)
    if order == "sorted":  # each group holds one length range: no group is representative
        lengths = np.sort(lengths)
    groups = contiguous_groups(len(lengths), 8)
    one_process = bfd_layout(lengths, 2048).n_sequences
    plan = plan_bfd(lengths, groups, 8, 2048, n_parts)
    assert plan.n_sequences <= one_process + max(2, one_process // 10_000)


def test_length_buckets_without_interleave_lose_on_sorted_input():
    """Why the interleave exists: without it a target gets the same end of every bucket."""
    lengths = np.sort(lognormal(100_000, 500, 1.2, seed=2))
    groups = contiguous_groups(len(lengths), 8)
    with_interleave = plan_bfd(lengths, groups, 8, 2048, 8).n_sequences
    without = plan_bfd(lengths, groups, 8, 2048, 8, interleave=False).n_sequences
    assert with_interleave < without


def test_random_order_moves_few_tokens():
    lengths = lognormal(100_000, 600, 1.2, seed=3)
    groups = contiguous_groups(len(lengths), 4)
    plan = plan_bfd(lengths, groups, 4, 2048, 4)
    assert plan.length[~plan.local].sum() / plan.length.sum() < 0.05


def test_one_partition_without_residue_is_one_process_bfd():
    lengths = lognormal(20_000, 600, 1.2, seed=4)
    plan = plan_bfd(lengths, np.zeros(len(lengths), np.int64), 1, 2048, 1, fill_threshold=0.0)
    layout = bfd_layout(lengths, 2048)
    assert plan.residual_items == 0 and plan.merge_rounds == 0
    got = plan.layout()
    assert np.array_equal(got.seg_offsets, layout.seg_offsets)
    assert np.array_equal(got.doc, layout.doc) and np.array_equal(got.start, layout.start)


@pytest.mark.parametrize("cap", [None, 7])
def test_a_plan_one_task_can_hold_is_one_process_bfd_whatever_the_groups_and_threshold(cap):
    lengths = lognormal(30_000, 300, 1.3, seed=5)
    groups = np.arange(len(lengths)) % 6
    n_parts = packing_partitions(len(lengths), 6, merge_items=200_000)
    assert n_parts == 1 and packing_partitions(len(lengths), 6, merge_items=1_000) == 6
    assert packing_partitions(len(lengths), 6, merge_items=200_000, partitions=3) == 3
    plan = plan_bfd(lengths, groups, 6, 2048, n_parts, max_segments=cap)
    assert plan.n_sequences == bfd_layout(lengths, 2048, cap).n_sequences
    assert plan.residual_items == 0 and plan.merge_rounds == 0


def test_an_in_place_first_round_is_taken_only_within_the_slack_of_the_lower_bound():
    """One-process BFD never beats ceil(tokens / L), nor ceil(items / cap) under a cap: a plan
    within 0.01% of that bound is within 0.01% of BFD."""
    tokens = 100_000 * 2048 - 7  # lower bound 100,000 sequences: 10 over it allowed
    assert in_place_is_tight(100_010, tokens, 150_000, 2048)
    assert not in_place_is_tight(100_011, tokens, 150_000, 2048)
    assert in_place_is_tight(150_015, tokens, 150_000 * 4, 2048, max_segments=4)  # bound 150,000
    assert not in_place_is_tight(150_016, tokens, 150_000 * 4, 2048, max_segments=4)
    assert in_place_is_tight(10, 10 * 512, 40, 512) and not in_place_is_tight(11, 10 * 512, 40, 512)


def test_the_in_place_round_is_the_stage_0_of_a_plan_that_keeps_items_at_home():
    lengths = lognormal(40_000, 300, 1.2, seed=9)
    groups = contiguous_groups(len(lengths), 4)
    plan = plan_bfd(lengths, groups, 4, 2048, 4, route=False)
    for g in range(4):
        mine = np.flatnonzero(groups == g)
        chunks, packed = pack_in_place(lengths[mine], 2048, 0.99)
        at_home = np.isin(plan.doc, mine)
        assert np.array_equal(plan.doc[at_home], mine[chunks.doc])
        ids = plan.seq[at_home][packed.final]  # this group's final sequences, numbered after earlier groups'
        assert np.array_equal(ids - ids.min(), packed.rank[packed.final]) and packed.final.mean() > 0.99
        assert np.array_equal(plan.slot[at_home][packed.final], packed.slot[packed.final])
    assert in_place_is_tight(plan.n_sequences, int(lengths.sum()), len(plan.doc), 2048)


def test_plans_are_deterministic():
    lengths = lognormal(30_000, 600, 1.2, seed=5)
    groups = contiguous_groups(len(lengths), 5)
    a = plan_bfd(lengths, groups, 5, 1024, 3, merge_items=50)
    b = plan_bfd(lengths, groups, 5, 1024, 3, merge_items=50)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("seq", "slot", "local"))


def test_merge_rounds_end_even_when_no_sequence_can_be_filled():
    """Items of 0.55 L never fill a sequence to 0.99: the residue stalls, and the rounds still end."""
    lengths = np.full(5000, 1130)
    plan = plan_bfd(lengths, contiguous_groups(5000, 4), 4, 2048, 4, merge_items=300)
    assert plan.n_sequences == 5000 and plan.merge_rounds >= 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 50), min_size=4, max_size=4), min_size=1, max_size=6),
       st.integers(1, 7), st.booleans())
def test_routing_gives_every_target_an_equal_share_of_every_bucket(counts, n_targets, with_home):
    counts = np.array(counts)
    home = np.arange(counts.shape[0]) * n_targets // counts.shape[0] if with_home else None
    routing = Routing.from_counts(counts, n_targets, home)
    got = np.zeros((n_targets, counts.shape[1]), np.int64)
    rng = np.random.default_rng(0)
    for s in range(counts.shape[0]):
        buckets = rng.permutation(np.repeat(np.arange(counts.shape[1]), counts[s]))
        lengths = buckets * 10 + rng.integers(1, 11, buckets.shape[0])
        target = routing.targets(s, lengths, buckets)
        assert ((target >= 0) & (target < n_targets)).all()
        if with_home:  # a source's kept items stay home
            assert (np.bincount(buckets[target == home[s]], minlength=counts.shape[1]) >= routing.keep[s]).all()
        np.add.at(got, (target, buckets), 1)
    totals = counts.sum(axis=0)
    assert (got.min(axis=0) >= totals // n_targets).all() and (got.max(axis=0) <= -(-totals // n_targets)).all()
    sizes = got.sum(axis=1)
    assert sizes.max() - sizes.min() <= 1  # so a merge round's tasks never exceed merge_items


def test_merge_round_sizes_and_thresholds():
    assert merge_round(1000, 300, 0.99, False) == (4, 0.99)
    assert merge_round(1000, 1000, 0.99, False) == (1, 0.0)  # one partition: everything final
    assert merge_round(1000, 300, 0.99, True) == (4, 0.0)  # a stalled residue: everything final


def test_pack_partition_numbers_final_sequences_and_slots():
    packed = pack_partition([6, 8, 4, 6, 3], [0, 0, 1, 1, 2], 8, threshold=1.0)
    assert packed.bin.tolist() == [1, 0, 3, 2, 3]  # sequences 6 | 8 | 6 | 4+3
    assert packed.final.tolist() == [False, True, False, False, False]  # only the full one
    assert packed.rank.tolist() == [-1, 0, -1, -1, -1] and packed.n_final == 1
    assert packed.slot.tolist() == [0, 0, 0, 0, 1]
    assert packed.local.tolist() == [True, True, False, True, False]  # 4+3 mixes groups 1 and 2
    assert pack_partition([6, 8, 4, 6, 3], [0] * 5, 8, threshold=0.0).n_final == 4


def test_length_buckets_are_linear_and_exact_when_asked():
    assert length_buckets([1, 8, 9, 16], 16, 2).tolist() == [0, 0, 1, 1]
    assert length_buckets([1, 2, 16], 16, 1000).tolist() == [0, 1, 15]


def test_concat_pieces_continue_a_stream():
    lengths = lognormal(500, 100, 1.0, seed=6)
    whole = concat_layout(lengths, 64)
    doc, start, length, seq = concat_pieces(lengths[200:], 64, int(lengths[:200].sum()))
    tail = np.flatnonzero(whole.doc >= 200)
    assert np.array_equal(doc + 200, whole.doc[tail]) and np.array_equal(start, whole.start[tail])
    assert np.array_equal(length, whole.length[tail])
    assert np.array_equal(seq, np.searchsorted(whole.seg_offsets, tail, side="right") - 1)


def test_concat_plan_sequences_are_local_inside_a_group():
    plan = plan_concat([4, 4, 4, 4], [0, 0, 1, 1], 8)
    assert plan.seq.tolist() == [0, 0, 1, 1]
    assert plan.local.all()
    plan = plan_concat([6, 6], [0, 1], 8)  # second document straddles the cut
    assert plan.seq.tolist() == [0, 0, 1] and plan.local.tolist() == [False, False, True]


@pytest.mark.parametrize("kwargs, message", [
    ({"n_partitions": 0}, "n_partitions must be at least 1"),
    ({"fill_threshold": 1.5}, "fill_threshold"),
])
def test_bad_plan_arguments(kwargs, message):
    args = dict(doc_lengths=[3], doc_group=[0], n_groups=1, seq_len=8, n_partitions=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        plan_bfd(**args)
