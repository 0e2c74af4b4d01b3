"""Shards in zarr v3's ``sharding_indexed`` format, written as a stream and read back verified.

A shard holds ``n`` chunks of ``chunk_numel`` elements (a :class:`Geometry`): one partition in
format 1, the partitions of several flat groups end to end in format 2. Byte layout (all
little-endian), identical to what zarr writes for codecs ``[bytes, crc32c]`` with
``index_location: "start"``::

    index:  n x (offset: u64, nbytes: u64), then crc32c(index): u32
    chunk i: chunk_numel * itemsize bytes, then crc32c(chunk): u32

Chunks are uncompressed, so every offset is known before any data: the index is written first.

Checkpoints are written by :class:`PackedShardWriter`: every piece goes from the caller's memory
straight to its place in the shard (never copied to fill a chunk), while the crc32c of large
pieces is computed on a worker thread at the same time (``crc32c`` releases the GIL for large
buffers), its 4 bytes written once known. The v1 stream writers (:class:`ChunkWriter`,
:class:`ShardWriter`) remain for offload swap files. zarr can open the arrays; zshard
additionally requires the index to be exactly this canonical one.

The byte format itself (geometry, index, crc32c, zarr metadata) is in shard_format.py and the
verified read side in shard_read.py; both are re-exported here.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os
import threading

import crc32c
import numpy as np

from zshard.store.dtypes import DType
from zshard.store.layout import FlatGroup
from zshard.store.shard_format import (
    CRC_NBYTES,
    INDEX_ENTRY_NBYTES,
    Geometry,
    array_metadata,
    array_metadata_bytes,
    as_bytes,
    chunk_nbytes,
    crc,
    encode_index,
    geometry,
    index_nbytes,
    shard_key,
    shard_nbytes,
)
from zshard.store.shard_read import ChunkCache, check_index, copy_shard, read_shard_range
from zshard.store.storage import (
    PositionalWriter,
    Storage,
    StreamWriter,
)

__all__ = [
    "CRC_NBYTES",
    "CRC_THREAD_MIN_BYTES",
    "INDEX_ENTRY_NBYTES",
    "ChunkCache",
    "ChunkWriter",
    "Geometry",
    "PackedShardWriter",
    "ShardWriter",
    "array_metadata",
    "array_metadata_bytes",
    "as_bytes",
    "check_index",
    "chunk_nbytes",
    "copy_shard",
    "crc",
    "encode_index",
    "geometry",
    "index_nbytes",
    "read_shard_range",
    "shard_key",
    "shard_nbytes",
]


class ChunkWriter:
    """The write loop of every shard writer: 1-D pieces of any size in, whole chunks out.

    Pieces must add up to at most ``partition_numel`` elements; ``_pad`` fills the rest with
    zeros, a chunk at a time. At most one partly filled chunk is buffered: whole chunks go
    straight from the caller's memory to ``_emit``, which a subclass implements (the chunk's
    bytes, then their crc32c, at the chunk's place in the shard). ``where`` names the shard in
    errors.
    """

    def __init__(self, where: str, group: FlatGroup, dt: DType) -> None:
        self.where = where
        self.group = group
        self.dt = dt
        self._np = dt.numpy
        self._chunk_bytes = group.chunk_numel * dt.itemsize
        self._buf = bytearray()  # a partly filled chunk
        self._written = 0  # elements accepted so far

    def write(self, piece: np.ndarray) -> None:
        if piece.dtype != self._np:
            raise TypeError(f"{self.where}: got {piece.dtype}, expected {self._np}")
        n = piece.size
        if self._written + n > self.group.partition_numel:
            raise ValueError(
                f"{self.where}: {self._written + n} elements exceed the partition's "
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
        # Whole chunks go straight from the caller's memory to the shard.
        while len(data) >= self._chunk_bytes:
            self._emit(data[: self._chunk_bytes])
            data = data[self._chunk_bytes :]
        if len(data):
            self._buf += data

    def _emit(self, chunk: memoryview) -> None:
        raise NotImplementedError

    def _pad(self) -> None:
        missing = self.group.partition_numel - self._written
        while missing > 0:
            n = min(missing, self.group.chunk_numel)
            self.write(np.zeros(n, dtype=self._np))
            missing -= n


class ShardWriter(ChunkWriter):
    """Streams one partition into a shard: ``write`` any number of 1-D pieces, then ``close``.

    Pieces must add up to at most ``partition_numel`` elements; ``close`` pads the rest with
    zeros. Memory: at most one chunk is buffered. Nothing is visible under the shard's key until
    ``close`` commits it; ``abort`` discards.
    """

    def __init__(self, storage: Storage, key: str, group: FlatGroup, dt: DType) -> None:
        super().__init__(f"shard {key}", group, dt)
        self.key = key
        self.nbytes = shard_nbytes(group, dt)
        self._stream: StreamWriter = storage.open_stream(key)
        try:
            self._stream.write(encode_index(group, dt))
        except BaseException:
            self._stream.abort()  # the caller has no writer to abort: leave no temporary file
            raise

    def _emit(self, chunk: memoryview) -> None:
        self._stream.write(chunk)
        self._stream.write(np.uint32(crc(chunk)).tobytes())

    def close(self) -> None:
        try:
            self._pad()
            self._stream.commit()
        except BaseException:
            self._stream.abort()
            raise

    def abort(self) -> None:
        self._stream.abort()


# -- format 2: positional writes, crc32c off the write path ---------------------------------------

# Pieces of at least this many bytes have their crc32c computed on the crc thread while the bytes
# are written; smaller ones inline (a hand-over costs more than the checksum).
CRC_THREAD_MIN_BYTES = 1 << 20
_ZEROS = bytes(1 << 20)
_CRC_POOL: cf.ThreadPoolExecutor | None = None
_CRC_PID = 0
_CRC_LOCK = threading.Lock()


def _crc_pool() -> cf.ThreadPoolExecutor:
    """One crc32c thread per process: tasks run in submission order, so a chunk's running
    checksum can be carried from one task to the next."""
    global _CRC_POOL, _CRC_PID
    with _CRC_LOCK:
        if _CRC_POOL is None or os.getpid() != _CRC_PID:
            _CRC_POOL = cf.ThreadPoolExecutor(1, thread_name_prefix="zshard-crc")
            _CRC_PID = os.getpid()
        return _CRC_POOL


class _Running:
    """The running crc32c of the chunk being written (updated by one thread at a time)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: memoryview, last: bool) -> int:
        self.value = crc32c.crc32c(data, self.value)
        out = self.value
        if last:
            self.value = 0
        return out


class PackedShardWriter:
    """Writes one shard front to back from 1-D pieces of any size (``write``), zero runs
    (``zeros``) and jumps forward (``skip_to``, zero-filled); ``close`` zero-fills the rest and
    publishes the shard through ``sink`` (a :class:`~zshard.store.storage.PositionalWriter`).

    Each piece goes from the caller's memory to its place in the shard in chunk-sized writes;
    the crc32c of a large piece runs on the crc thread meanwhile, and each chunk's checksum is
    written as soon as it is known. When ``write`` returns, nothing refers to the piece any
    more: the caller may reuse its memory.
    """

    def __init__(self, sink: PositionalWriter, geo: Geometry, dt: DType, where: str) -> None:
        self.where = where
        self.geo = geo
        self.dt = dt
        self._np = dt.numpy
        self._sink = sink
        self._pos = 0  # elements written
        self._running = _Running()
        self._pending: collections.deque[tuple[cf.Future[int], int | None]] = collections.deque()
        self.nbytes = geo.nbytes
        try:
            sink.pwrite(0, encode_index(geo, dt))
        except BaseException:
            sink.abort()
            raise

    @property
    def position(self) -> int:
        return self._pos

    def write(self, piece: np.ndarray) -> None:
        if piece.dtype != self._np:
            raise TypeError(f"{self.where}: got {piece.dtype}, expected {self._np}")
        n = piece.size
        if self._pos + n > self.geo.shard_numel:
            raise ValueError(
                f"{self.where}: {self._pos + n} elements exceed the shard's {self.geo.shard_numel}"
            )
        if n:
            self._write_bytes(as_bytes(piece))

    def zeros(self, n: int) -> None:
        if self._pos + n > self.geo.shard_numel:
            raise ValueError(f"{self.where}: zero fill past the shard's end")
        nbytes = n * self.dt.itemsize
        while nbytes:
            take = min(nbytes, len(_ZEROS))
            self._write_bytes(memoryview(_ZEROS)[:take])
            nbytes -= take

    def skip_to(self, element: int) -> None:
        """Zero-fill up to ``element`` (it must not lie behind what was written)."""
        if element < self._pos:
            raise ValueError(
                f"{self.where}: cannot go back to element {element} (at {self._pos}); write "
                "the groups of a shard in their order"
            )
        self.zeros(element - self._pos)

    def _write_bytes(self, view: memoryview) -> None:
        geo = self.geo
        size = geo.chunk_data_nbytes
        isz = self.dt.itemsize
        threaded = view.nbytes >= CRC_THREAD_MIN_BYTES
        pool = _crc_pool() if threaded else None
        at = self._pos * isz  # data bytes before this piece (crc32c slots not counted)
        try:
            while view.nbytes:
                i, o = divmod(at, size)
                take = min(view.nbytes, size - o)
                seg = view[:take]
                last = o + take == size
                slot = geo.chunk_offset(i) + size if last else None
                if pool is not None:
                    fut = pool.submit(self._running.update, seg, last)
                    self._pending.append((fut, slot))
                    self._sink.pwrite(geo.chunk_offset(i) + o, seg)
                    self._drain(block=False)
                else:
                    value = self._running.update(seg, last)
                    self._sink.pwrite(geo.chunk_offset(i) + o, seg)
                    if slot is not None:
                        self._sink.pwrite(slot, np.uint32(value).tobytes())
                view = view[take:]
                at += take
        finally:
            self._drain(block=True)  # nothing may refer to the caller's memory after this
        self._pos = at // isz

    def _drain(self, block: bool) -> None:
        while self._pending and (block or self._pending[0][0].done()):
            fut, slot = self._pending.popleft()
            value = fut.result()
            if slot is not None:
                self._sink.pwrite(slot, np.uint32(value).tobytes())

    def close(self) -> None:
        """Zero-fill the rest and publish the shard (or hand it to the writer's batch)."""
        try:
            self.zeros(self.geo.shard_numel - self._pos)
            self._sink.commit()
        except BaseException:
            self._sink.abort()
            raise

    def abort(self) -> None:
        self._sink.abort()
