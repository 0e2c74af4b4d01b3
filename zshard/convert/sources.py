"""Foreign checkpoints as one kind of *source*: logical tensors whose bytes lie at known places.

``zshard import`` and ``zshard consolidate`` read safetensors, DeepSpeed ZeRO and
torch.distributed.checkpoint (DCP) directories through :class:`TensorSource`. A source lists
every logical tensor (name, state kind, shape, dtype) and, for each, its *pieces*: runs of the
tensor's flattened elements stored contiguously in one file at a byte offset. Pieces are the
true offsets (DESIGN invariant 3), found once from the format's metadata; reading a window is
then a few ranged reads, so memory stays bounded by the window whatever the model size.

Pickled formats (DeepSpeed ``*.pt``, DCP ``.metadata``) are opened without their data
(``torch.load(map_location="meta", weights_only=True)``, or a restricted unpickler that only
builds DCP's metadata classes), so a stranger's checkpoint cannot run code (DESIGN invariant 6).
A file that cannot be read that way needs ``trust_pickle=True`` (CLI ``--trust-pickle``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from zshard.errors import InvalidArgumentError, NotACheckpointError, ZshardError
from zshard.store import dtypes
from zshard.store.manifest import MANIFEST_KEY
from zshard.store.shard import as_bytes
from zshard.store.storage import LocalStorage, Storage, open_storage


class UnsafePickleError(ZshardError, ValueError):
    """A pickled file references objects a weights-only load refuses to build."""


class Piece(NamedTuple):
    """``length`` elements of a tensor from element ``start`` on, stored contiguously in file
    ``key`` from byte ``offset`` (in the piece's own dtype, see :attr:`SourceTensor.stored`)."""

    key: str
    offset: int
    start: int
    length: int


@dataclass(frozen=True)
class SourceTensor:
    """One logical tensor of a source.

    ``stored`` is the dtype of the bytes in the files when it differs from ``dtype`` (e.g. a
    bfloat16 ``param`` derived from fp32 master weights); reads cast.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...] = field(repr=False, default=())
    stored: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtypes.dtype(self.dtype).itemsize


class TensorSource(Protocol):
    """What import and consolidate need from a checkpoint of any format."""

    format: str
    url: str
    tensors: list[SourceTensor]  # in a good read order (file order)
    ties: dict[str, str]  # alias -> stored name
    step: int
    state: dict[str, Any]  # non-tensor state as JSON (manifest ``state``)

    def read(self, t: SourceTensor, start: int, stop: int) -> np.ndarray:
        """Flattened elements ``[start, stop)`` of ``t`` in its storage dtype."""
        ...


class PieceSource:
    """A source whose tensors are all described by pieces in files under ``storage``."""

    format = "pieces"

    def __init__(self, storage: Storage, url: str) -> None:
        self.storage = storage
        self.url = url
        self.tensors: list[SourceTensor] = []
        self.ties: dict[str, str] = {}
        self.step = 0
        self.state: dict[str, Any] = {}

    def read(self, t: SourceTensor, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= t.numel:
            raise InvalidArgumentError(f"range [{start}, {stop}) outside tensor {t.name!r}")
        stored = dtypes.dtype(t.stored or t.dtype)
        out = np.empty(stop - start, dtype=stored.numpy)
        pos = start
        for p in _overlapping(t.pieces, start, stop):
            lo, hi = max(start, p.start), min(stop, p.start + p.length)
            if lo != pos:
                raise ZshardError(f"{self.url}: tensor {t.name!r} has no bytes for element {pos}")
            view = out[lo - start : hi - start]
            self.storage.readinto(
                p.key, p.offset + (lo - p.start) * stored.itemsize, [as_bytes(view)]
            )
            pos = hi
        if pos != stop:
            raise ZshardError(f"{self.url}: tensor {t.name!r} has no bytes for element {pos}")
        if t.stored is None or t.stored == t.dtype:
            return out
        from zshard.store.reader import to_numpy, to_torch

        # torch casts round to nearest even, as DeepSpeed does when it casts its masters.
        return to_numpy(to_torch(out, t.stored).to(dtypes.to_torch(dtypes.dtype(t.dtype))))


def _overlapping(pieces: Sequence[Piece], start: int, stop: int) -> Iterator[Piece]:
    # Pieces are sorted by start; bisect to the first that may overlap.
    lo, hi = 0, len(pieces)
    while lo < hi:
        mid = (lo + hi) // 2
        if pieces[mid].start + pieces[mid].length <= start:
            lo = mid + 1
        else:
            hi = mid
    for p in pieces[lo:]:
        if p.start >= stop:
            break
        yield p


def check_pieces(t: SourceTensor, where: str) -> None:
    """Pieces must tile ``[0, numel)`` exactly once, in order (a malformed file must not make
    a read skip or repeat elements)."""
    pos = 0
    for p in t.pieces:
        if p.start != pos or p.length <= 0 or p.offset < 0:
            raise ZshardError(
                f"{where}: tensor {t.name!r} ({t.kind}) is not stored contiguously at element "
                f"{pos}; the checkpoint is inconsistent"
            )
        pos += p.length
    if pos != t.numel:
        raise ZshardError(
            f"{where}: tensor {t.name!r} ({t.kind}) has {pos} of {t.numel} elements stored"
        )


# -- pickles, opened without their data ----------------------------------------------------------


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
        return open(storage._p(key), "rb")
    import fsspec

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
    import pickle

    import torch

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


# -- format detection ---------------------------------------------------------------------------


def detect(src: str) -> str:
    """The format of ``src``: ``zshard``, ``safetensors``, ``deepspeed`` or ``dcp``."""
    from zshard.convert import dcp, deepspeed

    storage = open_storage(src)
    if not storage.isdir(""):
        if not storage.exists(""):
            raise InvalidArgumentError(f"{src}: no such file or directory")
        return "safetensors"
    if storage.exists(MANIFEST_KEY) or _is_zshard_root(storage):
        return "zshard"
    if deepspeed.is_deepspeed(storage):
        return "deepspeed"
    if dcp.is_dcp(storage):
        return "dcp"
    from zshard.convert.importer import INDEX_NAME

    if storage.exists(INDEX_NAME) or storage.exists("model.safetensors"):
        return "safetensors"
    raise NotACheckpointError(
        f"{src}: not a checkpoint zshard can read: expected a .safetensors file, a Hugging Face "
        f"directory with {INDEX_NAME} or model.safetensors, a DeepSpeed save or tag directory "
        "with *_model_states.pt, a torch.distributed.checkpoint directory with .metadata, or a "
        "zshard checkpoint"
    )


def _is_zshard_root(storage: Storage) -> bool:
    from zshard.store.root import committed_steps

    return bool(committed_steps(storage))


def open_source(src: str, *, tag: str | None = None, trust_pickle: bool = False) -> TensorSource:
    """Open a safetensors, DeepSpeed or DCP checkpoint as a :class:`TensorSource`."""
    fmt = detect(src)
    if tag is not None and fmt != "deepspeed":
        raise InvalidArgumentError(f"{src}: --tag applies to DeepSpeed checkpoints only")
    if fmt == "deepspeed":
        from zshard.convert.deepspeed import DeepSpeedSource

        return DeepSpeedSource(src, tag=tag, trust_pickle=trust_pickle)
    if fmt == "dcp":
        from zshard.convert.dcp import DCPSource

        return DCPSource(src, trust_pickle=trust_pickle)
    if fmt == "safetensors":
        return SafetensorsSource(src)
    raise InvalidArgumentError(f"{src}: already a zshard checkpoint; use reshard or consolidate")


class SafetensorsSource(PieceSource):
    """A .safetensors file or Hugging Face shard directory: every tensor is one piece."""

    format = "safetensors"

    def __init__(self, src: str) -> None:
        from zshard.convert.importer import find_sources

        found, ties = find_sources(src)
        storage = found[0].storage
        super().__init__(storage, src)
        for s in found:
            e = s.entry
            pieces = (Piece(s.key, e.begin, 0, e.numel),) if e.numel else ()
            self.tensors.append(SourceTensor(e.name, "param", e.shape, e.dtype, pieces))
        self.ties = ties
        self.state = {"source": {"format": "safetensors", "path": src}}
