"""``bfpack export``: packed sequences in the files Megatron-LM, OLMo-core and TRL / transformers read.

:mod:`~bfpack_spark.export.formats` builds one shard from one table file (pure numpy and Arrow);
:mod:`~bfpack_spark.export.job` runs one Spark task per table file and publishes the manifest last.
"""

from bfpack_spark.export.formats import FORMATS
from bfpack_spark.export.job import ExportError, export

__all__ = ["FORMATS", "ExportError", "export"]
