"""spark-submit entry point: pack an already tokenized corpus into Delta tables.

    spark-submit jobs/pack_tokenized.py --input tokens.parquet --output out/ [--token-column tokens]

Takes the same flags as ``bfpack pack-tokenized`` (``--help`` lists them).
"""

import sys

from bfpack_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["pack-tokenized", *sys.argv[1:]]))
