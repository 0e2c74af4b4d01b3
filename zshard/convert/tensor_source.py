"""Foreign checkpoints as one kind of *source*: logical tensors whose bytes lie at known places.

``zshard import`` and ``zshard consolidate`` read safetensors, DeepSpeed ZeRO and
torch.distributed.checkpoint (DCP) directories through :class:`TensorSource`. A source lists
every logical tensor (name, state kind, shape, dtype) and, for each, its *pieces*: runs of the
tensor's flattened elements stored contiguously in one file at a byte offset. Pieces are the
true offsets (docs/design.md, invariant 3), found once from the format's metadata; reading a
window is then a few ranged reads, so memory stays bounded by the window whatever the model size.

This module knows no format: each format's module builds a :class:`PieceSource`, and
:mod:`zshard.convert.sources` picks the format of a path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from zshard.errors import InvalidArgumentError, ZshardError
from zshard.store import dtypes
from zshard.store.reader import cast
from zshard.store.shard import as_bytes
from zshard.store.storage import Storage


class Piece(NamedTuple):
    """``length`` elements of a tensor from element ``start`` on, stored contiguously in file
    ``key`` from byte ``offset`` (in the piece's own dtype, see :attr:`SourceTensor.stored`)."""

    key: str
    offset: int
    start: int
    length: int


@dataclass(frozen=True)
class SourceTensor(dtypes.Shaped):
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
        return cast(out, t.stored or t.dtype, t.dtype)


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
