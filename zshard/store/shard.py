"""Shards in zarr v3's ``sharding_indexed`` format, written as a stream and read back verified.

A shard holds one partition: ``n`` chunks of ``chunk_numel`` elements. Byte layout (all
little-endian), identical to what zarr writes for codecs ``[bytes, crc32c]`` with
``index_location: "start"``::

    index:  n x (offset: u64, nbytes: u64), then crc32c(index): u32
    chunk i: chunk_numel * itemsize bytes, then crc32c(chunk): u32

Chunks are uncompressed, so every offset is known before any data: the index is written first
and the shard is streamed chunk by chunk with one chunk of memory. zarr can open the arrays;
zshard additionally requires the index to be exactly this canonical one.
"""

from __future__ import annotations

import json
from typing import Any

import crc32c
import numpy as np

from zshard.errors import CorruptDataError, StorageError
from zshard.store.dtypes import DType
from zshard.store.layout import FlatGroup
from zshard.store.storage import Storage, StreamWriter

CRC_NBYTES = 4
INDEX_ENTRY_NBYTES = 16


def as_bytes(a: np.ndarray) -> memoryview:
    """A contiguous array's memory as a flat byte view (no copy)."""
    return np.ascontiguousarray(a).reshape(-1).data.cast("B")


def crc(data: memoryview | bytes | bytearray | np.ndarray) -> int:
    return int(crc32c.crc32c(as_bytes(data) if isinstance(data, np.ndarray) else data))


def index_nbytes(n_chunks: int) -> int:
    return n_chunks * INDEX_ENTRY_NBYTES + CRC_NBYTES


def chunk_nbytes(group: FlatGroup, dt: DType) -> int:
    return group.chunk_numel * dt.itemsize + CRC_NBYTES


def shard_nbytes(group: FlatGroup, dt: DType) -> int:
    n = group.chunks_per_shard
    return index_nbytes(n) + n * chunk_nbytes(group, dt)


def encode_index(group: FlatGroup, dt: DType) -> bytes:
    n = group.chunks_per_shard
    size = chunk_nbytes(group, dt)
    entries = np.empty((n, 2), dtype="<u8")
    entries[:, 0] = index_nbytes(n) + np.arange(n, dtype=np.uint64) * size
    entries[:, 1] = size
    body = entries.tobytes()
    return body + np.uint32(crc(body)).tobytes()


def array_metadata(group: FlatGroup, world_size: int, dt: DType) -> dict[str, Any]:
    """The zarr v3 ``zarr.json`` of one (flat group, state kind) array."""
    fill: bool | float | int = False if dt.storage == "bool" else 0
    checked = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [group.partition_numel * world_size],
        "data_type": dt.storage,
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [group.partition_numel]},
        },
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": fill,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [group.chunk_numel],
                    "codecs": checked,
                    "index_codecs": checked,
                    "index_location": "start",
                },
            }
        ],
        "attributes": {"zshard_logical_dtype": dt.name},
        "storage_transformers": [],
    }


def array_metadata_bytes(group: FlatGroup, world_size: int, dt: DType) -> bytes:
    return json.dumps(array_metadata(group, world_size, dt), indent=2).encode()


def shard_key(array_path: str, rank: int) -> str:
    return f"{array_path}/c/{rank}"


class ShardWriter:
    """Streams one partition into a shard: ``write`` any number of 1-D pieces, then ``close``.

    Pieces must add up to at most ``partition_numel`` elements; ``close`` pads the rest with
    zeros. Memory: at most one chunk is buffered. Nothing is visible under the shard's key until
    ``close`` commits it; ``abort`` discards.
    """

    def __init__(self, storage: Storage, key: str, group: FlatGroup, dt: DType) -> None:
        self.key = key
        self.group = group
        self.dt = dt
        self._np = dt.numpy
        self._chunk_bytes = group.chunk_numel * dt.itemsize
        self._buf = bytearray()  # a partly filled chunk
        self._written = 0  # elements accepted so far
        self.nbytes = shard_nbytes(group, dt)
        self._stream: StreamWriter = storage.open_stream(key)
        try:
            self._stream.write(encode_index(group, dt))
        except BaseException:
            self._stream.abort()  # the caller has no writer to abort: leave no temporary file
            raise

    def write(self, piece: np.ndarray) -> None:
        if piece.dtype != self._np:
            raise TypeError(f"shard {self.key}: got {piece.dtype}, expected {self._np}")
        n = piece.size
        if self._written + n > self.group.partition_numel:
            raise ValueError(
                f"shard {self.key}: {self._written + n} elements exceed the partition's "
                f"{self.group.partition_numel}"
            )
        self._written += n
        data = as_bytes(piece)
        if self._buf:
            take = min(len(data), self._chunk_bytes - len(self._buf))
            self._buf += data[:take]
            data = data[take:]
            if len(self._buf) == self._chunk_bytes:
                self._emit(memoryview(self._buf))
                self._buf = bytearray()
        # Whole chunks go straight from the caller's memory to the stream.
        while len(data) >= self._chunk_bytes:
            self._emit(data[: self._chunk_bytes])
            data = data[self._chunk_bytes :]
        if len(data):
            self._buf += data

    def _emit(self, chunk: memoryview) -> None:
        self._stream.write(chunk)
        self._stream.write(np.uint32(crc(chunk)).tobytes())

    def close(self) -> None:
        try:
            missing = self.group.partition_numel - self._written
            if missing:
                self.write(np.zeros(missing, dtype=self._np))
            self._stream.commit()
        except BaseException:
            self._stream.abort()
            raise

    def abort(self) -> None:
        self._stream.abort()


def write_shard(storage: Storage, key: str, group: FlatGroup, dt: DType, data: np.ndarray) -> None:
    """Write a whole partition (``partition_numel`` elements or fewer, zero-padded) as one shard."""
    w = ShardWriter(storage, key, group, dt)
    try:
        w.write(data)
    except BaseException:
        w.abort()
        raise
    w.close()


def check_index(raw: bytes, group: FlatGroup, dt: DType, where: str) -> None:
    expected = encode_index(group, dt)
    if raw == expected:
        return
    body, stored = raw[:-CRC_NBYTES], raw[-CRC_NBYTES:]
    if np.uint32(crc(body)).tobytes() != stored:
        raise CorruptDataError(f"{where}: shard index fails its crc32c checksum")
    raise CorruptDataError(f"{where}: shard index does not match the array's chunk layout")


def read_shard_range(
    storage: Storage,
    key: str,
    group: FlatGroup,
    dt: DType,
    start: int,
    out: np.ndarray,
    where: str,
    check_index_bytes: bool = True,
) -> None:
    """Fill ``out`` with shard elements ``[start, start + out.size)``, verifying every chunk read.

    Only the chunks that overlap the range are read, in one ranged request; whole chunks land
    directly in ``out``. ``where`` names the tensor or array for error messages.
    """
    n = out.size
    if n == 0:
        return
    c = group.chunk_numel
    first, last = start // c, (start + n - 1) // c
    size = chunk_nbytes(group, dt)
    base = index_nbytes(group.chunks_per_shard)
    out_bytes = out.reshape(-1).data.cast("B")
    isz = dt.itemsize
    buffers: list[memoryview] = []
    # (chunk view, crc view, scratch to copy from or None, copy slice bounds)
    checks: list[tuple[memoryview, bytearray]] = []
    partial: list[tuple[bytearray, int, int, int]] = []
    for i in range(first, last + 1):
        lo, hi = i * c, (i + 1) * c
        crc_buf = bytearray(CRC_NBYTES)
        if lo >= start and hi <= start + n:
            view = out_bytes[(lo - start) * isz : (hi - start) * isz]
        else:
            scratch = bytearray(c * isz)
            view = memoryview(scratch)
            a, b = max(lo, start), min(hi, start + n)
            partial.append((scratch, (a - lo) * isz, (b - lo) * isz, (a - start) * isz))
        buffers += [view, memoryview(crc_buf)]
        checks.append((view, crc_buf))
    try:
        if check_index_bytes:
            check_index(storage.read_range(key, 0, base), group, dt, where)
        storage.readinto(key, base + first * size, buffers)
    except (StorageError, CorruptDataError) as e:
        raise type(e)(f"{where}: {e}") from None
    for k, (view, stored) in enumerate(checks):
        if np.uint32(crc(view)).tobytes() != bytes(stored):
            raise CorruptDataError(
                f"{where}: chunk {first + k} of shard {key} fails its crc32c checksum"
            )
    for scratch, a, b, dst in partial:
        out_bytes[dst : dst + (b - a)] = scratch[a:b]
