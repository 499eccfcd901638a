"""Store access, for the driver and the tasks alike: pyarrow file systems whose every request to an
object store is retried by kind (:mod:`.fs`, :mod:`.retry`), S3 listings and ranged reads through
boto3 (:mod:`.s3`), the output root's run lock (:mod:`.lock`) and a run's scratch space between the
read and the assembly (:mod:`.workspace`).
"""
