import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bfpack_spark.packing import (
    bfd_layout,
    chunk_documents,
    concat_layout,
    flatten_token_lists,
    pack_token_lists,
)

from reference import reference_concat

doc_lengths = st.lists(st.integers(0, 300), max_size=60)
seq_lens = st.integers(1, 128)


@settings(max_examples=200, deadline=None)
@given(doc_lengths, seq_lens)
def test_chunking_keeps_every_token(lengths, seq_len):
    chunks = chunk_documents(lengths, seq_len)
    assert (chunks.length >= 1).all() and (chunks.length <= seq_len).all()
    for d, n in enumerate(lengths):
        mine = chunks.doc == d
        assert mine.sum() == -(-n // seq_len)
        assert chunks.length[mine].sum() == n
        # consecutive, in order, all but the last exactly seq_len
        assert chunks.start[mine].tolist() == [i * seq_len for i in range(mine.sum())]
        assert (chunks.length[mine][:-1] == seq_len).all()


def reassemble(table: pa.Table, n_docs: int) -> list[list[int]]:
    """Rebuild each document from the packed sequences' segments."""
    docs: dict[int, list[tuple[int, list[int]]]] = {d: [] for d in range(n_docs)}
    for row in table.to_pylist():
        pos = 0
        for d, s, n in zip(row["seg_docs"], row["seg_starts"], row["seg_lengths"]):
            docs[d].append((s, row["input_ids"][pos:pos + n]))
            pos += n
        assert pos == row["n_tokens"] == len(row["input_ids"])
    return [[t for _, piece in sorted(docs[d]) for t in piece] for d in range(n_docs)]


def random_docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50_000, size=n).tolist() for n in lengths]


@settings(max_examples=150, deadline=None)
@given(doc_lengths, seq_lens, st.sampled_from(["bfd", "concat"]))
def test_packing_loses_no_token_and_respects_seq_len(lengths, seq_len, strategy):
    docs = random_docs(lengths)
    table = pack_token_lists(pa.array(docs, type=pa.list_(pa.int32())), seq_len, strategy)
    assert reassemble(table, len(docs)) == docs
    assert all(n <= seq_len for n in table["n_tokens"].to_pylist())
    if strategy == "bfd":  # only documents longer than seq_len are cut, into ceil(n/L) pieces
        seg_docs = pc.list_flatten(table["seg_docs"]).to_numpy().astype(np.int64)
        pieces = np.bincount(seg_docs, minlength=len(docs))
        assert pieces.tolist() == [-(-n // seq_len) for n in lengths]


@settings(max_examples=150, deadline=None)
@given(doc_lengths, seq_lens)
def test_concat_layout_matches_token_by_token_reference(lengths, seq_len):
    layout = concat_layout(lengths, seq_len)
    got = [
        list(zip(layout.doc[a:b].tolist(), layout.start[a:b].tolist(), layout.length[a:b].tolist()))
        for a, b in zip(layout.seg_offsets[:-1], layout.seg_offsets[1:])
    ]
    assert got == reference_concat(lengths, seq_len)


def test_bfd_segments_within_a_sequence_follow_document_order():
    layout = bfd_layout([5, 3, 900, 2, 7], 16)
    for a, b in zip(layout.seg_offsets[:-1], layout.seg_offsets[1:]):
        docs = layout.doc[a:b]
        assert (np.diff(docs) >= 0).all()


def test_chunked_and_sliced_input_give_the_same_result():
    docs = random_docs([5, 40, 0, 17, 300, 2, 64, 65], seed=3)
    whole = pa.array(docs, type=pa.list_(pa.int32()))
    chunked = pa.chunked_array([whole.slice(0, 3), whole.slice(3, 4), whole.slice(7)])
    large = pa.array(docs, type=pa.large_list(pa.int64()))
    expected = pack_token_lists(whole, 64)
    assert pack_token_lists(chunked, 64).equals(expected)
    got_large = pack_token_lists(large, 64)
    assert got_large["input_ids"].to_pylist() == expected["input_ids"].to_pylist()
    values, offsets = flatten_token_lists(chunked)
    assert offsets.tolist() == np.cumsum([0] + [len(d) for d in docs]).tolist()
    assert values.tolist() == [t for d in docs for t in d]


def test_packing_is_identical_on_rerun():
    docs = pa.array(random_docs(np.random.default_rng(5).integers(1, 400, 500)), type=pa.list_(pa.int32()))
    assert pack_token_lists(docs, 256).equals(pack_token_lists(docs, 256))


@pytest.mark.parametrize(
    "tokens, message",
    [
        (pa.array([[1, 2], None], type=pa.list_(pa.int32())), "document 1 is null"),
        (pa.array([[1, None]], type=pa.list_(pa.int32())), "null token ids"),
        (pa.array([[1.0, 2.0]], type=pa.list_(pa.float32())), "token ids must be integers"),
        (pa.array([1, 2], type=pa.int32()), "list or large_list"),
    ],
)
def test_bad_token_arrays_are_named(tokens, message):
    with pytest.raises(ValueError, match=message):
        pack_token_lists(tokens, 8)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown packing strategy 'greedy'"):
        pack_token_lists(pa.array([[1]], type=pa.list_(pa.int32())), 8, "greedy")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.lists(st.integers(0, 1000), max_size=30), max_size=6), min_size=1, max_size=5),
       st.data())
def test_chunked_tokens_gather_what_the_concatenation_holds(chunks, data):
    """ChunkedTokens reads segments from several Arrow chunks in place; same tokens as one flat array."""
    from bfpack_spark.packing.arrow import ChunkedTokens

    docs = [d for chunk in chunks for d in chunk]
    tokens = ChunkedTokens(pa.chunked_array([pa.array(c, pa.list_(pa.int32())) for c in chunks],
                                            type=pa.list_(pa.int32())))
    assert tokens.lengths.tolist() == [len(d) for d in docs]
    picks = data.draw(st.lists(st.sampled_from(range(len(docs))), max_size=20)) if docs else []
    starts = [data.draw(st.integers(0, len(docs[d]))) for d in picks]
    lengths = [data.draw(st.integers(0, len(docs[d]) - s)) for d, s in zip(picks, starts)]
    got = tokens.gather(np.array(picks, np.int64), np.array(starts, np.int64), np.array(lengths, np.int64))
    assert got.tolist() == [t for d, s, n in zip(picks, starts, lengths) for t in docs[d][s:s + n]]
    for d in picks:
        assert tokens.head(d, 3).tolist() == docs[d][:3]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(-2**31, 2**31 - 1), max_size=20), max_size=12), st.integers(0, 3),
       st.sampled_from([np.int32, np.int8]))
def test_ids_as_binary_round_trips_through_slices_and_chunks(lists, cut, dtype):
    """Fragments cross Spark's shuffle as binary values: what comes back is each list, in order,
    whether the column arrives sliced, in several chunks, or cast to Spark's 32-bit binary."""
    from bfpack_spark.packing.arrow import binary_as_ids, ids_as_binary

    info = np.iinfo(dtype)
    lists = [[min(max(v, info.min), info.max) for v in row] for row in lists]
    offsets = np.concatenate(([0], np.cumsum([len(r) for r in lists]))).astype(np.int64)
    values = np.array([v for r in lists for v in r], dtype)
    column = ids_as_binary(offsets, values)
    assert column.type == pa.binary() and len(column) == len(lists)
    cut = min(cut, len(lists))
    pieces = pa.chunked_array([column.slice(0, cut), column.slice(cut)], pa.binary())
    got, got_offsets = binary_as_ids(pieces, dtype)
    assert got.dtype == dtype
    assert [got[a:b].tolist() for a, b in zip(got_offsets[:-1], got_offsets[1:])] == lists
    tail, tail_offsets = binary_as_ids(column.slice(cut), dtype)
    assert [tail[a:b].tolist() for a, b in zip(tail_offsets[:-1], tail_offsets[1:])] == lists[cut:]


def test_binary_as_ids_names_a_null():
    from bfpack_spark.packing.arrow import binary_as_ids

    with pytest.raises(ValueError, match="null"):
        binary_as_ids(pa.array([b"\0\0\0\0", None], pa.binary()), np.int32)


def test_moved_segments_leave_in_batches_far_below_binary_columns_2_gib():
    """However many tokens a group moves, each Spark batch of fragments holds at most OUTPUT_ROWS
    segments and about SLICE_TOKENS tokens; one array of 2 GiB or more is refused with a message."""
    from bfpack_spark.packing.arrow import ids_as_binary
    from bfpack_spark.stages.assemble import OUTPUT_ROWS, SLICE_TOKENS, _batch_parts

    rng = np.random.default_rng(3)
    lengths = np.concatenate([rng.integers(1, 2048, 50_000), np.full(3, 2**24), rng.integers(1, 9, 5000)])
    parts = list(_batch_parts(lengths))
    assert parts[0].start == 0 and parts[-1].stop == lengths.shape[0]
    assert all(a.stop == b.start for a, b in zip(parts[:-1], parts[1:]))
    assert max(p.stop - p.start for p in parts) <= OUTPUT_ROWS
    assert max(int(lengths[p].sum()) for p in parts) <= SLICE_TOKENS + 2**24
    assert list(_batch_parts(np.empty(0, np.int64))) == []
    huge = np.zeros(2**29, np.int32)  # 2 GiB, never touched
    with pytest.raises(ValueError, match="at most 2 GiB"):
        ids_as_binary(np.array([0, 2**29]), huge)
