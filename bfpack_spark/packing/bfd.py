"""Best-fit-decreasing bin packing over item lengths (the paper's step 2).

Items are taken longest first (a counting sort, since every length is at most
``seq_len``; equal lengths keep their input order). Each item goes to the open
sequence whose remaining space is the smallest that still holds it; only when no
open sequence can hold it is a new one opened. Open sequences are found through
a max segment tree over remaining capacities ``0..seq_len`` (leaf ``c`` holds
``c`` while at least one sequence has exactly ``c`` tokens free) and, per
capacity, a stack of the sequences with that much room. Each placement is
O(log seq_len); the whole pass is O(N log L) with O(N + L) memory.

Among several sequences with the same remaining capacity the one that reached
that capacity last is chosen (the top of its stack). Any rule gives the same
number of sequences; this one is O(1) and makes the result fully determined.

A cap on items per sequence (``max_items``) closes a sequence once it holds that many
items, whatever room it has left: it leaves the tree as a full one would. Per-document
attention kernels cost per segment, so trainers bound segments per sequence.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from bfpack_spark.packing._jit import jit


@jit
def longest_first(lengths, seq_len):
    """Counting sort of lengths in 1..seq_len, longest first, stable within a length.

    Returns the order, and for each length its first rank and its count.
    """
    counts = np.zeros(seq_len + 1, np.int64)
    for i in range(lengths.shape[0]):
        counts[lengths[i]] += 1
    start = np.zeros(seq_len + 1, np.int64)
    pos = 0
    for c in range(seq_len, 0, -1):
        start[c] = pos
        pos += counts[c]
    order = np.empty(lengths.shape[0], np.int64)
    cursor = start.copy()
    for i in range(lengths.shape[0]):
        order[cursor[lengths[i]]] = i
        cursor[lengths[i]] += 1
    return order, start, counts


@jit
def _bfd_kernel(lengths, seq_len, max_items=0):
    """Sequence of each item (opened in order), and the number of sequences; ``max_items`` > 0
    closes a sequence once it holds that many items."""
    n = lengths.shape[0]
    order, start, counts = longest_first(lengths, seq_len)

    size = 1
    while size < seq_len + 1:
        size *= 2
    tree = np.zeros(2 * size, np.int32)       # max available capacity below each node
    head = np.full(seq_len + 1, -1, np.int64)  # capacity -> top of its stack of sequences
    below = np.empty(n, np.int64)             # sequence -> next sequence in the same stack
    assignment = np.empty(n, np.int64)
    items = np.zeros(n if max_items > 0 else 0, np.int64)  # items per sequence, when capped
    n_seqs = 0

    for x in range(seq_len, 0, -1):
        for k in range(start[x], start[x] + counts[x]):
            if tree[1] >= x:
                # Smallest capacity >= x: climb from leaf x until a right sibling holds
                # one, then descend to its leftmost such leaf. Best fits are usually
                # close to x, so this is shorter than a descent from the root.
                node = size + x
                if tree[node] == 0:
                    while node & 1 or tree[node + 1] < x:
                        node >>= 1
                    node += 1
                    while node < size:
                        node <<= 1
                        if tree[node] < x:
                            node += 1
                cap = node - size
                seq = head[cap]
                head[cap] = below[seq]
                if head[cap] == -1:  # no sequence left with this capacity
                    tree[node] = 0
                    node >>= 1
                    while node >= 1:
                        m = max(tree[2 * node], tree[2 * node + 1])
                        if tree[node] == m:
                            break
                        tree[node] = m
                        node >>= 1
                free = cap - x
            else:
                seq = n_seqs
                n_seqs += 1
                free = seq_len - x
            assignment[order[k]] = seq
            if max_items > 0:
                items[seq] += 1
                if items[seq] >= max_items:
                    free = 0  # closed: it takes no more items
            if free > 0:
                below[seq] = head[free]
                head[free] = seq
                if below[seq] == -1:  # first sequence with this capacity
                    node = size + free
                    tree[node] = free
                    node >>= 1
                    while node >= 1 and tree[node] < free:
                        tree[node] = free
                        node >>= 1
    return assignment, n_seqs


def _validate_seq_len(seq_len: int) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)):
        raise ValueError(f"seq_len must be an integer, got {type(seq_len).__name__} {seq_len!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    return int(seq_len)


def _validate_lengths(lengths: npt.ArrayLike, seq_len: int) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be a one-dimensional array, got shape {arr.shape}")
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"lengths must have an integer dtype, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 1:
            bad = int(np.argmax(arr < 1))
            raise ValueError(f"every length must be at least 1; item {bad} has length {arr[bad]}")
        if hi > seq_len:
            bad = int(np.argmax(arr > seq_len))
            raise ValueError(
                f"every length must be at most seq_len={seq_len}; item {bad} has length "
                f"{arr[bad]} (split longer documents with chunk_documents first)"
            )
    return np.ascontiguousarray(arr)


def validate_max_items(max_items: int | None) -> int:
    """A cap on items per sequence as the kernel takes it: 0 for none."""
    if max_items is None:
        return 0
    if isinstance(max_items, bool) or not isinstance(max_items, (int, np.integer)) or max_items < 1:
        raise ValueError(f"max_items must be a positive integer or None, got {max_items!r}")
    return int(max_items)


def best_fit_decreasing(lengths: npt.ArrayLike, seq_len: int, max_items: int | None = None) -> npt.NDArray[np.int64]:
    """Assign each item to a sequence of capacity ``seq_len`` by best-fit-decreasing.

    Returns, for each item, the index of its sequence; sequences are numbered
    0, 1, 2, ... in the order they are opened. ``max_items``: no sequence holds more
    items. Raises ``ValueError`` for a length outside ``1..seq_len``, a non-integer
    dtype, ``seq_len < 1`` or a cap below 1.
    """
    seq_len = _validate_seq_len(seq_len)
    arr = _validate_lengths(lengths, seq_len)
    assignment, _ = _bfd_kernel(arr, seq_len, validate_max_items(max_items))
    return assignment
