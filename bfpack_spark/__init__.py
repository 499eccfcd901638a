"""bfpack-spark: best-fit packing of tokenized corpora into fixed-length training sequences."""

__version__ = "0.1.0"
