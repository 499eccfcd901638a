"""The packing core: pure numpy/numba functions, no Spark.

- :func:`best_fit_decreasing` assigns item lengths to sequences (``bfd.py``);
- :func:`chunk_documents` splits documents longer than the sequence length (``chunking.py``);
- :func:`bfd_layout` / :func:`concat_layout` say where every chunk of every document goes
  (``layout.py``), for best-fit packing and for the concatenation baseline;
- :func:`pack_token_lists` does all of it on Arrow token lists (``arrow.py``);
- ``plan.py``: the distributed plan's steps, which the job's tasks run; ``reference.py``: the
  one-process API the job is compared with (the same plan in one process, and the layouts).
"""

from bfpack_spark.packing.arrow import flatten_token_lists, layout_sequences, pack_token_lists
from bfpack_spark.packing.bfd import best_fit_decreasing
from bfpack_spark.packing.chunking import Chunks, chunk_documents, chunks_per_document
from bfpack_spark.packing.layout import Layout, bfd_layout, concat_layout, make_layout

__all__ = [
    "Chunks", "Layout", "best_fit_decreasing", "bfd_layout", "chunk_documents", "layout_sequences",
    "chunks_per_document", "concat_layout", "flatten_token_lists", "make_layout", "pack_token_lists",
]
