"""Driver side: the input files, listed (:mod:`.listing`), and cut into the groups the read tasks
read (:mod:`.plan`). Called by the job's first stage (:mod:`bfpack_spark.stages.inputs`); nothing
here opens an input file but the first, for its columns.
"""
