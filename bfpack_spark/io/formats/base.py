"""What every format's reader shares: the split it reads, the fields it takes, the batches of
documents it hands out, and the rejects it makes of everything else, with their reason codes.

Readers never raise on bad data. Each bad record (malformed JSON, invalid UTF-8, a missing or null
field, a value of the wrong type, an over-large document, a corrupt or truncated compressed file)
becomes a :class:`Reject` with a reason a user can act on and a stable code (:func:`reason_code`);
everything else becomes a document with a stable position (``row``): the row index in a Parquet
file, or the byte offset of the line in a JSON-lines file (after decompression).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

#: documents per batch a reader hands out (and the read stage tokenizes at once)
BATCH_DOCS = 2048
#: a batch of several small files holds at most about this many bytes of text
BATCH_BYTES = 8 * 2**20
EXCERPT_CHARS = 160

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def detect_format(path: str) -> tuple[str, str | None] | None:
    """("jsonl"|"parquet", compression) from the file name, or None when unknown."""
    name = path.lower()
    compression = None
    for suffix, codec in COMPRESSION_SUFFIXES.items():
        if name.endswith(suffix):
            compression, name = codec, name[: -len(suffix)]
    if name.endswith(".parquet") and compression is None:
        return "parquet", None
    if any(name.endswith(s) for s in JSONL_SUFFIXES):
        return "jsonl", compression
    return None


@dataclass(frozen=True, slots=True)
class Split:
    """A piece of one input file that one read task reads: the contract between the driver's plan
    (:mod:`bfpack_spark.io.listing`) and the readers here. Made from the listing alone.

    ``byte_range`` cuts a large file: uncompressed JSON lines read the lines whose first byte lies
    in it; Parquet reads the row groups whose middle byte lies in it (the task reads the footer).
    """

    uri: str
    source: str                      # stable name: the file's path relative to its input root
    format: str                      # "jsonl", "parquet" or "text" (one document per file)
    size: int                        # bytes, as listed
    compression: str | None = None   # JSON lines: "gzip", "zstd" or None
    byte_range: tuple[int, int] | None = None  # [start, end) of the file; None: the whole file
    est_items: int = 1

    @property
    def whole(self) -> bool:
        return self.byte_range is None

    @property
    def nbytes(self) -> int:
        """The bytes of the file this split covers."""
        return self.size if self.byte_range is None else self.byte_range[1] - self.byte_range[0]


#: What a read task is told of its splits: one Arrow record batch per group (a few bytes per file,
#: where objects would take hundreds: a run of a million files broadcasts them all).
SPLITS = pa.schema([
    ("uri", pa.string()), ("source", pa.string()), ("format", pa.string()), ("size", pa.int64()),
    ("compression", pa.string()), ("start", pa.int64()), ("end", pa.int64()),  # start -1: the whole file
    ("est_items", pa.int64()),
])


def splits_bytes(batch: pa.RecordBatch) -> bytes:
    """A group's splits (:data:`SPLITS`) as bytes for its task (Arrow IPC, compressed)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SPLITS, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def splits_of(data: bytes | pa.RecordBatch) -> list[Split]:
    """A read task's splits, from :func:`splits_bytes` (or the record batch itself)."""
    batch = data if isinstance(data, pa.RecordBatch) else pa.ipc.open_stream(data).read_all()
    rows = batch.to_pydict()
    return [Split(u, s, f, z, c, None if a < 0 else (a, b), e) for u, s, f, z, c, a, b, e in
            zip(rows["uri"], rows["source"], rows["format"], rows["size"], rows["compression"], rows["start"],
                rows["end"], rows["est_items"])]


@dataclass(frozen=True)
class Limits:
    """Size limits of one document: its text's UTF-8 bytes (``quality.max_document_bytes``) and,
    for JSON lines, the raw line read into memory (``quality.max_line_bytes``)."""

    document_bytes: int
    line_bytes: int = 2**30


@dataclass(frozen=True)
class Fields:
    """What to take from each record: the text (or token) column, whether it holds token ids, the id
    column (None: ids from file and row), and an extra column: each document's loss mask (tokenized
    input) or prompt (text)."""

    column: str
    tokenized: bool = False
    id_column: str | None = None
    extra: str | None = None
    limits: Limits = Limits(256 * 2**20)

    @property
    def kind(self) -> str:
        return "tokens" if self.tokenized else "text"

    @property
    def extra_kind(self) -> str:
        """What the extra column holds: a loss mask beside tokens, a prompt beside text."""
        return "loss mask" if self.tokenized else "prompt"


@dataclass
class Reject:
    source: str
    row: int
    reason: str
    excerpt: str = ""
    doc_id: str | None = None


def _empty_strings() -> pa.Array:
    return pa.array([], pa.string())


@dataclass
class RawBatch:
    """Documents of one batch: their files (``sources``), positions, ids, and texts (str) or token
    lists (Arrow); with an extra column, each text's prompt (str) or each token list's loss mask
    (Arrow). Batches of several files are joined by :meth:`concat`."""

    rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    ids: pa.Array = field(default_factory=_empty_strings)
    sources: pa.Array = field(default_factory=_empty_strings)
    texts: list[str] = field(default_factory=list)
    tokens: pa.Array | None = None
    prompts: list[str] = field(default_factory=list)
    masks: pa.Array | None = None
    rejects: list[Reject] = field(default_factory=list)
    n_records: int = 0  # records the reader consumed: documents, or rejects it made itself

    def __len__(self) -> int:
        return len(self.rows)

    def reject_where(self, mask: np.ndarray, reason: str | list[str]) -> None:
        """Move the documents selected by ``mask`` to the rejects, with one reason or one each."""
        if not mask.any():
            return
        bad = np.flatnonzero(mask)
        reasons = reason if isinstance(reason, list) else [reason] * bad.shape[0]
        picked = pa.array(bad)
        for i, why, doc_id, source in zip(bad, reasons, self.ids.take(picked).to_pylist(),
                                          self.sources.take(picked).to_pylist()):
            self.rejects.append(Reject(source, int(self.rows[i]), why, "", doc_id))
        keep = ~mask
        kept = pa.array(keep)
        self.rows, self.ids, self.sources = self.rows[keep], self.ids.filter(kept), self.sources.filter(kept)
        if self.tokens is not None:
            self.tokens = self.tokens.filter(kept)
        if self.masks is not None:
            self.masks = self.masks.filter(kept)
        if self.texts:
            self.texts = [t for t, k in zip(self.texts, keep) if k]
        if self.prompts:
            self.prompts = [p for p, k in zip(self.prompts, keep) if k]

    @classmethod
    def concat(cls, batches: list[RawBatch]) -> RawBatch:
        """One batch of these, in order (token lists and masks as list<int64> where their types differ)."""
        if len(batches) == 1:
            return batches[0]
        out = cls(rows=np.concatenate([b.rows for b in batches]),
                  ids=pa.concat_arrays([b.ids.cast(pa.string()) for b in batches]),
                  sources=pa.concat_arrays([b.sources for b in batches]),
                  texts=[t for b in batches for t in b.texts], prompts=[p for b in batches for p in b.prompts],
                  rejects=[r for b in batches for r in b.rejects], n_records=sum(b.n_records for b in batches))
        out.tokens = _concat_lists([b.tokens for b in batches if len(b)])
        out.masks = _concat_lists([b.masks for b in batches if len(b)])
        return out


def _concat_lists(arrays: list[pa.Array | None]) -> pa.Array | None:
    present = [a for a in arrays if a is not None]
    if not present or len(present) != len(arrays):
        return None
    if len({a.type for a in present}) > 1:
        present = [a.cast(pa.list_(pa.int64())) for a in present]
    return pa.concat_arrays(present)


def excerpt(value: object) -> str:
    if isinstance(value, bytes):
        value = value[: EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    text = str(value)
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "..."


def too_large(max_bytes: int) -> str:
    return f"document larger than max_document_bytes ({max_bytes:,} bytes of UTF-8 text)"


#: Each reject's stable code (for grouping), from the start of its human reason; first match wins.
REASON_CODES: list[tuple[str, str]] = [
    (r"document larger than", "too_large"), (r"line larger than", "line_too_large"),
    (r"blank line", "blank_line"), (r"invalid UTF-8", "invalid_utf8"),
    (r"malformed JSON", "invalid_json"), (r"not a JSON object", "not_object"),
    (r"id (field|column) .* is (missing|null or empty)", "missing_id"), (r"id (field|column)", "bad_id"),
    (r"(text|tokens) (field|column) .* is (null|missing)", "missing_text"),
    (r"(text|prompt) holds an unpaired surrogate", "invalid_unicode"),
    (r"loss mask (field|column)", "bad_loss_mask"), (r"prompt (field|column)", "bad_prompt"),
    (r"(text|token|tokens) (field|column)", "bad_text_type"), (r"token id .* outside the vocabulary", "bad_tokens"),
    (r"empty document", "empty"), (r"no tokens", "no_tokens"), (r"duplicate id", "duplicate_id"),
    (r"corrupt or truncated", "corrupt_file"), (r"unreadable Parquet data", "corrupt_row_group"),
    (r"unreadable", "unreadable_file"),
]


def reason_code(reason: str) -> str:
    """The stable code of a reject's reason (``other`` for none listed)."""
    return next((code for pattern, code in REASON_CODES if re.match(pattern, reason)), "other")


def position(source: str, row: int) -> str:
    """Where a record is, in words: a JSON line by the byte offset it starts at (in the
    decompressed stream), a Parquet record by its row number, a text file as a whole."""
    found = detect_format(source)
    if found is None:
        return "the file" if row == 0 else f"row {row}"
    return f"byte {row}" if found[0] == "jsonl" else f"row {row}"
