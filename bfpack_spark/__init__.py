"""bfpack-spark: best-fit packing of tokenized corpora into fixed-length training sequences."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bfpack-spark")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
