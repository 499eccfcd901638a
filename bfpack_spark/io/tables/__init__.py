"""The output tables: files staged by the tasks that make their rows (:mod:`.staging`), one atomic
Delta commit per table on the driver (:mod:`.delta`), and reading one committed snapshot (:mod:`.read`).
"""
