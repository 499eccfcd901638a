"""A shard is written a row group at a time: what it holds does not depend on how a table file is split
into row groups, nor on the order its rows are stored in (no Spark: one task's work, on local files).
Megatron and OLMo shards are the same bytes; an hf shard's Arrow batches end where row groups end."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bfpack_spark.export.formats import ShardSpec, write_shard
from bfpack_spark.export.job import _Task, _write_shard
from bfpack_spark.snapshot import TableFile

L = 16


def table_file(n_rows: int, seed: int = 3) -> pa.Table:
    """Rows as the pipeline writes them: up to L tokens in segments, a loss mask, seq_id ascending."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_rows):
        segs = [int(x) for x in rng.integers(1, 6, int(rng.integers(1, 4)))]
        n = sum(segs)
        rows.append({"seq_id": 1000 + k, "run_id": "r", "input_ids": [int(x) for x in rng.integers(0, 70_000, n)],
                     "seg_lengths": segs, "loss_mask": [int(x) for x in rng.integers(0, 2, n)]})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("seq_id", pa.int64()), ("run_id", pa.string()), ("input_ids", pa.list_(pa.int32())),
        ("seg_lengths", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8()))]))


def shard_bytes(tmp_path, table: pa.Table, spec: ShardSpec, row_group_size: int, name: str) -> tuple[dict, list]:
    path = tmp_path / f"{name}.parquet"
    pq.write_table(table, path, row_group_size=row_group_size)
    assert pq.ParquetFile(path).num_row_groups == -(-table.num_rows // row_group_size)
    outputs = tuple(str(tmp_path / f"{name}-{n}") for n in spec.names(0, 1))
    figures = _write_shard(_Task(0, TableFile(str(path), table.num_rows, "r", 1000), outputs), spec)
    if spec.fmt == "hf":
        with pa.ipc.open_stream(outputs[0]) as reader:
            return figures, [reader.read_all().combine_chunks()]
    return figures, [open(p, "rb").read() for p in outputs]


@pytest.mark.parametrize("spec", [ShardSpec("megatron", L, 9, "int32", True), ShardSpec("olmo", L + 3, 70_001,
                                  "uint32", True), ShardSpec("hf", L, 0, "int32", True)], ids=lambda s: s.fmt)
def test_a_shard_is_the_same_whatever_the_row_groups_and_the_stored_order(tmp_path, spec):
    table = table_file(50)
    whole, expected = shard_bytes(tmp_path, table, spec, 1000, "one-group")
    tokens = sum(len(x) for x in table["input_ids"].to_pylist())
    assert (whole["rows"], whole["tokens"], whole["first_seq_id"]) == (50, tokens, 1000)
    if spec.fmt == "hf":
        assert expected[0].column("input_ids").equals(table.column("input_ids"))
    else:
        assert whole["bytes"] == sum(len(b) for b in expected)
        rows = np.frombuffer(expected[0], np.dtype(spec.dtype).newbyteorder("<")).reshape(50, spec.seq_len)
        first = table["input_ids"][7].as_py()
        assert rows[7, :len(first)].tolist() == first and (rows[7, len(first):] == spec.pad_id).all()
    shuffled = table.take(np.random.default_rng(0).permutation(50))
    for name, stored, size in [("groups-1", table, 1), ("groups-7", table, 7), ("shuffled", shuffled, 7)]:
        figures, files = shard_bytes(tmp_path, stored, spec, size, name)
        assert {k: v for k, v in figures.items() if k != "bytes"} == {k: v for k, v in whole.items() if k != "bytes"}
        assert files == expected
    if spec.fmt != "hf":  # as to an object store: a new buffer for every piece
        outputs = [pa.BufferOutputStream() for _ in spec.names(0, 1)]
        pieces = (pa.Table.from_batches([b]) for b in pq.ParquetFile(tmp_path / "groups-7.parquet").iter_batches(7))
        write_shard(pieces, spec, outputs, reuse=False)
        assert [o.getvalue().to_pybytes() for o in outputs] == expected
