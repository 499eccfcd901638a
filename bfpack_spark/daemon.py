"""Spark's Python daemon for bfpack's tasks: ``pyspark.daemon``, started with what the tasks import.

Spark forks every Python worker from one daemon per executor (``spark.python.daemon.module``).
A worker forked from ``pyspark.daemon`` imports numpy, pyarrow, numba, the tokenizers and our
stages itself, on its first task: about a second of core time per worker, paid again by every
worker an executor starts. Imported here once, before the fork, it is shared by every worker.
Only imports: nothing starts a thread or opens a connection before the fork.
"""

from __future__ import annotations

import contextlib

import pyarrow.dataset  # noqa: F401
import pyarrow.parquet  # noqa: F401
import tiktoken  # noqa: F401  tokenize.py loads the engines on its first text
import tiktoken_ext.openai_public  # noqa: F401
from pyspark.daemon import manager

import bfpack_spark.audit  # noqa: F401
import bfpack_spark.export.job  # noqa: F401
import bfpack_spark.incremental  # noqa: F401
import bfpack_spark.job  # noqa: F401  the stages, io, Delta

with contextlib.suppress(ImportError):  # an optional engine
    import gigatoken  # noqa: F401

if __name__ == "__main__":
    manager()
