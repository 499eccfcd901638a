"""Slow, obviously-correct references that the fast kernels are checked against."""

from __future__ import annotations


def reference_bfd(lengths: list[int], seq_len: int) -> list[int]:
    """Best-fit-decreasing by scanning every open sequence: O(N * sequences).

    Items go longest first, ties in input order; each goes to the sequence with
    the least room that still fits it; among equals, the one that reached that
    room most recently (the kernel's documented tie rule).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[int] = []
    since: list[int] = []
    out = [-1] * len(lengths)
    for step, i in enumerate(order):
        x = lengths[i]
        fits = [s for s in range(len(free)) if free[s] >= x]
        if fits:
            s = min(fits, key=lambda s: (free[s], -since[s]))
        else:
            s = len(free)
            free.append(seq_len)
            since.append(step)
        free[s] -= x
        since[s] = step
        out[i] = s
    return out


def reference_concat(doc_lengths: list[int], seq_len: int) -> list[list[tuple[int, int, int]]]:
    """Concatenate-and-cut, token by token: sequences as lists of (doc, start, length)."""
    seqs: list[list[tuple[int, int, int]]] = []
    pos = 0
    for doc, n in enumerate(doc_lengths):
        start = 0
        while start < n:
            if pos % seq_len == 0:
                seqs.append([])
            take = min(n - start, seq_len - pos % seq_len)
            seqs[-1].append((doc, start, take))
            start += take
            pos += take
    return seqs
