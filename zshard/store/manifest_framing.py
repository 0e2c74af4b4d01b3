"""Framing of the manifest and the per-rank state files: a JSON body and the crc32c of its
exact bytes."""

from __future__ import annotations

import json
from typing import Any

import crc32c

from zshard.errors import CorruptDataError

_PREFIX = b'{"crc32c":"'


# -- framing: a JSON body and the crc32c of its exact bytes --------------------------------------


class _FrameError(Exception):
    """``reason``: ``"framing"``, ``"truncated"`` or ``"checksum"``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _frame(body: bytes, key: bytes) -> bytes:
    """``{"crc32c":"<8 hex digits of crc32c(body)>","<key>":<body>}``."""
    return _PREFIX + f"{crc32c.crc32c(body):08x}".encode() + b'","' + key + b'":' + body + b"}"


def _unframe(raw: bytes, key: bytes) -> bytes:
    """The body of a framed document whose checksum holds; else raises ``_FrameError``."""
    middle = b'","' + key + b'":'
    head = len(_PREFIX) + 8 + len(middle)
    if not raw.startswith(_PREFIX) or raw[len(_PREFIX) + 8 : head] != middle:
        raise _FrameError("framing")
    if not raw.endswith(b"}") or len(raw) < head + 2:
        raise _FrameError("truncated")
    body = raw[head:-1]
    if raw[len(_PREFIX) : len(_PREFIX) + 8] != f"{crc32c.crc32c(body):08x}".encode():
        raise _FrameError("checksum")
    return body


def frame_json(obj: Any) -> bytes:
    """A small JSON document (per-rank state) framed with its crc32c, like the manifest:
    ``{"crc32c":"<hex>","state":<obj>}``."""
    return _frame(json.dumps(obj, separators=(",", ":"), allow_nan=False).encode(), b"state")


def unframe_json(raw: bytes, where: str) -> Any:
    """The object :func:`frame_json` framed; ``CorruptDataError`` if a byte changed."""
    try:
        body = _unframe(raw, b"state")
    except _FrameError as e:
        if e.reason == "checksum":
            raise CorruptDataError(f"{where}: state file fails its crc32c checksum") from None
        raise CorruptDataError(f"{where}: malformed state file") from None
    return json.loads(body)
