"""The one error type of the data package."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: a missing or empty path, an unreadable file, invalid UTF-8, a malformed
    JSON line, a missing text field, a tokenizer without an end-of-text token. The message names
    the file (and line or byte offset where there is one) and the fix."""
