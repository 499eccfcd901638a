"""Input and output, in four folders by who runs the code and what it touches.

- :mod:`.listing` (the driver): what the input arguments name, from listings alone, and the
  groups the read tasks read.
- :mod:`.formats` (the read stage's tasks): one reader per input format, the rejects they make.
- :mod:`.store` (every process): file systems with retries, S3, the run lock, the workspace.
- :mod:`.tables` (driver and tasks): the Delta tables a run writes, and what their readers rely on.

Imports run one way: listing over formats, formats and tables over store.
"""
