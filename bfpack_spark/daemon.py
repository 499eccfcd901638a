"""Spark's Python daemon for bfpack's tasks: ``pyspark.daemon``, started with what the tasks import.

Spark forks every Python worker from one daemon per executor (``spark.python.daemon.module``).
A worker forked from ``pyspark.daemon`` imports numpy, pyarrow, numba, the tokenizers and our
stages itself, on its first task: about a second of core time per worker, paid again by every
worker an executor starts. Imported here once, before the fork, they are shared by every worker.
Only imports, and the plan's numba kernels loaded (:func:`~bfpack_spark.packing.plan.warm_up`: no
thread): nothing starts a thread or opens a connection before the fork. Spark reads the
daemon's port from its stdout, so nothing else may be printed there; and an import that fails
here is only reported (to stderr): the task that needs the module fails with its own error.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import traceback

from pyspark.daemon import manager

PRELOAD = ("pyarrow.dataset", "pyarrow.parquet", "bfpack_spark.job", "bfpack_spark.export.job",
           "bfpack_spark.audit", "bfpack_spark.incremental", "tiktoken", "tiktoken_ext.openai_public")
OPTIONAL = ("gigatoken",)  # an engine that may not be installed


def preload() -> None:
    with contextlib.redirect_stdout(sys.stderr):
        for name in PRELOAD + OPTIONAL:
            try:
                importlib.import_module(name)
            except ImportError:
                if name not in OPTIONAL:
                    traceback.print_exc()
            except Exception:  # an import that fails in an unforeseen way must not stop every worker
                traceback.print_exc()
        try:
            from bfpack_spark.packing.plan import warm_up

            warm_up()
        except Exception:  # a task that needs the kernels fails with its own error
            traceback.print_exc()


if __name__ == "__main__":
    preload()
    manager()
