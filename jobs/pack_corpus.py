"""spark-submit entry point: read, tokenize and pack a corpus into Delta tables.

    spark-submit jobs/pack_corpus.py --config conf/local.yaml [--input ...] [--output ...]

Takes the same flags as ``bfpack pack`` (``--help`` lists them).
"""

import sys

from bfpack_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["pack", *sys.argv[1:]]))
