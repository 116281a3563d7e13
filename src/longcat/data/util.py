"""Small helpers for the data command line."""

from __future__ import annotations

import re

from .errors import DataError

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str | int) -> int:
    """A byte count: "5000000", "5M", "5MB", "500k", "2GiB" (k/M/G are powers of 10, Ki/Mi/Gi of 2)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise DataError(f"cannot read {text!r} as a size in bytes; write e.g. 20000000, 20M or 512KiB")
    value = float(match.group(1)) * _UNITS[match.group(2) or ""]
    if value < 1:
        raise DataError(f"size {text!r} must be at least one byte")
    return int(value)
