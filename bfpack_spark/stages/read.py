"""Stage 1, read: one group of input splits in; documents, rejects and counts out.

Reads every split of the group, tokenizes texts (or checks given token ids) and adds
the end-of-document token. A document's tokens go to the run's workspace, never
through Spark; Spark gets one row per document (group, position, id, length, where it
was read), which is all the dedup and the plan need. For best-fit, each task also packs its
group's items on their own (BFD over its lengths: milliseconds) and reports the sequences that
makes and the items it leaves: where groups are alike, that is the plan's first round.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel, TaskContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from bfpack_spark import faults
from bfpack_spark.config import PackConfig
from bfpack_spark.io.formats import read_group_splits
from bfpack_spark.io.formats.base import BATCH_DOCS, Fields, Limits, RawBatch, Reject, Split, reason_code, splits_of
from bfpack_spark.io.listing.plan import InputPlan
from bfpack_spark.io.store.workspace import Workspace
from bfpack_spark.io.tables.staging import StagedFile, Staging
from bfpack_spark.packing import flatten_token_lists
from bfpack_spark.packing.arrow import frame_documents, prompt_and_text
from bfpack_spark.packing.plan import item_histogram, length_buckets, pack_in_place
from bfpack_spark.schemas import READ, REJECTS, STORED, ReadRow, spark_ddl
from bfpack_spark.spark.partitioning import map_slices
from bfpack_spark.spark.progress import Counters
from bfpack_spark.tokenize import Tokenizer, document_bos, encode_texts, load_tokenizer


@dataclass(frozen=True)
class ReadSettings:
    """What stage 1 needs to know; small and picklable, shipped to every task."""

    fields: Fields
    tokenizer: str
    eos_token: str | None
    append_eos: bool
    seq_len: int
    length_buckets: int
    keep_empty: bool
    bos_token: str | None = None
    prepend_bos: bool | None = None
    loss_masks: bool = False
    engine: str = "auto"
    in_place: InPlaceSettings | None = None  # best-fit: each group packed on its own where it is read


    @classmethod
    def of(cls, config: PackConfig, in_place: InPlaceSettings | None) -> ReadSettings:
        """The read of a run of ``config``; ``in_place``: how its tasks pack their own groups (best-fit)."""
        fields = Fields(config.input.token_column or config.input.text_column, config.tokenized,
                        config.input.id_column or None, config.extra_column,
                        Limits(config.quality.max_document_bytes, config.quality.max_line_bytes))
        t = config.tokenizer
        return cls(fields=fields, tokenizer=t.tokenizer, eos_token=t.eos_token, append_eos=config.append_eos,
                   seq_len=config.packing.seq_len, length_buckets=config.packing.length_buckets,
                   keep_empty=config.quality.empty_documents == "keep", bos_token=t.bos_token,
                   prepend_bos=t.prepend_bos, loss_masks=config.loss_masks, engine=t.engine, in_place=in_place)


@dataclass(frozen=True)
class InPlaceSettings:
    """How a read task packs its own group (the plan's first round, where it serves): to ``fill``, with at
    most ``max_segments`` per sequence, handing over at most ``carry`` chunks (and, a group of at most that
    many, its documents' lengths) for the driver."""

    fill: float
    max_segments: int | None = None
    carry: int = 0


def _flat(tokens: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The token buffer of these lists alone, and offsets into it from 0."""
    values, offsets = flatten_token_lists(tokens)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def _check_token_ids(raw: RawBatch, tokenizer: Tokenizer) -> None:
    """Reject documents holding an id that is not a token of the tokenizer; the rest become list<int32>."""
    if not len(raw):
        return
    values, offsets = _flat(raw.tokens)
    known = tokenizer.known_ids
    bad_values = (values < 0) | (values >= known.shape[0])
    if not known.all():  # gaps (cl100k_base: 16, all above 100,255): look up only the ids that reach them
        maybe = np.flatnonzero((values >= np.argmin(known)) & ~bad_values)
        bad_values[maybe] = ~known[values[maybe]]
    if bad_values.any():
        parents = np.searchsorted(offsets, np.flatnonzero(bad_values), side="right") - 1
        first_bad: dict[int, int] = {}
        for pos, doc in zip(np.flatnonzero(bad_values), parents):
            first_bad.setdefault(int(doc), int(values[pos]))
        mask = np.zeros(len(raw), bool)
        mask[list(first_bad)] = True
        gaps = known.shape[0] - int(known.sum())
        vocabulary = f"ids 0..{known.shape[0] - 1}" + (f" but {gaps} unassigned" if gaps else "")
        raw.reject_where(mask, [
            f"token id {first_bad[d]} is outside the vocabulary of {tokenizer.name} ({vocabulary}); "
            f"set --tokenizer to the tokenizer that made these ids" for d in sorted(first_bad)])
    values, offsets = _flat(raw.tokens)
    raw.tokens = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                          pa.array(values.astype(np.int32, copy=False)))


def _check_masks(raw: RawBatch, column: str) -> None:
    """Reject documents whose loss mask is not one 0 or 1 per token; the rest become list<int8>."""
    if not len(raw) or raw.masks is None:
        return
    if pa.types.is_boolean(raw.masks.type.value_type):
        raw.masks = raw.masks.cast(pa.list_(pa.int8()))
    values, offsets = _flat(raw.masks)
    lengths = np.diff(offsets)
    n_tokens = np.diff(_flat(raw.tokens)[1])
    reasons: dict[int, str] = {}
    for d in np.flatnonzero(lengths != n_tokens):
        reasons[int(d)] = f"loss mask column {column!r} has {lengths[d]} values for {n_tokens[d]} tokens"
    wrong = (values != 0) & (values != 1)
    if wrong.any():
        positions = np.flatnonzero(wrong)
        for pos, d in zip(positions, np.searchsorted(offsets, positions, side="right") - 1):
            reasons.setdefault(int(d), f"loss mask column {column!r} holds {values[pos]} (0 or 1 expected)")
    if reasons:
        mask = np.zeros(len(raw), bool)
        mask[list(reasons)] = True
        raw.reject_where(mask, [reasons[d] for d in sorted(reasons)])
        values, offsets = _flat(raw.masks)
    raw.masks = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int8)))


def doc_rows(group: int, first_doc: int, documents: pa.Table | pa.RecordBatch, lengths: np.ndarray) -> pa.Table:
    """DOC rows of ``documents`` (their doc_id, source and row columns: as stored), the first at ``first_doc``."""
    n = documents.num_rows
    return pa.Table.from_pydict({
        "kind": pa.array(np.full(n, ReadRow.DOC, np.int8)),
        "group": pa.array(np.full(n, group, np.int32)),
        "doc_index": pa.array(np.arange(first_doc, first_doc + n, dtype=np.int64)),
        "doc_id": documents.column("doc_id"),
        "n_tokens": pa.array(lengths.astype(np.int64)),
        "source": documents.column("source"),
        "row": documents.column("row"),
        "info": pa.nulls(n, pa.string()),
    }, schema=READ)


def _info_row(kind: int, group: int, info: str) -> pa.RecordBatch:
    row = {name: pa.nulls(1, f.type) for name, f in zip(READ.names, READ)}
    row.update(kind=pa.array([kind], pa.int8()), group=pa.array([group], pa.int32()),
               info=pa.array([info], pa.string()))
    return pa.RecordBatch.from_pydict(row, schema=READ)


def rejects_table(rejects: list[Reject], run_id: str) -> pa.Table:
    return pa.table({
        "run_id": pa.array([run_id] * len(rejects), pa.string()),
        "source": pa.array([r.source for r in rejects], pa.string()),
        "row": pa.array([r.row for r in rejects], pa.int64()),
        "doc_id": pa.array([r.doc_id for r in rejects], pa.string()),
        "reason": pa.array([r.reason for r in rejects], pa.string()),
        "reason_code": pa.array([reason_code(r.reason) for r in rejects], pa.string()),
        "excerpt": pa.array([r.excerpt for r in rejects], pa.string()),
    }, schema=REJECTS)


class _Encoder:
    """What a read task does to each batch of documents: drop empty ones, check given token ids and
    loss masks, or tokenize texts (and prompts); then frame each document with BOS/EOS."""

    def __init__(self, settings: ReadSettings):
        self.settings = settings
        self.tokenizer = load_tokenizer(settings.tokenizer, settings.eos_token, settings.bos_token, settings.engine)
        self.bos = document_bos(self.tokenizer, settings.prepend_bos)
        self.eos = self.tokenizer.eos_id if settings.append_eos else None
        context = TaskContext.get()
        self.threads = context.cpus() if context is not None else 1  # spark.task.cpus: the cores a task may use

    def __call__(self, raw: RawBatch) -> None:
        s, fields = self.settings, self.settings.fields
        if not s.keep_empty:
            raw.reject_where(_lengths(raw) == 0, "empty document (quality.empty_documents: skip)")
        if fields.tokenized:
            _check_token_ids(raw, self.tokenizer)
            if fields.extra is not None:
                _check_masks(raw, fields.extra)
        elif len(raw):
            raw.tokens = encode_texts(self.tokenizer, raw.texts, self.threads)
            if raw.prompts:
                raw.tokens, raw.masks = prompt_and_text(encode_texts(self.tokenizer, raw.prompts, self.threads),
                                                        raw.tokens)
            raw.texts, raw.prompts = [], []
        if len(raw) and (self.bos is not None or self.eos is not None or s.loss_masks):
            raw.tokens, raw.masks = frame_documents(raw.tokens, raw.masks, self.bos, self.eos, s.loss_masks)
        raw.reject_where(_lengths(raw) == 0, "no tokens: the tokenizer made nothing of this text")


def read_group(group: int, splits: list[Split], settings: ReadSettings, staging: Staging,
               workspace: Workspace, *, counters: Counters | None = None) -> Iterator[pa.RecordBatch]:
    """Read one group: its documents go to the workspace (tokens) and to Spark (one small row each,
    kind DOC, in canonical order); its rejects to a file of the rejects table (a FILE row); and a
    GROUP row counts the records the readers consumed, for the audit (and holds the in-place round's figures).

    Then the task records that it finished, in the workspace: an attempt of the same run after a lost
    driver replays the group from what it wrote (checked first: its documents and tokens, its rejects
    file's footer) instead of reading and tokenizing it again."""
    digest = splits_digest(splits)
    replayed = _replayed(group, digest, staging, workspace)
    if replayed is not None:
        yield from replayed
        if counters is not None:
            summary = GroupSummary.from_json(replayed[-1].column("info")[0].as_py())
            counters.add(summary.documents, summary.tokens, sum(s.nbytes for s in splits))
        return
    faults.check("read")
    faults.check(f"read:{group}")
    encode = _Encoder(settings)
    doc_index = n_records = n_tokens = 0
    rejects: list[Reject] = []
    histogram = np.zeros(min(settings.length_buckets, settings.seq_len), np.int64)
    doc_lengths: list[np.ndarray] = []
    with workspace.group_writer(group, STORED) as store:
        for raw in read_group_splits(splits, settings.fields):
            n_records += raw.n_records
            encode(raw)
            rejects.extend(raw.rejects)
            if not len(raw):
                continue
            lengths = _lengths(raw)
            masks = raw.masks if raw.masks is not None else pa.nulls(len(raw), pa.list_(pa.int8()))
            stored = pa.RecordBatch.from_pydict({
                "doc_id": raw.ids, "source": raw.sources, "row": pa.array(raw.rows), "tokens": raw.tokens,
                "loss_mask": masks}, schema=STORED)
            store.write_batch(stored)
            yield from doc_rows(group, doc_index, stored, lengths).to_batches()
            doc_index += len(raw)
            n_tokens += int(lengths.sum())
            histogram += item_histogram(lengths, settings.seq_len, settings.length_buckets)
            doc_lengths.append(lengths)
    written = (staging.write("rejects", f"read-{group:07d}", rejects_table(rejects, staging.run_id))
               if rejects else None)
    engine = None if settings.fields.tokenized else encode.tokenizer.engine
    summary = GroupSummary(records=n_records, documents=doc_index, tokens=n_tokens, rejects=len(rejects),
                           items=histogram.tolist(), engine=engine)
    residue = None
    if settings.in_place is not None:
        summary.in_place, residue = _in_place(np.concatenate(doc_lengths or [np.empty(0, np.int64)]), settings)
    if counters is not None:
        counters.add(doc_index, n_tokens, sum(s.nbytes for s in splits))
    workspace.write_record("read", group, {"splits": digest, "summary": asdict(summary), "residue": residue,
                                           "rejects": written.to_json() if written else None,
                                           "stored_bytes": workspace.group_bytes(group)})
    yield from _closing_rows(group, summary, written, residue)


def _closing_rows(group: int, summary: GroupSummary, rejects: StagedFile | None,
                  residue: dict | None) -> Iterator[pa.RecordBatch]:
    """A group's rows after its documents: its rejects file, its residue, its summary (last)."""
    if rejects is not None:
        yield _info_row(ReadRow.FILE, group, rejects.to_json())
    if residue is not None:
        yield _info_row(ReadRow.RESIDUE, group, json.dumps(residue))
    yield _info_row(ReadRow.GROUP, group, summary.to_json())


def splits_digest(splits: list[Split]) -> str:
    """What a read task covered: its splits (files, sizes, byte ranges)."""
    h = hashlib.sha256()
    for s in splits:
        h.update(f"{s.uri}\0{s.size}\0{s.byte_range}\n".encode())
    return h.hexdigest()[:16]


def _replayed(group: int, digest: str, staging: Staging, workspace: Workspace) -> list[pa.RecordBatch] | None:
    """The rows of a group an earlier attempt of this run read, from its record and the files it wrote;
    None where there is no record, or what it describes is not all there as described."""
    record = workspace.read_record("read", group)
    if record is None or record.get("splits") != digest:
        return None
    summary = GroupSummary.from_dict(record["summary"])
    rejects = StagedFile.from_json(record["rejects"]) if record.get("rejects") else None
    try:
        rows = stored_doc_rows(group, summary, workspace)
    except (OSError, pa.ArrowException):
        return None
    if rows is None or (rejects is not None and not staging.holds(rejects)):
        return None
    summary.resumed = True
    return [*rows.to_batches(max_chunksize=BATCH_DOCS), *_closing_rows(group, summary, rejects, record["residue"])]


def stored_doc_rows(group: int, summary: GroupSummary, workspace: Workspace) -> pa.Table | None:
    """The DOC rows of a group as an earlier attempt stored it in the workspace; None where the stored
    documents are not the ``summary``'s (their count, their tokens)."""
    stored = workspace.read_group(group)
    lengths = pc.list_value_length(stored.column("tokens")).to_numpy()
    if stored.num_rows != summary.documents or int(lengths.sum()) != summary.tokens:
        return None
    return doc_rows(group, 0, stored, lengths)


#: A group whose own BFD leaves more than this share of its chunks is unlike the corpus (it holds one
#: length range, say): its residue is not handed on, and the plan's first round is routed.
IN_PLACE_RESIDUE = 1 / 8


@dataclass
class InPlace:
    """A group's chunks packed on their own where it was read: what the plan weighs as its first round."""

    n_final: int                  # sequences filled to the threshold
    residual_items: int           # the chunks left, their tokens, and their length buckets
    residual_tokens: int
    residue_buckets: list[int]
    residue_counts: list[int]
    residue_row: bool             # whether the chunks left are in a RESIDUE row (not when too many)
    residue: dict[str, list[int]] | None = None  # the chunks left themselves, when few enough for the driver
    lengths: list[int] | None = None  # the documents' lengths, when the group is small enough for the driver


@dataclass
class GroupSummary:
    """What a read task says of its group (its GROUP row): records its readers consumed, documents and
    tokens it kept, rejects it made, its chunks per length bucket, the tokenizer engine that encoded its
    text (None for token ids), and, for best-fit, its own first round."""

    records: int
    documents: int
    tokens: int
    rejects: int
    items: list[int]
    engine: str | None
    in_place: InPlace | None = None
    resumed: bool = False  # replayed from what an earlier attempt of the run wrote

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> GroupSummary:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict) -> GroupSummary:
        return cls(**{**d, "in_place": InPlace(**d["in_place"]) if d.get("in_place") else None})


def _in_place(lengths: np.ndarray, settings: ReadSettings) -> tuple[InPlace, dict | None]:
    """The group's chunks packed on their own (a few milliseconds), for the plan to weigh, and the chunks
    left for a RESIDUE row (None when they are too many). Groups hand over at most ``carry`` chunks (or
    documents' lengths) each, so that the driver's intake is bounded whatever the corpus: a small corpus
    of uneven groups is planned by one Spark task instead."""
    how = settings.in_place
    assert how is not None
    chunks, packed = pack_in_place(lengths, settings.seq_len, how.fill, how.max_segments)
    left = np.flatnonzero(~packed.final)
    handed_on = left.shape[0] <= max(how.carry, len(chunks) * IN_PLACE_RESIDUE)
    residue = ({"doc_index": chunks.doc[left].tolist(), "chunk": chunks.index[left].tolist(),
                "length": chunks.length[left].tolist()} if handed_on else None)
    buckets = np.bincount(length_buckets(chunks.length[left], settings.seq_len, settings.length_buckets))
    figures = InPlace(n_final=packed.n_final, residual_items=int(left.shape[0]),
                      residual_tokens=int(chunks.length[left].sum()), residue_buckets=np.flatnonzero(buckets).tolist(),
                      residue_counts=buckets[buckets > 0].tolist(), residue_row=handed_on,
                      residue=residue if left.shape[0] <= how.carry else None,
                      lengths=lengths.tolist() if len(chunks) <= how.carry else None)
    return figures, residue


def _lengths(raw: RawBatch) -> np.ndarray:
    """Each document's tokens, or (not yet tokenized) its characters, prompt included."""
    if raw.tokens is not None:
        return pc.list_value_length(raw.tokens).to_numpy(zero_copy_only=False)
    lengths = np.fromiter((len(t) for t in raw.texts), np.int64, len(raw.texts))
    if raw.prompts:
        lengths += np.fromiter((len(p) for p in raw.prompts), np.int64, len(raw.prompts))
    return lengths


@dataclass
class ReadResult:
    """What the read stage leaves: the documents (cached, one group per partition), the
    rejects files it wrote, and each group's counts."""

    rows: DataFrame                 # every row of the read (cached): release this one
    docs: DataFrame                 # DOC rows: group, doc_index, doc_id, n_tokens, source, row
    files: list[StagedFile]
    groups: list[GroupSummary]
    residue: DataFrame              # RESIDUE rows: group, info (the chunks each group's own BFD left)

    @property
    def records(self) -> int:
        return sum(g.records for g in self.groups)

    @property
    def documents(self) -> int:
        return sum(g.documents for g in self.groups)

    @property
    def rejects(self) -> int:
        return sum(g.rejects for g in self.groups)

    @property
    def resumed(self) -> int:
        """Groups replayed from what an earlier attempt of the run read."""
        return sum(g.resumed for g in self.groups)

    def engines(self) -> str | None:
        """The tokenizer engines the groups' tasks encoded text with (None: no text was encoded)."""
        return ", ".join(sorted({g.engine for g in self.groups if g.engine})) or None


def read_corpus(spark: SparkSession, inputs: InputPlan, settings: ReadSettings, staging: Staging,
                workspace: Workspace, *, counters: Counters | None = None) -> ReadResult:
    """Run the read stage: one task per group (partition ``g`` reads group ``g``); each adds what it read
    to ``counters`` (the progress lines') when it finishes."""
    n = inputs.n_groups
    rows = map_slices(spark, inputs.group_payloads(), n,
                      lambda g, mine: read_group(g, splits_of(mine[0]), settings, staging, workspace,
                                                 counters=counters),
                      spark_ddl(READ)).persist(StorageLevel.MEMORY_AND_DISK)
    summaries = F.col("kind").isin(int(ReadRow.GROUP), int(ReadRow.FILE))
    info = rows.filter(summaries).select("kind", "group", "info").collect()
    summaries_of: dict[int, GroupSummary] = {}
    files = []
    for r in info:
        if r["kind"] == ReadRow.GROUP:
            summaries_of[r["group"]] = GroupSummary.from_json(r["info"])
        else:
            files.append(StagedFile.from_json(r["info"]))
    counts = [summaries_of[g] for g in range(n)]
    docs = rows.filter(F.col("kind") == int(ReadRow.DOC)).drop("kind", "info")
    residue = rows.filter(F.col("kind") == int(ReadRow.RESIDUE)).select("group", "info")
    return ReadResult(rows, docs, files, counts, residue)
