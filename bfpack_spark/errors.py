"""The errors a user can act on, each raised with one line that says what to change.

A leaf module: every layer raises these, and the command line turns them into one line on
stderr and exit status 2 (``InputError``, ``ConfigError``, ``TokenizerError``) or 1 (the rest).
"""

from __future__ import annotations


class InputError(ValueError):
    """The input cannot be read as configured; the message says what to change."""
