"""Cutting the listed files into groups, one read task each, from the listing alone.

Each file's items (chunks of at most ``seq_len`` tokens) are estimated from its size and format;
a file estimated above ``target_items`` that can be cut is cut into byte ranges: uncompressed JSON
lines anywhere (the read tasks find the lines), Parquet at row groups (its footer, one ranged read,
says where they start). Consecutive splits are gathered into groups of about ``target_items``, at
least ``min_groups`` where the files allow. So the same files and config give the same groups,
whatever the order of the listing, the machine or the number of cores; no small file is opened.

Before that, the first input file is looked into (one small read): a text or token column named
wrongly fails the run in seconds, with the columns the file has.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bfpack_spark.errors import InputError
from bfpack_spark.io.formats.base import SPLITS, Split, splits_bytes, splits_of
from bfpack_spark.io.formats.fetch import FOOTER_BYTES, Opened
from bfpack_spark.io.formats.jsonl import first_record
from bfpack_spark.io.formats.parquet import columns_of, row_group_start
from bfpack_spark.io.listing.listing import Listing
from bfpack_spark.io.store.fs import open_input

#: Rough sizes used to size groups before anything is read.
BYTES_PER_TOKEN = 4
BYTES_PER_DOCUMENT = 1024
COMPRESSION_RATIO = {"gzip": 3, "zstd": 4}
#: Parquet: the text's bytes per byte of file, and (token lists) the tokens per byte of file
PARQUET_TEXT_RATIO = 3
PARQUET_BYTES_PER_TOKEN = 2
#: files looked into for a named column the first file lacks
SAMPLED_FILES = 8
#: threads reading the footers of large Parquet files
FOOTER_THREADS = 16

@dataclass
class InputPlan:
    """The files a run packs (sorted by source) and the groups its read tasks read: ``splits`` holds,
    for each split in order, its file (an index into the listing), its byte range (``start`` -1:
    the whole file), its estimated items and its group."""

    listing: Listing
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    n_groups: int = 0
    #: re-packed files: uri -> the earlier run whose rows this run replaces
    replaces: dict[str, str] = field(default_factory=dict)

    def group_splits(self, g: int) -> list[Split]:
        """The splits of group ``g``, in order."""
        return splits_of(self.group_batch(g))

    def group_payloads(self) -> list[bytes]:
        """Every group's splits as its read task gets them (a few bytes per file: see :func:`splits_bytes`)."""
        return [splits_bytes(self.group_batch(g)) for g in range(self.n_groups)]

    def group_batch(self, g: int) -> pa.RecordBatch:
        """The splits of group ``g`` as the read task gets them (:data:`SPLITS`)."""
        p = self.splits
        lo, hi = np.searchsorted(p["group"], [g, g + 1])
        files = self.listing.table.take(pa.array(p["file"][lo:hi]))
        start, end = p["start"][lo:hi], p["end"][lo:hi]
        return pa.RecordBatch.from_arrays([
            files.column("uri").combine_chunks(), files.column("source").combine_chunks(),
            files.column("format").combine_chunks(), files.column("size").combine_chunks(),
            files.column("compression").combine_chunks(), pa.array(start), pa.array(end),
            pa.array(p["est"][lo:hi])], schema=SPLITS)

    @property
    def groups(self) -> list[list[Split]]:
        """Every group's splits (a list of objects per split: for tests and small inputs)."""
        return [self.group_splits(g) for g in range(self.n_groups)]


def estimated_items(listing: Listing, tokenized: bool, seq_len: int) -> np.ndarray:
    """Each file's items (documents, and chunks beyond the first of long ones), from its size alone:
    a document of about a kilobyte of text, a token of about four bytes."""
    size = listing.table.column("size").to_numpy().astype(np.int64)
    ratio = np.ones(len(size), np.int64)
    for codec, r in COMPRESSION_RATIO.items():
        ratio[listing.where("compression", codec)] = r
    text = size * ratio
    est = text // BYTES_PER_DOCUMENT + text // (BYTES_PER_TOKEN * seq_len)
    parquet = listing.where("format", "parquet")
    if tokenized:
        tokens = size[parquet] // PARQUET_BYTES_PER_TOKEN
        est[parquet] = tokens // 256 + tokens // seq_len
    else:
        text = size[parquet] * PARQUET_TEXT_RATIO
        est[parquet] = text // BYTES_PER_DOCUMENT + text // (BYTES_PER_TOKEN * seq_len)
    plain = listing.where("format", "text")
    est[plain] = 1 + size[plain] // (BYTES_PER_TOKEN * seq_len)
    return np.maximum(est, 1)


def _row_groups(listing: Listing, i: int, payload: str, tokenized: bool, seq_len: int) -> np.ndarray | None:
    """(first byte, estimated items) of each row group of the ``i``-th file, a Parquet file, from its
    footer (one ranged read); None when the footer cannot be read (its tasks make that a reject)."""
    t = listing.table.slice(i, 1).to_pylist()[0]
    try:
        with open_input(t["uri"], t["size"], FOOTER_BYTES) as fh:
            meta = pq.ParquetFile(fh).metadata
    except pa.ArrowException:  # damaged (its task makes it a reject); a store that failed is not: the groups
        return None            # must not depend on it
    except OSError as exc:
        raise InputError(f"cannot read the footer of {t['uri']}: {exc}") from None
    out = np.zeros((meta.num_row_groups, 2), np.int64)
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        size = sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                   if rg.column(c).path_in_schema.split(".")[0] == payload)
        out[g] = row_group_start(rg), rg.num_rows + size // (4 if tokenized else BYTES_PER_TOKEN) // seq_len
    return out


def _cuts(row_groups: np.ndarray, size: int, target: int) -> list[tuple[int, int, int]]:
    """A Parquet file's byte ranges of consecutive row groups of about ``target`` items: (start, end, items);
    each row group's middle byte lies in its range (how its task finds it: ``row_groups_in``)."""
    cuts, start, held = [], 0, 0
    for g, (_, items) in enumerate(row_groups.tolist()):
        held += items
        if held >= target and g + 1 < len(row_groups):
            end = int(row_groups[g + 1, 0])
            cuts.append((start, end, held))
            start, held = end, 0
    cuts.append((start, size, max(held, 1)))
    return cuts


def _splits(listing: Listing, est: np.ndarray, target: int,
            row_groups: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """Every file cut where it can be into byte ranges of about ``target`` items, in order: a Parquet file
    whose footer was read (``row_groups``) at row groups, uncompressed JSON lines anywhere (its tasks
    find the lines), others not at all."""
    t = listing.table
    size = t.column("size").to_numpy().astype(np.int64)
    jsonl = listing.where("format", "jsonl") & ~listing.where("compression", None)  # uncompressed
    wanted = np.where(jsonl & (est > target), -(-est // target), 1)
    step = -(-size // wanted)
    n = np.where(wanted > 1, -(-size // np.maximum(step, 1)), 1)  # ranges of ``step`` bytes
    cuts = {i: _cuts(rgs, int(size[i]), target) for i, rgs in row_groups.items()}
    for i, c in cuts.items():
        n[i] = len(c)
    file = np.repeat(np.arange(len(size)), n)
    k = np.arange(file.shape[0]) - np.repeat(np.cumsum(n) - n, n)
    cut = np.repeat(wanted > 1, n)
    splits = {"file": file, "start": np.where(cut, k * step[file], -1),
              "end": np.where(cut, np.minimum((k + 1) * step[file], size[file]), -1),
              "est": np.where(cut, est[file] // wanted[file], est[file])}
    first = np.cumsum(n) - n
    for i, c in cuts.items():
        if len(c) > 1:
            at = slice(first[i], first[i] + len(c))
            splits["start"][at], splits["end"][at], splits["est"][at] = np.asarray(c, np.int64).T
    return splits


def _grouped(est: np.ndarray, target: int) -> np.ndarray:
    """Consecutive splits in groups of about ``target`` items: a split is in the group its first item falls
    in, counting ``target`` items a group (groups no split starts in are skipped)."""
    return np.unique((np.cumsum(est) - est) // target, return_inverse=True)[1].astype(np.int64)


def _target(est: np.ndarray, target_items: int, min_groups: int) -> int:
    total = int(est.sum())
    return max(1, -(-total // min_groups)) if total < target_items * min_groups else target_items


def plan_groups(listing: Listing, payload: str, *, tokenized: bool, seq_len: int, target_items: int,
                min_groups: int = 1) -> InputPlan:
    """Groups of about ``target_items`` items, at least ``min_groups`` where the files can be cut that
    finely (see the module). The footers of Parquet files large enough to be cut are read (one ranged
    read each, in a thread pool): they are cut at row groups."""
    est = estimated_items(listing, tokenized, seq_len)
    large = np.flatnonzero((est > _target(est, target_items, min_groups))
                           & listing.where("format", "parquet"))
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        found = pool.map(lambda i: _row_groups(listing, int(i), payload, tokenized, seq_len), large)
        row_groups = {int(i): rgs for i, rgs in zip(large, found) if rgs is not None and len(rgs)}
    for i, rgs in row_groups.items():
        est[i] = max(1, int(rgs[:, 1].sum()))
    target = _target(est, target_items, min_groups)
    splits = _splits(listing, est, target, row_groups)
    splits["group"] = _grouped(splits["est"], target)
    return InputPlan(listing, splits, int(splits["group"][-1]) + 1 if len(listing) else 0)


def _missing_payload(payload: str, tokenized: bool, where: str) -> InputError:
    flag = "--token-column" if tokenized else "--text-column"
    return InputError(f"{flag} {payload!r} is not {where}")


def _columns(listing: Listing, i: int) -> list[str] | None:
    """The columns of the ``i``-th file: its Parquet footer, or its first JSON record's fields (None:
    unreadable, or no columns to look for: text files)."""
    t = listing.table.slice(i, 1).to_pylist()[0]
    opened = Opened(Split(t["uri"], t["source"], t["format"], t["size"], t["compression"]))
    if t["format"] == "parquet":
        return columns_of(opened)
    if t["format"] == "jsonl":
        try:
            first = first_record(opened)
        except OSError:  # unreadable: its read task makes it a reject
            return None
        return None if first is None else sorted(first)
    return None


def check_columns(listing: Listing, payload: str, tokenized: bool, named: dict[str, str]) -> None:
    """The text (or token) column must be in the first input file; each column ``named`` explicitly
    ({column: flag}) must be in the first, or in one of a few files spread over the listing (a typo
    would silently give every document a file:row id, or no loss mask)."""
    if not (listing.where("format", "jsonl") | listing.where("format", "parquet")).any():
        return
    first = _columns(listing, 0)
    source = listing.table.column("source")[0].as_py()
    if first is not None and payload not in first:
        fmt = listing.table.column("format")[0].as_py()
        raise _missing_payload(payload, tokenized, f"a {'column' if fmt == 'parquet' else 'field of the first record'}"
                                                   f" of {listing.table.column('uri')[0].as_py()} "
                                                   f"({'columns' if fmt == 'parquet' else 'fields'}: "
                                                   f"{', '.join(first)})")
    missing = {c: flag for c, flag in named.items() if first is None or c not in first}
    if not missing:
        return
    sample = sorted(set(np.linspace(1, len(listing) - 1, min(SAMPLED_FILES, len(listing) - 1), dtype=int).tolist()))
    with ThreadPoolExecutor(SAMPLED_FILES) as pool:
        for columns in pool.map(lambda i: _columns(listing, i), sample if len(listing) > 1 else []):
            missing = {c: flag for c, flag in missing.items() if columns is None or c not in columns}
    for column, flag in missing.items():
        way_out = "drop the flag for file:row ids" if flag == "--id-column" else f"drop {flag}"
        looked = f"the {1 + len(sample)} of {len(listing)} looked at; " if len(listing) > 1 + len(sample) else ""
        raise InputError(f"{flag} {column!r} is in no input file ({looked}columns of {source}: "
                         f"{', '.join(first or []) or 'none'}); name an existing column, or {way_out}")
