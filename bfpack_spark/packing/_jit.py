"""One place that decides how the packing kernels are compiled.

Kernels are compiled lazily on first call and cached on disk, so a Spark
Python worker pays numba's compile cost at most once per machine, not once per
task. numba's default cache location is the package's ``__pycache__``, which is
read-only on many clusters (numba issue 7883); when ``NUMBA_CACHE_DIR`` is not
set we point the cache at a per-user directory that is writable.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numba


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    candidates = [Path(base) / "bfpack-spark" / "numba",
                  Path(tempfile.gettempdir()) / f"bfpack-spark-numba-{os.getuid()}"]
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return str(path)
        except OSError:
            continue
    return ""


if not numba.config.CACHE_DIR:
    numba.config.CACHE_DIR = _default_cache_dir()


def jit(fn):
    """``numba.njit`` with an on-disk cache; releases the GIL so threads can overlap."""
    return numba.njit(cache=True, nogil=True)(fn)
