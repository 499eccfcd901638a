"""Figures that judge a packing: how many sequences, how full, how many documents cut.

:class:`PackingStats` holds only additive counters, so partial stats of Spark
partitions add up to the stats of the whole corpus (``a + b``); everything else
(lower bound, overhead, fill, truncations per document) is derived from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
import numpy.typing as npt

from bfpack_spark.packing.layout import Layout

#: Lower edges of the document-length buckets (tokens) for truncation figures.
BUCKET_EDGES: tuple[int, ...] = (1,) + tuple(2**k for k in range(6, 18))


def bucket_labels() -> list[str]:
    labels = []
    for lo, hi in zip(BUCKET_EDGES, BUCKET_EDGES[1:] + (None,)):
        labels.append(f"{lo}-{hi - 1}" if hi else f">={lo}")
    return labels


def length_bucket(lengths: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Index of each document's length bucket in :data:`BUCKET_EDGES`."""
    return np.searchsorted(BUCKET_EDGES, np.asarray(lengths), side="right").astype(np.int64) - 1


def _zeros() -> tuple[int, ...]:
    return (0,) * len(BUCKET_EDGES)


@dataclass(frozen=True)
class PackingStats:
    """Additive counters of one packing of one set of documents."""

    seq_len: int
    n_documents: int = 0
    n_tokens: int = 0
    n_sequences: int = 0
    n_segments: int = 0
    n_truncations: int = 0
    n_documents_truncated: int = 0
    bucket_documents: tuple[int, ...] = field(default_factory=_zeros)
    bucket_truncations: tuple[int, ...] = field(default_factory=_zeros)

    @classmethod
    def from_pieces(cls, doc_lengths: npt.ArrayLike, pieces: npt.ArrayLike,
                    n_sequences: int, seq_len: int) -> PackingStats:
        """Stats from each document's length and the number of pieces it was cut into.

        Empty documents count as documents with no piece and no truncation.
        """
        lengths = np.asarray(doc_lengths, dtype=np.int64)
        pieces = np.asarray(pieces, dtype=np.int64)
        cuts = np.maximum(pieces - 1, 0)
        bucket = length_bucket(lengths)
        n_buckets = len(BUCKET_EDGES)
        keep = lengths > 0
        return cls(
            seq_len=seq_len,
            n_documents=int(lengths.shape[0]),
            n_tokens=int(lengths.sum()),
            n_sequences=int(n_sequences),
            n_segments=int(pieces.sum()),
            n_truncations=int(cuts.sum()),
            n_documents_truncated=int((cuts > 0).sum()),
            bucket_documents=tuple(int(v) for v in np.bincount(bucket[keep], minlength=n_buckets)),
            bucket_truncations=tuple(
                int(v) for v in np.bincount(bucket[keep], weights=cuts[keep], minlength=n_buckets)
            ),
        )

    @classmethod
    def from_layout(cls, doc_lengths: npt.ArrayLike, layout: Layout, seq_len: int) -> PackingStats:
        lengths = np.asarray(doc_lengths, dtype=np.int64)
        pieces = np.bincount(layout.doc, minlength=lengths.shape[0])
        return cls.from_pieces(lengths, pieces, layout.n_sequences, seq_len)

    def __add__(self, other: PackingStats) -> PackingStats:
        if other.seq_len != self.seq_len:
            raise ValueError(f"cannot add stats of seq_len {self.seq_len} and {other.seq_len}")
        values = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "seq_len":
                values[f.name] = a
            elif isinstance(a, tuple):
                values[f.name] = tuple(x + y for x, y in zip(a, b))
            else:
                values[f.name] = a + b
        return PackingStats(**values)

    @property
    def lower_bound(self) -> int:
        """ceil(tokens / L): no packing can use fewer sequences."""
        return -(-self.n_tokens // self.seq_len)

    @property
    def overhead(self) -> int:
        """Sequences above the lower bound."""
        return self.n_sequences - self.lower_bound

    @property
    def overhead_fraction(self) -> float:
        return self.overhead / self.lower_bound if self.lower_bound else 0.0

    @property
    def padding_tokens(self) -> int:
        return self.n_sequences * self.seq_len - self.n_tokens

    @property
    def mean_fill(self) -> float:
        capacity = self.n_sequences * self.seq_len
        return self.n_tokens / capacity if capacity else 0.0

    @property
    def truncations_per_document(self) -> float:
        return self.n_truncations / self.n_documents if self.n_documents else 0.0

    def truncations_by_bucket(self) -> list[tuple[str, int, float]]:
        """(length bucket, documents, truncations per document) for each non-empty bucket."""
        return [
            (label, docs, cuts / docs)
            for label, docs, cuts in zip(bucket_labels(), self.bucket_documents, self.bucket_truncations)
            if docs
        ]

    def summary(self) -> dict[str, float | int]:
        """Counters and derived figures as one flat dict (for tables and logs)."""
        out: dict[str, float | int] = {k: v for k, v in asdict(self).items() if not isinstance(v, tuple)}
        out.update(
            lower_bound=self.lower_bound,
            overhead=self.overhead,
            overhead_fraction=self.overhead_fraction,
            padding_tokens=self.padding_tokens,
            mean_fill=self.mean_fill,
            truncations_per_document=self.truncations_per_document,
        )
        return out


def format_comparison(stats: dict[str, PackingStats]) -> str:
    """A plain-text table of several packings of the same corpus, side by side."""
    names = list(stats)
    rows: list[tuple[str, list[str]]] = [
        ("documents", [f"{s.n_documents:,}" for s in stats.values()]),
        ("tokens", [f"{s.n_tokens:,}" for s in stats.values()]),
        ("sequences", [f"{s.n_sequences:,}" for s in stats.values()]),
        ("lower bound", [f"{s.lower_bound:,}" for s in stats.values()]),
        ("overhead", [f"{s.overhead:,} ({s.overhead_fraction:.4%})" for s in stats.values()]),
        ("padding tokens", [f"{s.padding_tokens:,}" for s in stats.values()]),
        ("mean fill", [f"{s.mean_fill:.4%}" for s in stats.values()]),
        ("truncations / doc", [f"{s.truncations_per_document:.4f}" for s in stats.values()]),
        ("documents truncated", [f"{s.n_documents_truncated:,}" for s in stats.values()]),
    ]
    first = next(iter(stats.values()))
    rows.append(("truncations / doc by length", [""] * len(names)))
    for i, label in enumerate(bucket_labels()):
        if first.bucket_documents[i]:
            cells = [f"{s.bucket_truncations[i] / s.bucket_documents[i]:.3f}" for s in stats.values()]
            rows.append((f"  {label} ({first.bucket_documents[i]:,} docs)", cells))
    width0 = max(len(r[0]) for r in rows)
    widths = [max(len(n), *(len(r[1][j]) for r in rows)) for j, n in enumerate(names)]
    lines = [" " * width0 + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths))]
    for label, cells in rows:
        lines.append(label.ljust(width0) + "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)
