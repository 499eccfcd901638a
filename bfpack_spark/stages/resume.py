"""What a rerun of a run that lost its driver takes from the run's workspace without a Spark job.

The read's and the assembly's tasks record each group they finish (:mod:`.read`, :mod:`.assemble`),
and a rerun's task replays its group from that record. Where *every* read group finished, the driver
needs no task at all: it takes the read from the records themselves (a few KB each, fetched a few at
a time), checks each group's stored file against its recorded size (one listing) and each rejects file
by its footer; the documents' rows are made from the workspace only if a later stage asks for them
(the duplicates, a routed plan), and checked then against the record's counts. Where the duplicates
of that same read were found, and there were none, the rerun takes that from its record too. A rerun
whose read had finished thus runs no Spark job before the assembly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession

from bfpack_spark.io.formats.base import BATCH_DOCS, splits_of
from bfpack_spark.io.listing.plan import InputPlan
from bfpack_spark.io.store.workspace import Workspace
from bfpack_spark.io.tables.staging import StagedFile, Staging
from bfpack_spark.schemas import READ, spark_ddl
from bfpack_spark.spark.partitioning import map_slices
from bfpack_spark.stages.read import GroupSummary, ReadResult, splits_digest, stored_doc_rows

log = logging.getLogger(__name__)

_DOCS = pa.schema([f for f in READ if f.name not in ("kind", "info")])


class WorkspaceDamaged(RuntimeError):
    """A group's stored documents are not what its record says (changed after the record was written)."""


def replay_read(spark: SparkSession, inputs: InputPlan, staging: Staging, workspace: Workspace) -> ReadResult | None:
    """The read an earlier attempt of this run finished, every group of it, from its records; None where
    any group's record is missing or does not hold (its tasks then replay what they can)."""
    n = inputs.n_groups
    if workspace.records().get("read", 0) < n:  # one listing: a first attempt (or an unfinished read) stops here
        return None
    records = [r for r in workspace.read_records("read", n) if r is not None and r.get("stored_bytes") is not None]
    if len(records) < n:
        return None
    sizes = workspace.group_sizes()
    for g, (payload, record) in enumerate(zip(inputs.group_payloads(), records)):
        if record["splits"] != splits_digest(splits_of(payload)) or record["stored_bytes"] != sizes.get(g):
            return None
    files = [StagedFile.from_json(r["rejects"]) for r in records if r.get("rejects")]
    with ThreadPoolExecutor(max_workers=16) as pool:
        if not all(pool.map(staging.holds, files)):
            return None
    groups = [GroupSummary.from_dict(r["summary"]) for r in records]
    for summary in groups:
        summary.resumed = True
    log.info("read: all %d groups taken from what an earlier attempt of the run recorded", n)
    docs = _stored_documents(spark, groups, workspace)
    handed = [(g, json.dumps(r["residue"])) for g, r in enumerate(records) if r.get("residue") is not None]
    residue = spark.createDataFrame(  # through pandas: Arrow into the JVM, no Python task to unpickle a list
        pa.table({"group": pa.array([g for g, _ in handed], pa.int32()),
                  "info": pa.array([i for _, i in handed], pa.string())}).to_pandas(), "group int, info string")
    return ReadResult(docs, docs, files, groups, residue)


def _stored_documents(spark: SparkSession, groups: list[GroupSummary], workspace: Workspace) -> DataFrame:
    """The read's DOC rows (group ``g`` in partition ``g``, as the read stage leaves them), made from the
    workspace when first used (cached then), each group checked against its record."""
    where = workspace.uri

    def rows(_: int, mine: list[int]) -> Iterator[pa.RecordBatch]:
        for group in mine:
            table = stored_doc_rows(group, groups[group], workspace)
            if table is None:
                raise WorkspaceDamaged(
                    f"group {group} in the run's workspace {where} does not hold the {groups[group].documents} "
                    f"documents and {groups[group].tokens} tokens its record says; run the same command with "
                    f"--no-resume to start afresh")
            yield from table.drop_columns(["kind", "info"]).to_batches(max_chunksize=BATCH_DOCS)

    return map_slices(spark, list(range(len(groups))), len(groups), rows, spark_ddl(_DOCS)).persist(
        StorageLevel.MEMORY_AND_DISK)


def duplicates_key(groups: list[GroupSummary], policy: str, earlier_runs: list[str]) -> str:
    """What decides the duplicates of a run's read: its groups' counts (the run id, hence the workspace,
    already names the files and settings), the policy, and the committed runs whose ids are compared."""
    counts = [(g.records, g.documents, g.tokens, g.rejects, list(g.items)) for g in groups]
    text = json.dumps({"groups": counts, "policy": policy, "earlier": earlier_runs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def found_none_before(workspace: Workspace, key: str) -> bool:
    """Whether an earlier attempt of the run found no duplicate in the same read (:func:`duplicates_key`)."""
    record = workspace.read_record("duplicates", 0)
    return record is not None and record.get("key") == key and record.get("none") is True


def record_none_found(workspace: Workspace, key: str) -> None:
    """Record that the read of :func:`duplicates_key` ``key`` holds no duplicate."""
    workspace.write_record("duplicates", 0, {"key": key, "none": True})
