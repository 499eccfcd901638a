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
from numba.core import cgutils, types
from numba.extending import intrinsic


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


if not numba.config.CACHE_DIR:  # type: ignore[attr-defined]  # numba.config's settings are set at import
    numba.config.CACHE_DIR = _default_cache_dir()  # type: ignore[attr-defined]


def jit(fn):
    """``numba.njit`` with an on-disk cache; releases the GIL so threads can overlap."""
    return numba.njit(cache=True, nogil=True)(fn)


@intrinsic
def copy_range(typingctx, dst, dst_start, src, src_start, count):
    """``dst[dst_start:dst_start+count] = src[src_start:src_start+count]`` as one memcpy.

    numba compiles slice assignment to an element loop that runs at a fraction of memory
    bandwidth; moving token runs is most of the work of assembling sequences.
    """
    sig = types.void(dst, types.intp, src, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        d = context.make_array(signature.args[0])(context, builder, args[0])
        s = context.make_array(signature.args[2])(context, builder, args[2])
        itemsize = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
        cgutils.raw_memcpy(builder, builder.gep(d.data, [args[1]]), builder.gep(s.data, [args[3]]),
                           args[4], itemsize)
        return context.get_dummy_value()

    return sig, codegen
