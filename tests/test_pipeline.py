"""The Spark pipeline end to end on a real local Spark, with real Delta tables on disk."""

import numpy as np
import pyarrow as pa
import pytest
from chispa import assert_df_equality
from deltalake import DeltaTable

from bfpack_spark.config import load_config
from bfpack_spark.io.tables.read import read_table
from bfpack_spark.job import run
from bfpack_spark.packing import bfd_layout

from corpora import write_tokenized

L = 512
TABLES = ("sequences", "documents", "rejects")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenized")
    return root, write_tokenized(root)


def pack(spark, input_path, out, **overrides):
    settings = {"input.paths": [str(input_path)], "input.token_column": "tokens", "output.output": str(out),
                "packing.seq_len": L, "input.target_items_per_partition": 2500}
    settings.update(overrides)
    return run(load_config(None, settings), spark)


@pytest.fixture(scope="module")
def packed(spark, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    return pack(spark, corpus[0], out), out


def table(out, name) -> pa.Table:
    return DeltaTable(str(out / name)).to_pyarrow_table()


def test_every_token_lands_once_in_order(packed, corpus):
    _, docs = corpus
    result, out = packed
    seqs = table(out, "sequences").to_pylist()
    pieces: dict[str, list[tuple[int, list[int]]]] = {}
    for s in seqs:
        pos = 0
        for d, start, n in zip(s["doc_ids"], s["seg_starts"], s["seg_lengths"]):
            pieces.setdefault(d, []).append((start, s["input_ids"][pos:pos + n]))
            pos += n
        assert pos == s["n_tokens"] == len(s["input_ids"]) <= L
    assert set(pieces) == set(docs)
    for doc_id, tokens in docs.items():
        parts = sorted(pieces[doc_id])
        assert [start for start, _ in parts] == [i * L for i in range(len(parts))]
        assert [t for _, p in parts for t in p] == tokens
        assert len(parts) - 1 == -(-len(tokens) // L) - 1  # cut exactly ceil(n/L)-1 times
    assert result.stats["audit_passed"] and result.stats["documents_rejected"] == 0
    assert sorted(s["seq_id"] for s in seqs) == list(range(len(seqs)))


def test_documents_and_stats_tables(packed, corpus):
    _, docs = corpus
    result, out = packed
    documents = table(out, "documents").to_pandas().set_index("doc_id")
    assert len(documents) == len(docs)
    lengths = np.array([len(docs[d]) for d in documents.index])
    assert (documents["n_tokens"].to_numpy() == lengths).all()
    assert (documents["n_chunks"].to_numpy() == -(-lengths // L)).all()
    stats = table(out, "stats").to_pylist()
    assert len(stats) == 1 and stats[0]["run_id"] == result.run_id
    assert stats[0]["sequences"] == table(out, "sequences").num_rows
    assert stats[0]["lower_bound"] == -(-int(lengths.sum()) // L)
    assert stats[0]["truncations_per_document"] < stats[0]["concat_truncations_per_document"]


def test_no_sequence_exceeds_seq_len(spark, packed):
    _, out = packed
    seqs = read_table(spark, str(out / "sequences"))
    assert seqs.agg({"n_tokens": "max"}).first()[0] <= L
    assert seqs.filter("size(input_ids) != n_tokens").count() == 0


def test_deltalake_reads_what_spark_reads(spark, packed):
    _, out = packed
    for name in TABLES:
        via_spark = read_table(spark, str(out / name))
        via_deltalake = spark.createDataFrame(table(out, name).to_pylist(), via_spark.schema)
        assert_df_equality(via_spark, via_deltalake, ignore_row_order=True, ignore_nullable=True)


def _same_tables(spark, a, b):
    for name in TABLES:
        assert_df_equality(read_table(spark, str(a / name)), read_table(spark, str(b / name)),
                           ignore_row_order=True)


def test_rerun_with_failing_tasks_gives_identical_tables(spark, corpus, packed, tmp_path, inject, faults_file):
    first, first_out = packed
    inject({"read": "once", "assemble": "once"})
    again = pack(spark, corpus[0], tmp_path / "again")
    for point in ("read", "assemble"):  # a task really failed, and Spark retried it
        assert (faults_file.parent / f"faults.json.{point}.fired").exists()
    assert again.run_id == first.run_id
    _same_tables(spark, first_out, tmp_path / "again")


@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_partition_count_barely_changes_the_sequence_count(spark, corpus, tmp_path, partitions):
    _, docs = corpus
    one_process = bfd_layout([len(t) for t in docs.values()], L).n_sequences
    result = pack(spark, corpus[0], tmp_path / "out", **{"packing.partitions": partitions})
    assert abs(result.stats["sequences"] - one_process) <= max(2, one_process // 10_000)
    assert result.stats["audit_passed"]


def test_audit_catches_a_lost_token_before_anything_is_committed(spark, corpus, tmp_path, inject):
    from bfpack_spark.job import AuditError

    inject({"drop_token": "always"})
    with pytest.raises(AuditError, match="tokens in sequences = tokens of packed documents"):
        pack(spark, corpus[0], tmp_path / "out")
    for name in ("sequences", "documents", "rejects", "stats"):
        assert not DeltaTable.is_deltatable(str(tmp_path / "out" / name))
        assert not any((tmp_path / "out" / name).glob("run-*")), "staged files of the failed attempt remain"


def test_table_schema_is_what_spark_reads_from_the_data_files(spark, packed):
    """The delta-spark path records the schema Spark reads back from the staged files; the
    deltalake path must record the same one, so both produce the same table."""
    import json

    from pyspark.sql.types import StructType

    _, out = packed
    for name in TABLES + ("stats",):
        table = DeltaTable(str(out / name))
        recorded = StructType.fromJson(json.loads(table.schema().to_json()))
        if table.file_uris():  # a table with no rows has no file
            assert recorded == spark.read.parquet(*table.file_uris()).schema, name


@pytest.mark.parametrize("n_parts, merge_items, driver_items", [
    (3, 200_000, 65_536), (3, 40, 65_536), (3, 40, 0), (7, 300, 65_536)])
def test_spark_plan_equals_the_one_process_plan(spark, n_parts, merge_items, driver_items):
    """Spark runs the routing, the per-partition BFD and the merge rounds in tasks (a small last
    round on the driver, unless ``driver_items`` is 0); the result (sequence ids, slots,
    locality) is the one-process plan's, item for item."""
    import pandas as pd

    from bfpack_spark.packing.plan import item_histogram
    from bfpack_spark.packing.reference import plan_bfd
    from bfpack_spark.schemas import ORDERS, numbers_of
    from bfpack_spark.spark.partitioning import exact_partitions
    from bfpack_spark.stages.rounds import Round, Rounds, routed_plan

    rng = np.random.default_rng(11)
    lengths = np.maximum(rng.lognormal(np.log(200), 1.3, 5000).astype(np.int64), 1)
    groups = np.arange(5000) * 5 // 5000
    index = np.arange(5000) - np.searchsorted(groups, groups)
    docs = spark.createDataFrame(
        [(int(g), int(i), f"d{k}", int(n), "src", k) for k, (g, i, n) in enumerate(zip(groups, index, lengths))],
        "group int, doc_index bigint, doc_id string, n_tokens bigint, source string, row bigint")
    counts = np.stack([item_histogram(lengths[groups == g], 512, 256) for g in range(5)])
    got = routed_plan(exact_partitions(docs, 5, "group"), counts, n_parts,
                      Rounds(Round(512, 256), 0.99, merge_items, driver_items))
    try:
        orders = pa.Table.from_pandas(got.orders.toPandas())
    finally:
        got.unpersist()
    items = {c: numbers_of(orders, ORDERS, c)[0] for c in ("doc_index", "chunk", "rank", "slot", "local")}
    per_order = np.diff(numbers_of(orders, ORDERS, "rank")[1])
    rows = pd.DataFrame({c: np.repeat(orders.column(c).to_numpy(), per_order) for c in ("stage", "part", "group")}
                        | items)
    rows = rows[rows["rank"] >= 0]  # an item's sequence is final in exactly one round
    base = np.cumsum([0] + [len(f) for f in got.first_ids])
    rows["seq_id"] = np.concatenate(got.first_ids)[base[rows["stage"]] + rows["part"]] + rows["rank"]
    rows = rows.sort_values(["group", "doc_index", "chunk"])
    want = plan_bfd(lengths, groups, 5, 512, n_parts, merge_items=merge_items)
    assert got.n_sequences == want.n_sequences and got.residual_items == want.residual_items
    assert got.merge_rounds == want.merge_rounds and got.merge_rounds >= 1
    assert (got.last_round is not None) == (driver_items > 0)  # both ways of running the last round
    assert rows["seq_id"].tolist() == want.seq.tolist()
    assert rows["slot"].tolist() == want.slot.tolist()
    assert rows["local"].tolist() == want.local.tolist()


@pytest.mark.parametrize("by_length, cap, merge_items, driver_items, first_round", [
    (False, None, 3000, None, "in place"), (False, None, 3000, 0, "in place"), (False, None, 40, 0, "routed"),
    (True, None, 3000, None, "routed"), (False, 16, 3000, None, "routed"), (True, 16, 200_000, None, "driver")])
def test_best_fit_tables_hold_the_one_process_plan(spark, tmp_path, monkeypatch, by_length, cap, merge_items,
                                                   driver_items, first_round):
    """More items than one task plans: groups alike (random order) are packed where they were read,
    their few residual items by the driver; groups that each hold one length range would lose
    tightness that way, and the routed plan runs (so it does under a cap on segments that binds:
    no plan reaches the lower bound then). Fewer: the driver packs them all, from the lengths the
    read's tasks hand over. Every segment of the sequences table sits where the one-process plan
    of the same steps puts it. ``driver_items`` 0: no group hands its residue to the driver, and
    merge rounds in Spark tasks deal it from the read's RESIDUE rows (at 40 items a partition,
    two of them, a sequence more than the bound: the routed plan runs after all)."""
    import pyarrow.parquet as pq

    from bfpack_spark.io.formats.parquet import row_groups_in
    from bfpack_spark.packing.reference import plan_bfd
    from bfpack_spark.stages.inputs import plan_inputs

    if driver_items is not None:
        monkeypatch.setattr("bfpack_spark.stages.rounds.DRIVER_ITEMS", driver_items)
    docs = write_tokenized(tmp_path / "corpus", median=100, by_length=by_length)
    settings = {"packing.merge_items_per_partition": merge_items, "input.target_items_per_partition": 1600,
                "packing.max_segments_per_sequence": cap}
    result = pack(spark, tmp_path / "corpus", tmp_path / "out", **settings)
    assert result.stats["plan_first_round"] == first_round and result.stats["audit_passed"]
    inputs = plan_inputs(load_config(None, {
        "input.paths": [str(tmp_path / "corpus")], "input.token_column": "tokens", "output.output": str(tmp_path),
        "packing.seq_len": L, **settings}))
    n_groups = inputs.n_groups
    n_parts = 1 if first_round == "driver" else n_groups
    assert n_groups > 1 and result.stats["packing_partitions"] == n_parts
    documents = table(tmp_path / "out", "documents")
    ids = dict(zip(zip(documents.column("source").to_pylist(), documents.column("row").to_pylist()),
                   documents.column("doc_id").to_pylist()))
    canonical, group = [], []  # every document, by group, then as the group's task read them
    for g, splits in enumerate(inputs.groups):
        for split in splits:
            meta = pq.ParquetFile(split.uri).metadata
            for rg, first_row in row_groups_in(meta, split.byte_range):
                n = meta.row_group(rg).num_rows
                canonical += [ids[(split.source, first_row + k)] for k in range(n)]
                group += [g] * n
    want = plan_bfd([len(docs[d]) for d in canonical], group, n_groups, L, n_parts, merge_items=merge_items,
                    route=first_round != "in place", max_segments=cap)
    sequences = table(tmp_path / "out", "sequences")
    got = {q: list(zip(ds, ss)) for q, ds, ss in zip(sequences.column("seq_id").to_pylist(),
                                                     sequences.column("doc_ids").to_pylist(),
                                                     sequences.column("seg_starts").to_pylist())}
    expected: dict[int, list] = {}  # each sequence's segments in slot order
    for i in np.lexsort((want.slot, want.seq)):
        expected.setdefault(int(want.seq[i]), []).append((canonical[want.doc[i]], int(want.start[i])))
    assert result.stats["sequences"] == want.n_sequences == sequences.num_rows
    assert got == expected
    assert result.stats["residual_items"] == want.residual_items
    assert result.stats["merge_rounds"] == want.merge_rounds >= (first_round != "driver")


@pytest.mark.parametrize("n", [1, 7, 64])
def test_exact_partitions_put_key_p_in_partition_p(spark, n):
    from pyspark.sql import functions as F

    from bfpack_spark.spark.partitioning import exact_partitions

    df = spark.range(0, 50 * n).select((F.col("id") % n).cast("int").alias("key"), F.col("id"))
    got = exact_partitions(df, n, "key").select("key", F.spark_partition_id().alias("p"), "id").toPandas()
    assert len(got) == 50 * n and (got["key"] == got["p"]).all()
    assert sorted(got["id"]) == list(range(50 * n))


def test_stand_in_keys_come_from_sparks_own_hash_without_a_job(spark):
    import numpy as np

    from bfpack_spark.spark import partitioning

    values = np.concatenate([np.arange(-500, 500), np.random.default_rng(3).integers(-2**63, 2**63 - 1, 500)])
    listed = ",".join(f"({v}L)" for v in values.tolist())
    spark_says = spark.sql(f"SELECT hash(k) AS h FROM VALUES {listed} AS t(k)").collect()
    assert partitioning.spark_hash_long(values).tolist() == [r["h"] for r in spark_says]

    sc = spark.sparkContext
    partitioning._KEYS.pop(13, None)
    partitioning._hash_agrees.cache_clear()
    sc.setJobGroup("stand-in-keys", "finding stand-in keys")
    try:
        keys = partitioning._stand_in_keys(spark, 13)
        sc._jsc.sc().listenerBus().waitUntilEmpty()
        assert sc.statusTracker().getJobIdsForGroup("stand-in-keys") == []  # found on the driver
        spark.range(1).count()  # the same probe does see a job
        sc._jsc.sc().listenerBus().waitUntilEmpty()
        assert len(sc.statusTracker().getJobIdsForGroup("stand-in-keys")) >= 1
    finally:
        sc.setJobGroup(None, None)
    assert np.mod(partitioning.spark_hash_long(np.array(keys)), 13).tolist() == list(range(13))
    assert partitioning._searched_by_spark(spark, 13).tolist() == keys  # what a Spark job finds


def test_exact_partitions_fail_on_a_key_outside_the_partitions(spark):
    from pyspark.sql import functions as F

    from bfpack_spark.spark.partitioning import exact_partitions

    df = spark.range(0, 20).select((F.col("id") % 5).cast("int").alias("key"))
    with pytest.raises(Exception, match="key 4 is not a partition of 0..3"):
        exact_partitions(df, 4, "key").collect()


def test_python_workers_are_forked_from_bfpacks_daemon_with_the_tasks_imports_done(spark):
    """spark.python.daemon.module: every worker's parent is bfpack_spark.daemon, which imported the stages."""
    def parent(_):
        import os
        import sys

        with open(f"/proc/{os.getppid()}/cmdline", "rb") as fh:
            command = fh.read().split(b"\0")  # python -m <daemon module> pyspark.worker
            yield (command[command.index(b"-m") + 1], "bfpack_spark.stages.assemble" in sys.modules)

    got = spark.sparkContext.parallelize(range(2), 2).mapPartitions(parent).collect()
    assert got == [(b"bfpack_spark.daemon", True)] * 2


def test_the_daemon_loads_the_plan_kernels_before_it_forks_workers():
    """A worker forked from it packs without loading numba's cached kernels itself (0.26 s each)."""
    import subprocess
    import sys

    code = ("from bfpack_spark.daemon import preload; preload(); from bfpack_spark.packing.bfd import _bfd_kernel; "
            "print(len(_bfd_kernel.signatures))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(done.stdout) >= 1


def test_spark_submit_s_master_and_settings_win_over_bfpack_s_defaults(tmp_path):
    """Under spark-submit the session runs on its --master (not bfpack's local[*,4]) with its --conf
    (not bfpack's defaults), and workers still fork from bfpack's daemon."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "session.py"
    script.write_text("from bfpack_spark.spark.session import get_spark\n"
                      "s = get_spark()\n"
                      "print('SESSION', s.sparkContext.master, s.conf.get('spark.sql.shuffle.partitions'),\n"
                      "      s.sparkContext.getConf().get('spark.python.daemon.module'))\n")
    done = subprocess.run([str(Path(sys.executable).parent / "spark-submit"), "--master", "local[1]", "--conf",
                           "spark.sql.shuffle.partitions=77", str(script)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SESSION local[1] 77 bfpack_spark.daemon" in done.stdout, done.stdout
