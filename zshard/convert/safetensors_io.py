"""safetensors files: a strict header parser, a streaming writer, and the files of a Hugging Face
directory as a :class:`~zshard.convert.tensor_source.TensorSource`, over any storage.

Format: an 8-byte little-endian header length N, N bytes of JSON header mapping each tensor name
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data section,
which follows the header) plus an optional ``"__metadata__"`` of string pairs; then the data.
Parsing here rejects everything the reference implementation rejects (overlaps, holes, sizes
that disagree with shapes, data past the end) with one-line errors, so a hostile file never
reaches a tensor read.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from zshard.convert.tensor_source import Piece, PieceSource, SourceTensor
from zshard.errors import (
    InvalidArgumentError,
    NotACheckpointError,
    SafetensorsFormatError,
    ZshardError,
)
from zshard.store import dtypes
from zshard.store.shard import as_bytes
from zshard.store.storage import Storage, StreamWriter, open_storage

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's limit
INDEX_NAME = "model.safetensors.index.json"  # a Hugging Face directory's index of its shards
TIES_METADATA_KEY = "zshard.ties"  # file metadata: JSON {alias: stored name}


@dataclass(frozen=True)
class SafetensorsEntry(dtypes.Shaped):
    name: str
    dtype: str  # logical dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: list[SafetensorsEntry]  # in data order
    metadata: dict[str, str]
    data_start: int


def parse_header_length(raw_len: bytes, file_size: int, where: str) -> int:
    """Validate the 8-byte length prefix; returns the header length."""
    if len(raw_len) < 8:
        raise SafetensorsFormatError(f"{where}: file too short to be safetensors")
    (n,) = struct.unpack("<Q", raw_len[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise SafetensorsFormatError(
            f"{where}: bad safetensors header length {n} for a {file_size}-byte file"
        )
    return int(n)


def decode_header(header: bytes, file_size: int, where: str) -> SafetensorsHeader:
    try:
        obj = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SafetensorsFormatError(f"{where}: safetensors header is not valid JSON") from None
    if not isinstance(obj, dict):
        raise SafetensorsFormatError(f"{where}: safetensors header is not a JSON object")
    data_start = 8 + len(header)
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsFormatError(f"{where}: __metadata__ must map strings to strings")
    entries = []
    for name, info in obj.items():
        bad = f"{where}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsFormatError(f"{bad}: entry must have dtype, shape, data_offsets")
        shape, offsets, code = info["shape"], info["data_offsets"], info["dtype"]
        if not isinstance(code, str):
            raise SafetensorsFormatError(f"{bad}: dtype must be a string")
        if not isinstance(shape, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 62 for s in shape
        ):
            raise SafetensorsFormatError(f"{bad}: shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        ):
            raise SafetensorsFormatError(f"{bad}: data_offsets must be two non-negative integers")
        try:
            dt = dtypes.from_safetensors(code)
        except InvalidArgumentError:
            raise SafetensorsFormatError(f"{bad}: unsupported dtype {code!r}") from None
        begin, end = offsets
        if end < begin or end - begin != math.prod(shape) * dt.itemsize:
            raise SafetensorsFormatError(
                f"{bad}: data_offsets {offsets} do not hold shape {shape} of {dt.name}"
            )
        entries.append(
            SafetensorsEntry(name, dt.name, tuple(shape), data_start + begin, data_start + end)
        )
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = data_start
    for e in entries:
        if e.begin != pos:
            what = "overlaps the previous one" if e.begin < pos else "leaves a hole before it"
            raise SafetensorsFormatError(f"{where}: tensor {e.name!r} {what}")
        pos = e.end
    if pos != file_size:
        raise SafetensorsFormatError(
            f"{where}: data section ends at byte {pos} but the file has {file_size} bytes "
            "(truncated or trailing garbage)"
        )
    return SafetensorsHeader(entries, dict(metadata), data_start)


def read_header(storage: Storage, key: str) -> SafetensorsHeader:
    where = f"{storage.url}/{key}" if key else storage.url
    size = storage.size(key)
    n = parse_header_length(storage.read_range(key, 0, min(8, size)), size, where)
    return decode_header(storage.read_range(key, 8, 8 + n), size, where)


def read_tensor(
    storage: Storage, key: str, e: SafetensorsEntry, start: int = 0, stop: int | None = None
) -> np.ndarray:
    """Elements ``[start, stop)`` of one tensor as a flat storage-dtype array (one ranged read)."""
    dt = dtypes.dtype(e.dtype)
    stop = e.numel if stop is None else stop
    out = np.empty(stop - start, dtype=dt.numpy)
    if out.size:
        storage.readinto(key, e.begin + start * dt.itemsize, [as_bytes(out)])
    return out


class SafetensorsWriter:
    """Streams tensors into one safetensors file whose header is fixed up front.

    The caller declares every tensor (name, logical dtype, shape) first, then writes their data
    in declaration order, in as many pieces as it likes. Memory: nothing is buffered beyond what
    the stream backend buffers. The file appears under its key only at ``close``.
    """

    def __init__(
        self,
        storage: Storage,
        key: str,
        tensors: Iterable[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        self._order: list[tuple[str, int]] = []
        pos = 0
        for name, logical, shape in tensors:
            dt = dtypes.dtype(logical)
            nbytes = math.prod(shape) * dt.itemsize
            header[name] = {
                "dtype": dt.safetensors,
                "shape": list(shape),
                "data_offsets": [pos, pos + nbytes],
            }
            self._order.append((name, nbytes))
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as safetensors does
        self.nbytes = 8 + len(raw) + pos
        self._stream: StreamWriter = storage.open_stream(key)
        try:
            self._stream.write(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self._stream.abort()  # the caller has no writer to abort: leave no temporary file
            raise
        self._i = 0
        self._left = self._order[0][1] if self._order else 0

    def write(self, data: np.ndarray) -> None:
        """Append bytes of the current tensor (moving to the next once it is complete)."""
        view = as_bytes(data)
        while self._i < len(self._order) and self._left == 0:
            self._advance()
        if len(view) > self._left:
            raise ZshardError(f"safetensors writer: too much data for {self._order[self._i][0]!r}")
        self._stream.write(view)
        self._left -= len(view)
        if self._left == 0:
            self._advance()

    def _advance(self) -> None:
        self._i += 1
        self._left = self._order[self._i][1] if self._i < len(self._order) else 0

    def close(self) -> None:
        while self._i < len(self._order) and self._left == 0:
            self._advance()
        if self._i < len(self._order):
            self._stream.abort()
            raise ZshardError(f"safetensors writer: tensor {self._order[self._i][0]!r} incomplete")
        self._stream.commit()

    def abort(self) -> None:
        self._stream.abort()


# -- files and Hugging Face directories as a source ----------------------------------------------


@dataclass(frozen=True)
class Source:
    storage: Storage  # the directory (or the file's parent)
    key: str  # file name within it
    entry: SafetensorsEntry


def find_sources(src: str) -> tuple[list[Source], dict[str, str]]:
    """Every tensor of a safetensors file or HF-style directory, and the ties it records."""
    storage = open_storage(src)
    if storage.isdir(""):
        if storage.exists(INDEX_NAME):
            try:
                index = json.loads(storage.read(INDEX_NAME))
                files = list(dict.fromkeys(index["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise InvalidArgumentError(
                    f"{src}/{INDEX_NAME}: not a valid index (needs a 'weight_map' object)"
                ) from None
        elif storage.exists("model.safetensors"):
            files = ["model.safetensors"]
        else:
            raise NotACheckpointError(
                f"{src}: no {INDEX_NAME} or model.safetensors here; pass a .safetensors file or "
                "a Hugging Face model directory"
            )
        if not all(isinstance(f, str) and "/" not in f and f not in ("", ".", "..") for f in files):
            raise InvalidArgumentError(f"{src}/{INDEX_NAME}: weight_map names files outside it")
    else:
        if not storage.exists(""):
            raise InvalidArgumentError(f"{src}: no such file or directory")
        parent, _, name = src.rstrip("/").rpartition("/")
        storage, files = open_storage(parent or "."), [name]
    sources: list[Source] = []
    ties: dict[str, str] = {}
    seen: set[str] = set()
    for f in files:
        header = read_header(storage, f)
        raw_ties = header.metadata.get(TIES_METADATA_KEY)
        if raw_ties:
            try:
                ties.update({str(k): str(v) for k, v in json.loads(raw_ties).items()})
            except (ValueError, AttributeError):
                raise InvalidArgumentError(f"{f}: malformed {TIES_METADATA_KEY} metadata") from None
        for e in header.entries:
            if e.name in seen:
                raise InvalidArgumentError(f"{src}: tensor {e.name!r} appears in two files")
            seen.add(e.name)
            sources.append(Source(storage, f, e))
    if not sources:
        raise InvalidArgumentError(f"{src}: no tensors found")
    ties = {a: t for a, t in ties.items() if a not in seen and t in seen}
    return sources, ties


class SafetensorsSource(PieceSource):
    """A .safetensors file or Hugging Face shard directory: every tensor is one piece."""

    format = "safetensors"

    def __init__(self, src: str) -> None:
        found, ties = find_sources(src)
        storage = found[0].storage
        super().__init__(storage, src)
        for s in found:
            e = s.entry
            pieces = (Piece(s.key, e.begin, 0, e.numel),) if e.numel else ()
            self.tensors.append(SourceTensor(e.name, "param", e.shape, e.dtype, pieces))
        self.ties = ties
        self.state = {"source": {"format": "safetensors", "path": src}}
