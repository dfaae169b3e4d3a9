"""The error mmlens raises for input it refuses: a file, row, example or name that is wrong.

``MMLensError`` is a ``ValueError``, so code that catches ``ValueError`` keeps working; the
command line prints its message as one line (no traceback).
"""

from __future__ import annotations


class MMLensError(ValueError):
    """Input mmlens refuses; the message says what was wrong, where, and what to do."""


class MMLensFileNotFoundError(MMLensError, FileNotFoundError):
    """A file or folder mmlens was pointed at does not exist."""
