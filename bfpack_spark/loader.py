"""Packed sequences into a training loop: a per-rank, resumable torch ``IterableDataset``.

Order. An epoch's order is a permutation of the snapshot's sequences, drawn from
``(seed, epoch)`` alone: the files are shuffled, then the rows within each file. Laid end to
end, that order is cut into ``world_size`` contiguous shards (sizes differ by at most one;
with ``drop_last``, the last ``N mod world_size`` sequences of the order are left out so all
are equal), and a rank's shard into contiguous pieces, one per DataLoader worker. So every
sequence is read exactly once per epoch, by one worker of one rank, and each worker reads
whole files one at a time: memory is one table file (about 64 MB of tokens), whatever the
table's size.

Resume. ``state_dict()`` is the epoch and the number of sequences consumed from the
worker's piece; ``load_state_dict`` makes the next iteration skip them. With DataLoader
workers, use ``torchdata.stateful_dataloader.StatefulDataLoader``: it asks each worker's
copy of the dataset for its state and gives it back on resume.

Pad id. Padding has no target and attends only to itself (see :mod:`bfpack_spark.masks`),
so its id never reaches the loss. It is the EOS id of the runs' tokenizer (``<|endoftext|>``,
100257, for cl100k_base) when the runs tokenized text or appended EOS, else 0; ``pad_id``
overrides it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

from bfpack_spark import masks as masking
from bfpack_spark.io.store.fs import read_parquet
from bfpack_spark.masks import labels, pad, position_ids
from bfpack_spark.snapshot import SequencesSnapshot, open_sequences

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # torch is an optional extra
    raise ImportError("bfpack_spark.loader needs PyTorch: pip install 'bfpack-spark[torch]'") from exc

COLUMNS = ["seq_id", "input_ids", "seg_lengths", "run_id", "loss_mask"]


def shard(n: int, index: int, count: int) -> tuple[int, int]:
    """The ``index``-th of ``count`` contiguous pieces of ``range(n)``; sizes differ by at most one."""
    return n * index // count, n * (index + 1) // count


def epoch_order(rows: list[int], seed: int, epoch: int, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
    """The files in the epoch's order, and where each starts in it (positions in ``0..sum(rows)``)."""
    order = np.arange(len(rows))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    sizes = np.asarray(rows, dtype=np.int64)[order]
    return order, np.concatenate([[0], np.cumsum(sizes)])


def rows_within(file_index: int, rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of one file's rows in the epoch (a function of the file, seed and epoch only)."""
    if not shuffle:
        return np.arange(rows)
    return np.random.default_rng([seed, epoch, file_index]).permutation(rows)


class PackedSequences(IterableDataset):
    """The ``sequences`` table under ``root``, as examples for one data-parallel rank.

    Each example is a dict: ``seq_id``, ``run_id``, ``input_ids`` (length L, padded with
    ``pad_id``), ``labels`` (the next token within the same segment, else -100),
    ``position_ids`` (restarting at every segment; ``position_ids="continuous"`` keeps
    0..L-1, the paper's setting) and ``seq_lens`` (the segment lengths). Batch them with
    :func:`collate`.
    """

    def __init__(self, root: str, *, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 run_id: str | None = None, drop_last: bool = False,
                 position_ids: Literal["restart", "continuous"] = "restart", pad_id: int | None = None,
                 version: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if position_ids not in ("restart", "continuous"):
            raise ValueError(f"position_ids must be 'restart' or 'continuous', got {position_ids!r}")
        self.snapshot: SequencesSnapshot = open_sequences(root, run_id=run_id, version=version, pad_id=pad_id)
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.restart = position_ids == "restart"
        self.epoch = 0
        self._consumed = 0   # sequences of this worker's piece yielded in the current epoch
        self._skip = 0       # to skip at the next iteration (set by load_state_dict)
        n = self.snapshot.rows
        self._total = n // world_size * world_size if drop_last else n

    @property
    def seq_len(self) -> int:
        return self.snapshot.seq_len

    @property
    def pad_id(self) -> int:
        return self.snapshot.pad_id

    def __len__(self) -> int:
        """The number of sequences this rank yields per epoch."""
        start, end = shard(self._total, self.rank, self.world_size)
        return end - start

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on (the same on every rank and machine)."""
        self.epoch = epoch

    def _piece(self) -> tuple[int, int, int, int]:
        """This worker's positions ``[start, end)`` in the epoch's order, and its worker id and count."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start, end = shard(self._total, self.rank, self.world_size)
        lo, hi = shard(end - start, worker, workers)
        return start + lo, start + hi, worker, workers

    def state_dict(self) -> dict[str, Any]:
        _, _, worker, workers = self._piece()
        return {"version": self.snapshot.version, "seed": self.seed, "epoch": self.epoch,
                "rank": self.rank, "world_size": self.world_size, "worker": worker, "workers": workers,
                "consumed": self._consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields exactly what this worker's piece had left."""
        _, _, worker, workers = self._piece()
        mine = {"version": self.snapshot.version, "seed": self.seed, "rank": self.rank,
                "world_size": self.world_size, "worker": worker, "workers": workers}
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differ:
            raise ValueError("the saved loader state belongs to another setup (saved, now): "
                             + ", ".join(f"{k} {a!r} != {b!r}" for k, (a, b) in differ.items())
                             + "; resume with the same table version, seed, ranks and workers")
        self.epoch = state["epoch"]
        self._consumed = self._skip = state["consumed"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start, end, _, _ = self._piece()
        skip, self._skip = self._skip, 0
        self._consumed = skip
        start += skip
        files = self.snapshot.files
        order, offsets = epoch_order([f.rows for f in files], self.seed, self.epoch, self.shuffle)
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        for k in range(max(first, 0), len(order)):
            if offsets[k] >= end:
                break
            lo, hi = max(start, offsets[k]) - offsets[k], min(end, offsets[k + 1]) - offsets[k]
            index = int(order[k])
            rows = rows_within(index, files[index].rows, self.seed, self.epoch, self.shuffle)[lo:hi]
            yield from self._examples(files[index].uri, rows)

    def _examples(self, uri: str, rows: np.ndarray) -> Iterator[dict[str, Any]]:
        table = read_parquet(uri, COLUMNS if self.snapshot.loss_masks else COLUMNS[:-1]).take(rows)
        seq_ids = table["seq_id"].to_numpy()
        run_ids = table["run_id"].to_pylist()
        ids, segs = table["input_ids"].combine_chunks(), table["seg_lengths"].combine_chunks()
        masks = table["loss_mask"].combine_chunks().values.to_numpy() if self.snapshot.loss_masks else None
        id_values, id_offsets = ids.values.to_numpy(), ids.offsets.to_numpy()
        seg_values, seg_offsets = segs.values.to_numpy(), segs.offsets.to_numpy()
        L = self.seq_len
        for i in range(len(rows)):
            tokens = id_values[id_offsets[i]:id_offsets[i + 1]]
            seg_lengths = seg_values[seg_offsets[i]:seg_offsets[i + 1]]
            self._consumed += 1
            yield {
                "seq_id": int(seq_ids[i]),
                "run_id": run_ids[i],
                "input_ids": torch.from_numpy(pad(tokens, L, self.pad_id)),
                "labels": torch.from_numpy(labels(tokens, seg_lengths, L, None if masks is None
                                                  else masks[id_offsets[i]:id_offsets[i + 1]])),
                "position_ids": torch.from_numpy(position_ids(seg_lengths, L, self.restart)),
                "seq_lens": torch.from_numpy(seg_lengths.astype(np.int64)),
            }


def causal_block_mask(seq_lens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[B, 1, L, L]`` booleans, True where query i may attend to key j: same segment, j <= i.

    ``seq_lens`` is the batch's ``[B, S]`` segment lengths (zero-padded), as :func:`collate`
    gives them; the padding after the last segment is a segment of its own. What
    ``torch.nn.functional.scaled_dot_product_attention`` takes as ``attn_mask``. It is
    ``B * L * L`` bytes (32 MB for B=8, L=2048): build it on the training device, from the
    small ``seq_lens``, rather than in DataLoader workers.
    """
    lengths = torch.cat([seq_lens, seq_len - seq_lens.sum(1, keepdim=True)], 1)
    positions = torch.arange(seq_len, device=seq_lens.device).expand(len(seq_lens), seq_len).contiguous()
    segment = torch.searchsorted(torch.cumsum(lengths, 1), positions, right=True)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=seq_lens.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def collate(examples: list[dict[str, Any]], sdpa_mask: bool = False) -> dict[str, Any]:
    """A batch: ``[B, L]`` tensors, plus what attention kernels need to keep documents apart.

    - ``seq_lens``: ``[B, S]`` segment lengths, zero-padded to the batch's most segments;
    - ``cu_seqlens`` (int32) and ``max_seqlen``: the batch flattened to ``B * L`` tokens, cut
      at every segment and at the padding (flash-attention's ``flash_attn_varlen_func``);
    - ``attention_mask`` with ``sdpa_mask=True``: :func:`causal_block_mask`, for SDPA;
    - ``position_ids`` alone serve transformers' padding-free attention (it derives the
      boundaries from where position ids restart).

    A batch crosses from a DataLoader worker as one shared-memory block per tensor, which
    costs more than building it: so it holds few tensors (measured in ``bench_loader.py``).
    """
    L = examples[0]["input_ids"].shape[0]
    cu = masking.cu_seqlens([e["seq_lens"].numpy() for e in examples], L)
    seq_lens = torch.nn.utils.rnn.pad_sequence([e["seq_lens"] for e in examples], batch_first=True)
    batch: dict[str, Any] = {
        "seq_id": torch.tensor([e["seq_id"] for e in examples]),
        "run_id": [e["run_id"] for e in examples],
        "input_ids": torch.stack([e["input_ids"] for e in examples]),
        "labels": torch.stack([e["labels"] for e in examples]),
        "position_ids": torch.stack([e["position_ids"] for e in examples]),
        "seq_lens": seq_lens,
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": int(np.diff(cu).max()),
    }
    if sdpa_mask:
        batch["attention_mask"] = causal_block_mask(seq_lens, L)
    return batch
