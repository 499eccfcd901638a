"""``bfpack export``: the ``sequences`` table in the files trainers read, written by Spark tasks.

One task per table file reads that file a row group at a time (its memory: one row group; a
file not in ``seq_id`` order, which the pipeline never writes, is read whole and sorted) and
writes its shard (see :mod:`bfpack_spark.export.formats`) straight to the destination, on any
store pyarrow reaches (``s3://`` with the same storage options as ``pack``). The driver holds
the list of files, never a row.

Publication: a destination is an export once its ``manifest.json`` exists, and that is
written last, after every shard is written and counted against the Delta log (rows per file)
and the runs' ``stats`` rows (tokens, sequences). Before any shard, a marker,
``_bfpack_export.json``, says what is being written (it stays: deleting an object makes
pyarrow leave a directory object behind on S3); without a manifest, rerunning the same
export redoes it (shards are a function of the table's snapshot, so they come out the same),
and rerunning a finished one does nothing. A destination holding anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from bfpack_spark.constants import RETIRED_EXPORT_FORMATS
from bfpack_spark.export.formats import FORMATS, ShardSpec, hf_schema, token_dtype, write_shard
from bfpack_spark.io.store.fs import filesystem, join, make_dirs, parquet_row_groups, read_parquet
from bfpack_spark.io.store.workspace import atomic_output
from bfpack_spark.snapshot import SequencesSnapshot, TableFile, open_sequences

log = logging.getLogger("bfpack")

MANIFEST = "manifest.json"
MARKER = "_bfpack_export.json"
MANIFEST_FORMAT = "bfpack-export/1"


class ExportError(RuntimeError):
    """The export cannot be made as asked; the message says why and what to do."""


def shard_spec(snapshot: SequencesSnapshot, fmt: str, seq_length: int | None) -> ShardSpec:
    """How this snapshot is written as ``fmt``, checked before a byte is read."""
    if fmt in RETIRED_EXPORT_FORMATS:
        raise ExportError(RETIRED_EXPORT_FORMATS[fmt])
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")
    L = snapshot.seq_len
    if fmt == "hf":
        if seq_length is not None:
            raise ExportError("--seq-length pads megatron and olmo rows; hf rows are unpadded")
        return ShardSpec("hf", L, 0, "int32", snapshot.loss_masks)
    seq_length = L if seq_length is None else seq_length
    if seq_length < L:
        raise ExportError(f"--seq-length {seq_length} is shorter than the packed sequences (L = {L})")
    if fmt == "megatron":
        if snapshot.eos_id is None:
            raise ExportError(f"{snapshot.tokenizer} has no end-of-document token, which Megatron pads with and "
                              "finds documents by (EOD)")
        return ShardSpec("megatron", seq_length, snapshot.eos_id,
                         token_dtype("megatron", snapshot.vocab_size - 1), snapshot.loss_masks)
    # OLMo-core finds documents at EOS, so padding needs an id of its own: the first past the vocabulary
    pad = snapshot.vocab_size
    return ShardSpec("olmo", seq_length, pad, token_dtype("olmo", pad), snapshot.loss_masks)


@dataclass(frozen=True)
class _Task:
    """One shard: the table file it comes from, and where its files go."""

    index: int
    file: TableFile
    paths: tuple[str, ...]


def _sorted(table: pa.Table) -> pa.Table:
    return table.take(np.argsort(table["seq_id"].to_numpy(), kind="stable"))


def _write_shard(task: _Task, spec: ShardSpec) -> dict:
    """Read one table file a row group at a time, write its shard, and count what was written."""
    columns = ["seq_id", "run_id", "input_ids", "seg_lengths"] + (["loss_mask"] if spec.loss_masks else [])
    seq_ids = read_parquet(task.file.uri, ["seq_id"])["seq_id"].to_numpy()
    if len(seq_ids) != task.file.rows:
        raise ExportError(f"{task.file.uri} holds {len(seq_ids)} rows, the Delta log says {task.file.rows}")
    pieces: Iterable[pa.Table] = parquet_row_groups(task.file.uri, columns)
    if (np.diff(seq_ids) < 0).any():  # the pipeline writes files in seq_id order; sorting holds the whole file
        pieces = [_sorted(read_parquet(task.file.uri, columns))]
    stores = [filesystem(path) for path in task.paths]
    with ExitStack() as stack:
        outputs = [stack.enter_context(atomic_output(fs, path)) for fs, path in stores]
        local = all(isinstance(fs, pafs.LocalFileSystem) for fs, _ in stores)
        rows, tokens = write_shard(pieces, spec, outputs, reuse=local)
        sizes = [out.tell() for out in outputs]
    return {"index": task.index, "rows": rows, "tokens": tokens, "bytes": sum(sizes),
            "first_seq_id": int(seq_ids.min()) if len(seq_ids) else 0}


def _run_tasks(spark, tasks: list[_Task], spec: ShardSpec) -> list[dict]:
    """Every shard in its own Spark task; the figures each task counted."""
    from bfpack_spark.spark.partitioning import map_slices
    from bfpack_spark.spark.progress import stage_progress

    def write(_i: int, mine: list) -> Iterator[pa.RecordBatch]:
        for task in mine:
            yield pa.RecordBatch.from_pylist([{"figures": json.dumps(_write_shard(task, spec))}])

    with stage_progress(spark, "export"):
        rows = map_slices(spark, tasks, len(tasks), write, "figures string").collect()
    return sorted((json.loads(r["figures"]) for r in rows), key=lambda f: f["index"])


def _read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read())


def _write_json(fs: pafs.FileSystem, path: str, data: dict) -> None:
    with atomic_output(fs, path) as out:
        out.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _destination(to: str, key: dict) -> tuple[pafs.FileSystem, str, dict | None]:
    """The destination's file system and path, and its manifest when this very export is done there.

    An unfinished export of the same key is redone; anything else in the way is an error."""
    fs, base = filesystem(to)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        raise ExportError(f"{to} is a file; export to a directory")
    if info.type == pafs.FileType.NotFound:
        return fs, base, None
    manifest = _read_json(fs, posixpath.join(base, MANIFEST))
    if manifest is not None:
        if manifest.get("key") == key:
            return fs, base, manifest
        raise ExportError(f"{to} holds another export ({manifest.get('format')} of table version "
                          f"{manifest.get('table_version')}); remove it or export to another directory")
    marker = _read_json(fs, posixpath.join(base, MARKER))
    if marker is not None and marker == key:
        log.info("export: %s holds an unfinished export of the same table; redoing it", to)
        return fs, base, None
    if fs.get_file_info(pafs.FileSelector(base, allow_not_found=True)):
        raise ExportError(f"{to} already exists and is not an unfinished export of this table; remove it or "
                          "export to another directory")
    return fs, base, None


def _hf_metadata(fs: pafs.FileSystem, base: str, names: list[str], spec: ShardSpec, fingerprint: str) -> None:
    """``state.json`` and ``dataset_info.json`` of a ``datasets`` dataset whose data files are the
    shards, made by ``datasets`` itself (an empty dataset of the same schema saved to disk)."""
    try:
        import datasets
    except ImportError:
        raise ExportError("--format hf needs the datasets package: pip install 'bfpack-spark[hf]'") from None
    with tempfile.TemporaryDirectory() as tmp:
        shown = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            datasets.Dataset(hf_schema(spec.loss_masks).empty_table()).save_to_disk(tmp)
        finally:
            if shown:
                datasets.enable_progress_bars()
        with open(posixpath.join(tmp, "state.json"), encoding="utf-8") as fh:
            state = json.load(fh)
        with open(posixpath.join(tmp, "dataset_info.json"), encoding="utf-8") as fh:
            info = json.load(fh)
    state.update(_data_files=[{"filename": n} for n in names], _fingerprint=fingerprint, _split="train")
    _write_json(fs, posixpath.join(base, "state.json"), state)
    _write_json(fs, posixpath.join(base, "dataset_info.json"), info)


def _format_manifest(spec: ShardSpec, snapshot: SequencesSnapshot, to: str, shards: list[dict]) -> dict:
    """What each trainer is told: the files in order and the settings to read them with; ``vocab_size``:
    the ids a model trained on the export must embed (OLMo's padding is one id past the tokenizer's)."""
    files = [join(to, name) for s in shards for name in s["files"]]
    if spec.fmt == "megatron":
        prefixes = [join(to, s["files"][0].removesuffix(".bin")) for s in shards]
        return {"data_path": [x for s, p in zip(shards, prefixes) for x in (str(s["sequences"]), p)],
                "data_prefixes": prefixes, "dtype": spec.dtype, "eod_token_id": spec.pad_id,
                "train_args": f"--seq-length {spec.seq_len} --eod-mask-loss --reset-position-ids "
                              f"--reset-attention-mask",
                "vocab_size": snapshot.vocab_size, "loss_masks_carried": False}
    if spec.fmt == "olmo":
        return {"token_files": files[0::2], "label_mask_files": files[1::2], "dtype": spec.dtype,
                "eos_token_id": snapshot.eos_id, "pad_token_id": spec.pad_id, "bos_token_id": snapshot.bos_id,
                "vocab_size": spec.pad_id + 1, "loss_masks_carried": spec.loss_masks}
    return {"load_from_disk": to, "columns": hf_schema(spec.loss_masks).names, "pad_token_id": snapshot.pad_id,
            "vocab_size": snapshot.vocab_size, "loss_masks_carried": spec.loss_masks}


def export(root: str, fmt: str, to: str, *, run_id: str | None = None, seq_length: int | None = None,
           spark=None, master: str | None = None) -> dict:
    """Export ``<root>/sequences`` (one Delta snapshot, optionally one run) to the directory ``to`` as
    ``fmt`` (megatron, olmo, hf); return the manifest. Starts Spark (``master``) unless given a session."""
    root, to = (p if "://" in p else os.path.abspath(p) for p in (root, to))  # the manifest names them in full
    snapshot = open_sequences(root, run_id=run_id)
    spec = shard_spec(snapshot, fmt, seq_length)
    if snapshot.rows != snapshot.sequences:
        raise ExportError(f"{root}/sequences holds {snapshot.rows:,} rows where the runs' stats count "
                          f"{snapshot.sequences:,}; the table was changed outside bfpack")
    if fmt == "megatron" and spec.loss_masks:
        log.warning("export: Megatron's .bin has no place for loss masks; this export trains on every token. "
                    "Use --format olmo or --format hf to keep them")
    if fmt == "megatron" and not snapshot.append_eos:
        log.warning("export: the runs did not append EOS, so Megatron finds no document boundary inside a row "
                    "(positions and attention do not reset there)")
    key = {"format": MANIFEST_FORMAT, "source": root, "table_version": snapshot.version,
           "runs": list(snapshot.run_ids), "spec": asdict(spec)}
    fs, base, done = _destination(to, key)
    if done is not None:
        log.info("export: %s already holds this export; nothing to do", to)
        return {**done, "already_exported": True}
    make_dirs(fs, base)
    _write_json(fs, posixpath.join(base, MARKER), key)
    n = len(snapshot.files)
    tasks = [_Task(i, f, tuple(join(to, name) for name in spec.names(i, n))) for i, f in enumerate(snapshot.files)]
    log.info("export %s: %d shards of %s sequences to %s", fmt, n, f"{snapshot.rows:,}", to)
    if spark is None:
        from bfpack_spark.spark.session import get_spark

        spark = get_spark(master, "bfpack-export")
    figures = _run_tasks(spark, tasks, spec)
    wrong = [f"shard {f['index']}: {f['rows']} rows, the log says {tasks[f['index']].file.rows}"
             for f in figures if f["rows"] != tasks[f["index"]].file.rows]
    tokens = sum(f["tokens"] for f in figures)
    if len(figures) != n or wrong or tokens != snapshot.tokens:
        raise ExportError(f"the shards do not account for the table ({len(figures)} of {n} shards, {tokens:,} tokens "
                          f"of {snapshot.tokens:,}{'; ' + wrong[0] if wrong else ''}); nothing was published")
    shards = [{"files": spec.names(t.index, n), "sequences": f["rows"], "tokens": f["tokens"], "bytes": f["bytes"],
               "run_id": t.file.run_id, "first_seq_id": f["first_seq_id"]} for t, f in zip(tasks, figures)]
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if fmt == "hf":
        _hf_metadata(fs, base, [s["files"][0] for s in shards], spec, fingerprint)
    manifest = {
        "format": fmt, "key": key, "source": root, "table_version": snapshot.version, "runs": list(snapshot.run_ids),
        "tokenizer": snapshot.tokenizer, "tokenizer_vocab_size": snapshot.vocab_size, "seq_len": spec.seq_len,
        "packed_seq_len": snapshot.seq_len, "eos_token_id": snapshot.eos_id, "bos_token_id": snapshot.bos_id,
        "sequences": snapshot.rows,
        "tokens": tokens, "shards": shards, **_format_manifest(spec, snapshot, to, shards),
    }
    _write_json(fs, posixpath.join(base, MANIFEST), manifest)  # published
    return manifest
