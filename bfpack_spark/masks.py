"""What a trainer needs besides the tokens of a packed sequence: targets that never cross a
document boundary, position ids, and the segment layout attention kernels take.

Pure numpy, one sequence or one batch at a time; the loader and the exports share it.
A sequence of length ``L`` holds ``n = sum(seg_lengths)`` real tokens, then ``L - n`` pad
tokens. The padding is treated as one more segment of its own: it attends only to itself,
and it has no target, so the pad id never reaches the loss.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

#: The target of a position that has none (PyTorch's ``CrossEntropyLoss`` ignores it).
IGNORE_INDEX = -100


def padded_segments(seg_lengths: npt.ArrayLike, seq_len: int) -> np.ndarray:
    """The segment lengths, with the padding (if any) as a last segment: they sum to ``seq_len``."""
    lengths = np.asarray(seg_lengths, dtype=np.int64)
    pad = seq_len - int(lengths.sum())
    if pad < 0:
        raise ValueError(f"segments hold {lengths.sum()} tokens, more than the sequence length {seq_len}")
    return np.append(lengths, pad) if pad else lengths


def labels(input_ids: npt.ArrayLike, seg_lengths: npt.ArrayLike, seq_len: int,
           loss_mask: npt.ArrayLike | None = None) -> np.ndarray:
    """``labels[i] = input_ids[i + 1]`` when tokens i and i+1 are in the same segment and token i+1
    is a target (its loss mask, when given, is 1), else -100."""
    ids = np.asarray(input_ids, dtype=np.int64)
    out = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    n = len(ids)
    out[: n - 1] = ids[1:n]
    if loss_mask is not None:
        out[: n - 1][np.asarray(loss_mask)[1:n] == 0] = IGNORE_INDEX
    ends = np.cumsum(np.asarray(seg_lengths, dtype=np.int64)) - 1  # last token of each segment
    out[ends[ends < seq_len]] = IGNORE_INDEX
    return out


def position_ids(seg_lengths: npt.ArrayLike, seq_len: int, restart: bool = True) -> np.ndarray:
    """0, 1, ... restarting at every segment (and at the padding), or 0..L-1 with ``restart=False``."""
    if not restart:
        return np.arange(seq_len, dtype=np.int64)
    segments = padded_segments(seg_lengths, seq_len)
    starts = np.cumsum(segments) - segments
    return np.arange(seq_len, dtype=np.int64) - np.repeat(starts, segments)


def cu_seqlens(batch_seg_lengths: list[npt.ArrayLike], seq_len: int) -> np.ndarray:
    """Cumulative segment boundaries of a batch flattened to ``B * L`` tokens (flash-attention varlen)."""
    segments = [padded_segments(s, seq_len) for s in batch_seg_lengths]
    return np.concatenate([[0], np.cumsum(np.concatenate(segments))]).astype(np.int32)


def pad(input_ids: npt.ArrayLike, seq_len: int, pad_id: int) -> np.ndarray:
    """The sequence's tokens, padded with ``pad_id`` to ``seq_len``."""
    ids = np.asarray(input_ids, dtype=np.int64)
    out = np.full(seq_len, pad_id, dtype=np.int64)
    out[: len(ids)] = ids
    return out
