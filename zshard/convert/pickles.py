"""Pickled checkpoint files (DeepSpeed ``*.pt``, DCP items), opened without their data.

Files are loaded with ``torch.load(map_location="meta", weights_only=True)``: tensors come back
without data, with their byte offsets in the file, and only allowlisted classes are built, so a
stranger's checkpoint cannot run code (docs/design.md, invariant 6). A file that cannot be read
that way needs ``trust_pickle=True`` (CLI ``--trust-pickle``).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from typing import Any

import numpy as np

from zshard.errors import ZshardError
from zshard.store import dtypes
from zshard.store.storage import LocalStorage, Storage


class UnsafePickleError(ZshardError, ValueError):
    """A pickled file references objects a weights-only load refuses to build."""


class FileView(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of a binary file as a seekable file of its own."""

    def __init__(self, f: Any, offset: int, length: int) -> None:
        super().__init__()
        self._f, self._base, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        self._f.seek(self._base + self._pos)
        data = self._f.read(n)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


def open_binary(storage: Storage, key: str) -> Any:
    """A seekable binary file object for ``key`` (local file or fsspec object)."""
    if isinstance(storage, LocalStorage):
        return open(storage.os_path(key), "rb")
    import fsspec  # why: only remote storages get here (storage.py imports it lazily too)

    return fsspec.open(f"{storage.url}/{key}", "rb").open()


def torch_load_meta(
    f: Any,
    where: str,
    *,
    trust_pickle: bool,
    stand_ins: Iterable[tuple[Any, str]] = (),
) -> Any:
    """``torch.load`` a torch.save zip without reading tensor data.

    Tensors come back on the ``meta`` device with ``untyped_storage()._checkpoint_offset`` (the
    storage's byte offset in the file). ``stand_ins`` are inert classes allowed in place of the
    named globals (for objects such as DeepSpeed's loss scaler that a weights-only load would
    refuse): they are built with ``__new__`` and their ``__dict__`` filled, never run.
    """
    import torch  # why: heavy; only pickled formats need it, not safetensors or zshard

    try:
        with torch.serialization.safe_globals(list(stand_ins)):
            return torch.load(f, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            detail = _unsupported_global(str(e))
            raise UnsafePickleError(
                f"{where}: can only be read by full unpickling{detail}, which can run code from "
                "the file; pass --trust-pickle if you trust where it came from"
            ) from None
    except (RuntimeError, OSError, ValueError, EOFError) as e:
        raise ZshardError(f"{where}: not a readable torch.save file ({_first_line(e)})") from None
    f.seek(0)
    try:
        return torch.load(f, map_location="meta", weights_only=False)
    except Exception as e:
        raise ZshardError(f"{where}: cannot unpickle ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _unsupported_global(message: str) -> str:
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return f" ({line.strip()[:160]})"
    return ""


def storage_offset(t: Any, where: str) -> int:
    """Byte offset in its file of a contiguous tensor loaded by :func:`torch_load_meta`."""
    off = getattr(t.untyped_storage(), "_checkpoint_offset", None)
    if off is None:
        raise ZshardError(
            f"{where}: tensor offsets unknown (the file uses torch's legacy non-zip format, or "
            "this torch is older than 2.6); re-save the file or upgrade torch"
        )
    if t.numel() > 1 and not t.is_contiguous():
        raise ZshardError(f"{where}: a tensor is stored non-contiguously; not supported")
    return int(off) + int(t.storage_offset()) * t.element_size()


def read_scalar(storage: Storage, key: str, t: Any) -> float:
    """The value of a 0-d (or 1-element) tensor loaded by :func:`torch_load_meta`."""
    d = dtypes.from_torch(t.dtype)
    raw = storage.read_range(key, storage_offset(t, key), storage_offset(t, key) + d.itemsize)
    return float(np.frombuffer(raw, dtype=d.numpy)[0]) if d.storage == d.name else float("nan")
