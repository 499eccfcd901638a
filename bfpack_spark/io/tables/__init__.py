"""The output tables: files staged by the tasks that make their rows (:mod:`.staging`), one atomic
Delta commit per table on the driver (:mod:`.delta`), and the contract the loader and the exports
read the ``sequences`` table by (:mod:`.snapshot`).
"""
