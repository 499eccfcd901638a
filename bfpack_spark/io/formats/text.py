"""Plain text files (``--input-format text``, and the demo's Python sources): a file is one document,
its id the file's source name."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from bfpack_spark.io.formats.base import EXCERPT_CHARS, Fields, RawBatch, Reject, excerpt, too_large
from bfpack_spark.io.formats.fetch import Opened


def read_text(opened: Opened, fields: Fields) -> Iterator[RawBatch]:
    """The file as one document, or one reject (too large, unreadable, not UTF-8)."""
    split, limit = opened.split, fields.limits.document_bytes
    batch = RawBatch(n_records=1)
    try:
        with opened.raw() as fh:
            if split.size > limit:  # a text file's bytes are its text
                batch.rejects.append(Reject(split.source, 0, too_large(limit), excerpt(fh.read(EXCERPT_CHARS * 4)),
                                            split.source))
                yield batch
                return
            data = fh.read()
    except Exception as exc:
        batch.rejects.append(Reject(split.source, 0, f"unreadable file ({exc})", "", split.source))
        yield batch
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        batch.rejects.append(Reject(split.source, 0, f"invalid UTF-8 at byte {exc.start} of the file",
                                    excerpt(data), split.source))
    else:
        batch.rows, batch.ids, batch.texts = np.zeros(1, np.int64), pa.array([split.source]), [text]
        batch.sources = pa.array([split.source])
    yield batch
