"""The numbers of a run, in three steps: what each writer counts as it writes a file (:mod:`.figures`,
added up on the driver and checked by the audit), the packing figures of a strategy and their comparison
with concatenation (:mod:`.packing`), and the run's ``stats`` row made of them (:mod:`.row`).
"""
