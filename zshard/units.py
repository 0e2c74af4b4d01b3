"""Sizes written for people (``5GB``, ``2GiB``, ``80e9``), parsed the same way everywhere.

Imports nothing from zshard but its errors, so the store, the converters and training may all use
it.
"""

from __future__ import annotations

import re

from zshard.errors import InvalidArgumentError

# A number (decimal point and exponent allowed), then an optional K/M/G/T prefix, an optional
# "i" (binary) and an optional "B", in any case.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(
    text: str,
    *,
    what: str = "size",
    examples: str = "5GB, 500MB or 2GiB",
    positive: bool = False,
) -> int:
    """Bytes in ``text``: ``"5GB"`` -> 5 * 10**9, ``"2GiB"`` -> 2 * 2**30, ``"80G"`` -> 80 * 10**9,
    ``"1.5e9"`` or a bare number -> that many bytes.

    K, M, G, T are powers of 1000, or of 1024 with an ``i``; ``B`` is optional. Errors are one
    line: ``bad <what> '<text>'; use e.g. <examples>``. ``positive`` also refuses zero.
    """
    m = _SIZE.match(text)
    if not m or (m.group(3) and not m.group(2)):
        raise InvalidArgumentError(f"bad {what} {text!r}; use e.g. {examples}")
    prefix = m.group(2).upper()
    power = "_KMGT".index(prefix) if prefix else 0
    scale = 2 ** (10 * power) if m.group(3) else 1000**power
    value = int(float(m.group(1)) * scale)
    if positive and value <= 0:
        raise InvalidArgumentError(f"{what} must be positive, got {text!r}")
    return value
