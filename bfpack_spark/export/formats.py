"""What each trainer reads, built from one file of the ``sequences`` table: pure numpy and Arrow.

Every export writes one *shard* per table file: a Spark task reads one file a row group at a
time and writes its shard, and the shards of a table are written in parallel. The functions here turn a
file's rows (sorted by ``seq_id``), a row group at a time, into the bytes of its shard:

- ``megatron``: Megatron-LM's indexed dataset, ``.bin`` (raw tokens) and ``.idx`` (``MMIDIDX``
  version 1). Every row is one sequence and one document of exactly ``seq_len`` tokens, padded
  with the EOS id (Megatron's EOD), so ``GPTDataset`` with ``--seq-length seq_len`` gives
  sample k = one row, and its ``--reset-position-ids`` / ``--reset-attention-mask`` /
  ``--eod-mask-loss`` find document boundaries at the EOS each document ends with.
- ``olmo``: OLMo-core's token files, raw little-endian ids with no header, rows of exactly
  ``seq_len`` padded with a pad id that is not EOS; beside each, a label-mask file (one byte
  per token, 0 where a token is never a target: padding, a segment's first token, and
  wherever the run's loss mask is 0).
- ``hf``: an Arrow stream file of a ``datasets`` dataset (``load_from_disk``) with what TRL's
  padding-free collator reads: ``input_ids`` unpadded, ``seq_lengths`` (from which it builds
  position ids restarting per segment) and, for runs with loss masks, ``labels`` (the token, or
  -100 where its mask is 0; the collator also sets -100 at every segment start). No
  ``position_ids`` column: TRL never reads one (its SFTTrainer drops it), and it would double
  the bytes written (without labels; with them, add half).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from bfpack_spark.constants import EXPORT_FORMATS
from bfpack_spark.masks import IGNORE_INDEX
from bfpack_spark.packing._jit import jit

FORMATS = EXPORT_FORMATS

#: Megatron's token dtype codes (megatron.core.datasets.indexed_dataset.DType).
MEGATRON_DTYPES = {"uint16": 8, "int32": 4}
MEGATRON_HEADER = b"MMIDIDX\x00\x00"


@dataclass(frozen=True)
class ShardSpec:
    """How every shard of one export is written (small; pickled into the tasks)."""

    fmt: str
    seq_len: int           # row length written (megatron, olmo): the packed L, or more
    pad_id: int            # what fills a row: EOS for megatron, the pad id for olmo
    dtype: str             # token dtype of megatron and olmo files
    loss_masks: bool       # the run's sequences carry loss masks

    def names(self, index: int, n_shards: int) -> list[str]:
        """The file names of shard ``index`` (of ``n_shards``), in the order :func:`write_shard` takes
        its ``outputs``."""
        if self.fmt == "megatron":
            return [f"part-{index:05d}.bin", f"part-{index:05d}.idx"]
        if self.fmt == "olmo":
            return [f"part-{index:05d}.npy", f"part-{index:05d}.mask"]
        return [f"data-{index:05d}-of-{n_shards:05d}.arrow"]


def token_dtype(fmt: str, largest_id: int) -> str:
    """The narrowest dtype a trainer takes for ids up to ``largest_id``: uint16 where they fit,
    else int32 for Megatron (it has no uint32) and uint32 for OLMo-core."""
    if largest_id < 2**16:
        return "uint16"
    return "int32" if fmt == "megatron" else "uint32"


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A list column's values and offsets (from 0) as numpy arrays (a row group's column is one chunk: no copy)."""
    arr = column
    if isinstance(column, pa.ChunkedArray):
        arr = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


@jit
def _pad_rows(values, offsets, pad_id, out):
    for r in range(out.shape[0]):
        start, n = offsets[r], offsets[r + 1] - offsets[r]
        for j in range(n):
            out[r, j] = values[start + j]
        for j in range(n, out.shape[1]):
            out[r, j] = pad_id


def _rows(n: int, seq_len: int, dtype: np.dtype, spare: list | None) -> np.ndarray:
    """``n`` rows to fill: a new array or, when the caller keeps a ``spare`` one, a view of it (grown as
    needed), which saves the first touch of fresh pages for every piece."""
    if spare is None:
        return np.empty((n, seq_len), dtype)
    if not spare or spare[0].shape[0] < n:
        spare[:] = [np.empty((n, seq_len), dtype)]
    return spare[0][:n]


def padded_rows(table: pa.Table, seq_len: int, pad_id: int, dtype: str, spare: list | None = None) -> np.ndarray:
    """``[rows, seq_len]``: each row's tokens, then ``pad_id`` (little-endian ``dtype``)."""
    values, offsets = _flat(table["input_ids"])
    lengths = np.diff(offsets)
    if lengths.size and lengths.max() > seq_len:
        raise ValueError(f"a sequence holds {lengths.max()} tokens, more than the row length {seq_len}")
    out = _rows(len(lengths), seq_len, np.dtype(dtype).newbyteorder("<"), spare)
    _pad_rows(values, offsets, pad_id, out)
    return out


def megatron_index(n_rows: int, seq_len: int, dtype: str) -> bytes:
    """The ``.idx`` of ``n_rows`` sequences of ``seq_len`` tokens, each its own document."""
    itemsize = np.dtype(dtype).itemsize
    return b"".join([
        MEGATRON_HEADER, struct.pack("<Q", 1), struct.pack("<B", MEGATRON_DTYPES[dtype]),
        struct.pack("<Q", n_rows), struct.pack("<Q", n_rows + 1),
        np.full(n_rows, seq_len, np.int32).tobytes(),
        (np.arange(n_rows, dtype=np.int64) * seq_len * itemsize).tobytes(),
        np.arange(n_rows + 1, dtype=np.int64).tobytes(),
    ])


@jit
def _label_mask(offsets, seg_lengths, seg_offsets, masks, out):
    for r in range(out.shape[0]):
        start, n = offsets[r], offsets[r + 1] - offsets[r]
        for j in range(n):
            out[r, j] = masks[start + j] if masks.shape[0] else 1
        for j in range(n, out.shape[1]):
            out[r, j] = 0
        at = 0
        for k in range(seg_offsets[r], seg_offsets[r + 1]):
            out[r, at] = 0
            at += seg_lengths[k]


def olmo_label_mask(table: pa.Table, seq_len: int, loss_masks: bool, spare: list | None = None) -> np.ndarray:
    """``[rows, seq_len]`` uint8: 1 where the token is a target. 0 on padding, on each segment's
    first token (no target crosses a document boundary), and where the run's loss mask is 0."""
    _, offsets = _flat(table["input_ids"])
    seg_lengths, seg_offsets = _flat(table["seg_lengths"])
    masks = _flat(table["loss_mask"])[0] if loss_masks else np.empty(0, np.int8)
    out = _rows(len(offsets) - 1, seq_len, np.dtype(np.uint8), spare)
    _label_mask(offsets, seg_lengths, seg_offsets, masks, out)
    return out


def hf_table(table: pa.Table, loss_masks: bool) -> pa.Table:
    """The padding-free columns TRL reads: unpadded ``input_ids``, ``seq_lengths``, ``labels`` where the
    run has loss masks; ``seq_id`` and ``run_id`` to trace."""
    values, offsets = _flat(table["input_ids"])
    list_offsets = pa.array(offsets.astype(np.int32))
    columns = {"input_ids": pa.ListArray.from_arrays(list_offsets, pa.array(values.astype(np.int32, copy=False))),
               "seq_lengths": table["seg_lengths"].combine_chunks()}
    if loss_masks:
        labels = np.where(_flat(table["loss_mask"])[0] == 1, values, IGNORE_INDEX).astype(np.int32)
        columns["labels"] = pa.ListArray.from_arrays(list_offsets, pa.array(labels))
    columns["seq_id"] = table["seq_id"].combine_chunks()
    columns["run_id"] = table["run_id"].combine_chunks().cast(pa.string())
    return pa.table(columns, schema=hf_schema(loss_masks))


def hf_schema(loss_masks: bool) -> pa.Schema:
    """The schema of every ``hf`` shard (also of an export's ``dataset_info.json``)."""
    lists = pa.list_(pa.int32())
    fields = [("input_ids", lists), ("seq_lengths", lists)]
    fields += [("labels", lists)] if loss_masks else []
    return pa.schema(fields + [("seq_id", pa.int64()), ("run_id", pa.string())])


def write_shard(pieces: Iterable[pa.Table], spec: ShardSpec, outputs: list, reuse: bool = False) -> tuple[int, int]:
    """Write the files of one shard (named by :meth:`ShardSpec.names`, one writable stream each) from one
    table file's rows in ``seq_id`` order, given a piece (a row group) at a time, and return the rows and
    tokens written. A piece's arrays go to the streams as buffers, never copied to bytes; memory is one piece.

    ``reuse``: the streams copy what they are given before ``write`` returns (local files), so one
    buffer per stream serves every piece. Not for object stores: an upload may keep the buffer."""
    if spec.fmt not in FORMATS:
        raise ValueError(f"unknown export format {spec.fmt!r}; one of {', '.join(FORMATS)}")
    spares: tuple[list | None, list | None] = ([], []) if reuse else (None, None)
    rows = tokens = 0
    with ExitStack() as stack:
        if spec.fmt == "hf":  # an Arrow stream file: what datasets memory-maps
            writer = stack.enter_context(pa.ipc.new_stream(outputs[0], hf_schema(spec.loss_masks)))
        for piece in pieces:
            if spec.fmt == "hf":
                writer.write_table(hf_table(piece, spec.loss_masks), max_chunksize=1000)
            else:
                outputs[0].write(pa.py_buffer(padded_rows(piece, spec.seq_len, spec.pad_id, spec.dtype, spares[0])))
            if spec.fmt == "olmo":
                outputs[1].write(pa.py_buffer(olmo_label_mask(piece, spec.seq_len, spec.loss_masks, spares[1])))
            rows += piece.num_rows
            tokens += int(_flat(piece["input_ids"])[1][-1])
    if spec.fmt == "megatron":
        outputs[1].write(megatron_index(rows, spec.seq_len, spec.dtype))
    return rows, tokens
