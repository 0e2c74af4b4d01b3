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
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import os
import threading
from dataclasses import dataclass
from typing import Any

import crc32c
import numpy as np

from zshard.errors import CorruptDataError, StorageError
from zshard.store.dtypes import DType
from zshard.store.layout import FlatGroup
from zshard.store.storage import (
    FsspecStorage,
    LocalStorage,
    LocalStream,
    PositionalWriter,
    Storage,
    StreamWriter,
    publish,
    translate_errors,
)

CRC_NBYTES = 4
INDEX_ENTRY_NBYTES = 16


@dataclass(frozen=True)
class Geometry:
    """The byte layout of one shard: ``shard_numel`` elements of ``itemsize`` bytes in chunks
    of ``chunk_numel``, each followed by its crc32c, after the index."""

    shard_numel: int
    chunk_numel: int
    itemsize: int

    @property
    def n_chunks(self) -> int:
        return self.shard_numel // self.chunk_numel

    @property
    def chunk_data_nbytes(self) -> int:
        return self.chunk_numel * self.itemsize

    @property
    def chunk_nbytes(self) -> int:
        """A chunk's bytes and its crc32c: the stride of chunks in the shard."""
        return self.chunk_numel * self.itemsize + CRC_NBYTES

    @property
    def index_nbytes(self) -> int:
        return index_nbytes(self.n_chunks)

    @property
    def nbytes(self) -> int:
        return self.index_nbytes + self.n_chunks * self.chunk_nbytes

    def chunk_offset(self, i: int) -> int:
        return self.index_nbytes + i * self.chunk_nbytes


def geometry(group: FlatGroup | Geometry, dt: DType) -> Geometry:
    """A format-1 partition's geometry (a group's own chunking), or ``group`` itself."""
    if isinstance(group, Geometry):
        return group
    return Geometry(group.partition_numel, group.chunk_numel, dt.itemsize)


def as_bytes(a: np.ndarray) -> memoryview:
    """A contiguous array's memory as a flat byte view (no copy)."""
    return np.ascontiguousarray(a).reshape(-1).data.cast("B")


def crc(data: memoryview | bytes | bytearray | np.ndarray) -> int:
    return int(crc32c.crc32c(as_bytes(data) if isinstance(data, np.ndarray) else data))


def index_nbytes(n_chunks: int) -> int:
    return n_chunks * INDEX_ENTRY_NBYTES + CRC_NBYTES


def chunk_nbytes(group: FlatGroup | Geometry, dt: DType) -> int:
    return geometry(group, dt).chunk_nbytes


def shard_nbytes(group: FlatGroup | Geometry, dt: DType) -> int:
    return geometry(group, dt).nbytes


def encode_index(group: FlatGroup | Geometry, dt: DType) -> bytes:
    geo = geometry(group, dt)
    n = geo.n_chunks
    entries = np.empty((n, 2), dtype="<u8")
    entries[:, 0] = index_nbytes(n) + np.arange(n, dtype=np.uint64) * geo.chunk_nbytes
    entries[:, 1] = geo.chunk_nbytes
    body = entries.tobytes()
    return body + np.uint32(crc(body)).tobytes()


def array_metadata(
    group: FlatGroup | Geometry, world_size: int, dt: DType, separator: str = "/"
) -> dict[str, Any]:
    """The zarr v3 ``zarr.json`` of one stored array: ``world_size`` shards of ``group``'s
    geometry (format 1: one (flat group, kind) partition per shard, keys ``c/<rank>``; format 2:
    a stored array's packed shards, keys ``c.<rank>``)."""
    geo = geometry(group, dt)
    fill: bool | float | int = False if dt.storage == "bool" else 0
    checked = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [geo.shard_numel * world_size],
        "data_type": dt.storage,
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [geo.shard_numel]},
        },
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": separator}},
        "fill_value": fill,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [geo.chunk_numel],
                    "codecs": checked,
                    "index_codecs": checked,
                    "index_location": "start",
                },
            }
        ],
        "attributes": {"zshard_logical_dtype": dt.name},
        "storage_transformers": [],
    }


def array_metadata_bytes(
    group: FlatGroup | Geometry, world_size: int, dt: DType, separator: str = "/"
) -> bytes:
    return json.dumps(array_metadata(group, world_size, dt, separator), indent=2).encode()


def shard_key(array_path: str, rank: int) -> str:
    return f"{array_path}/c/{rank}"


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


def check_index(raw: bytes, group: FlatGroup | Geometry, dt: DType, where: str) -> None:
    expected = encode_index(group, dt)
    if raw == expected:
        return
    body, stored = raw[:-CRC_NBYTES], raw[-CRC_NBYTES:]
    if np.uint32(crc(body)).tobytes() != stored:
        raise CorruptDataError(f"{where}: shard index fails its crc32c checksum")
    raise CorruptDataError(f"{where}: shard index does not match the array's chunk layout")


class ChunkCache:
    """The last few verified chunks that a read used only partly, or read ahead.

    Tensors packed end to end share boundary chunks, and small tensors (norms, biases) share
    one chunk with many neighbours; reading tensor by tensor would fetch and checksum such a
    chunk once per tensor. Keeping it makes a sequential load read every chunk exactly once.
    Chunks read ahead (remote stores) wait here for the reads that follow. ``capacity`` counts
    chunks, ``max_bytes`` bytes; the oldest go first.
    """

    def __init__(self, capacity: int = 4, max_bytes: int | None = None) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._bytes = 0
        self._chunks: dict[tuple[str, int], np.ndarray] = {}

    def get(self, key: str, index: int) -> np.ndarray | None:
        return self._chunks.get((key, index))

    def pop(self, key: str, index: int) -> None:
        chunk = self._chunks.pop((key, index), None)
        if chunk is not None:
            self._bytes -= chunk.nbytes

    def put(self, key: str, index: int, chunk: np.ndarray) -> None:
        old = self._chunks.pop((key, index), None)
        if old is not None:
            self._bytes -= old.nbytes
        self._chunks[(key, index)] = chunk
        self._bytes += chunk.nbytes
        while len(self._chunks) > self.capacity or (
            self.max_bytes is not None and self._bytes > self.max_bytes and len(self._chunks) > 1
        ):
            self._bytes -= self._chunks.pop(next(iter(self._chunks))).nbytes


def read_shard_range(
    storage: Storage,
    key: str,
    group: FlatGroup | Geometry,
    dt: DType,
    start: int,
    out: np.ndarray,
    where: str,
    check_index_bytes: bool = True,
    cache: ChunkCache | None = None,
    readahead: int = 0,
) -> None:
    """Fill ``out`` with shard elements ``[start, start + out.size)``, verifying every chunk read.

    Only the chunks that overlap the range are read, in one ranged request; whole chunks land
    directly in ``out``. Chunks a previous read kept in ``cache`` (partly used edges, chunks
    read ahead) are served from it. ``readahead`` more chunks after the range are read in the
    same request and kept in ``cache`` (remote stores: few large requests instead of one per
    tensor). ``where`` names the tensor or array for error messages.
    """
    n = out.size
    if n == 0:
        return
    geo = geometry(group, dt)
    c = geo.chunk_numel
    isz = dt.itemsize
    first, last = start // c, (start + n - 1) // c
    out_bytes = out.reshape(-1).data.cast("B")

    def bounds(i: int) -> tuple[int, int, int]:
        """(from, to) bytes within chunk ``i`` that the range uses, and where they go in out."""
        lo, hi = i * c, (i + 1) * c
        a, b = max(lo, start), min(hi, start + n)
        return (a - lo) * isz, (b - lo) * isz, (a - start) * isz

    def whole(i: int) -> bool:
        return i * c >= start and (i + 1) * c <= start + n

    # Serve what the cache holds; read only the span of chunks that remains.
    missing = []
    for i in range(first, last + 1):
        cached = cache.get(key, i) if cache is not None else None
        if cached is None:
            missing.append(i)
            continue
        a, b, dst = bounds(i)
        out_bytes[dst : dst + (b - a)] = cached.data[a:b]
        if whole(i) and cache is not None:
            cache.pop(key, i)  # used up: a read ahead chunk is read once
    # The index is checked on a shard's first read: in the same request when that read starts
    # at chunk 0 (one request fewer per shard on object stores), else on its own.
    joint_index = check_index_bytes and bool(missing) and missing[0] == 0
    if check_index_bytes and not joint_index:
        try:
            check_index(storage.read_range(key, 0, geo.index_nbytes), geo, dt, where)
        except (StorageError, CorruptDataError) as e:
            raise type(e)(f"{where}: {e}") from None
    if not missing:
        return
    lo_i, hi_i = missing[0], missing[-1]
    if cache is not None and readahead:
        for i in range(hi_i + 1, min(geo.n_chunks, hi_i + 1 + readahead)):
            if cache.get(key, i) is not None:
                break
            hi_i = i
    size = geo.chunk_data_nbytes
    buffers: list[memoryview] = []
    checks: list[tuple[int, memoryview, bytearray]] = []  # (chunk, chunk bytes, stored crc32c)
    kept: list[tuple[int, np.ndarray]] = []  # chunks read into scratch: edges, read ahead
    for i in range(lo_i, hi_i + 1):
        crc_buf = bytearray(CRC_NBYTES)
        if i <= last and whole(i):
            view = out_bytes[(i * c - start) * isz : ((i + 1) * c - start) * isz]
        else:
            scratch = np.empty(size, dtype=np.uint8)  # no zero fill: the read overwrites it
            view = scratch.data
            kept.append((i, scratch))
        buffers += [view, memoryview(crc_buf)]
        checks.append((i, view, crc_buf))
    index = bytearray(geo.index_nbytes if joint_index else 0)
    try:
        if joint_index:
            storage.readinto(key, 0, [memoryview(index), *buffers])
            check_index(bytes(index), geo, dt, where)
        else:
            storage.readinto(key, geo.chunk_offset(lo_i), buffers)
    except (StorageError, CorruptDataError) as e:
        raise type(e)(f"{where}: {e}") from None
    for i, view, stored in checks:
        if np.uint32(crc(view)).tobytes() != bytes(stored):
            if i > last:  # read ahead, not asked for: leave it to the read that needs it
                kept = [(j, s) for j, s in kept if j < i]
                break
            raise CorruptDataError(f"{where}: chunk {i} of shard {key} fails its crc32c checksum")
    for i, scratch in kept:
        if i <= last:
            a, b, dst = bounds(i)
            out_bytes[dst : dst + (b - a)] = scratch.data[a:b]
        if cache is not None and (i > last or not whole(i)):
            cache.put(key, i, scratch)


# Copying whole shards (offload swap files -> checkpoints) ---------------------------------------

_COPY_WINDOW_BYTES = 8 << 20


def copy_shard(
    src: Storage, src_key: str, dst: Storage, dst_key: str, group: FlatGroup, dt: DType
) -> int:
    """Copy one shard object to ``dst_key``, published atomically like any shard; returns bytes.

    The destination must describe the same geometry (``group``, ``dt``): shard bytes depend only
    on them, so the copy is byte for byte. Same local file system: ``shutil.copyfile`` (in-kernel)
    into ``dst``'s own stream (temporary name, fsync unless scratch, rename). Same fsspec file
    system: its own ``copy`` (server-side on object stores). Otherwise the shard streams through
    memory a window of whole chunks at a time, and every chunk's crc32c is verified on the way.
    """
    nbytes = shard_nbytes(group, dt)
    if isinstance(src, LocalStorage) and isinstance(dst, LocalStorage):
        stream = dst.open_stream(dst_key)
        assert isinstance(stream, LocalStream)
        try:
            stream.copy_from(src.os_path(src_key))
            stream.commit()
        except BaseException:
            stream.abort()
            raise
        return nbytes
    if isinstance(src, FsspecStorage) and isinstance(dst, FsspecStorage) and src.fs is dst.fs:
        a, b = f"{src.path}/{src_key}", f"{dst.path}/{dst_key}"
        with translate_errors(dst.url, dst_key):
            publish(src.fs, b, dst.atomic_put, lambda target: src.fs.copy(a, target))
        return nbytes
    where = f"{src.url}/{src_key}"
    n = group.chunks_per_shard
    size = chunk_nbytes(group, dt)
    stream = dst.open_stream(dst_key)
    try:
        index = src.read_range(src_key, 0, index_nbytes(n))
        check_index(index, group, dt, where)
        stream.write(index)
        per_window = max(1, _COPY_WINDOW_BYTES // size)
        buf = bytearray(per_window * size)
        for first in range(0, n, per_window):
            k = min(per_window, n - first)
            view = memoryview(buf)[: k * size]
            src.readinto(src_key, index_nbytes(n) + first * size, [view])
            for i in range(k):
                chunk = view[i * size : (i + 1) * size - CRC_NBYTES]
                if (
                    np.uint32(crc(chunk)).tobytes()
                    != view[(i + 1) * size - CRC_NBYTES : (i + 1) * size]
                ):
                    raise CorruptDataError(f"{where}: chunk {first + i} fails its crc32c checksum")
            stream.write(view)
        stream.commit()
    except BaseException:
        stream.abort()
        raise
    return nbytes
