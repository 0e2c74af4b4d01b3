"""Reading shards back verified: the canonical index check, the cache of partly used chunks,
ranged reads of a shard (:func:`read_shard_range`) and verified copies (:func:`copy_shard`)."""

from __future__ import annotations

import numpy as np

from zshard.errors import CorruptDataError, StorageError
from zshard.store.dtypes import DType
from zshard.store.layout import FlatGroup
from zshard.store.shard_format import (
    CRC_NBYTES,
    Geometry,
    chunk_nbytes,
    crc,
    encode_index,
    geometry,
    index_nbytes,
    shard_nbytes,
)
from zshard.store.storage import (
    FsspecStorage,
    LocalStorage,
    LocalStream,
    Storage,
    publish,
    translate_errors,
)


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
    chunks, ``max_bytes`` bytes; the oldest go first. An edge chunk is kept with a *hole*: the
    bytes its first reader took straight into its own output never passed through the scratch
    copy (no copy of them), so only reads outside the hole are served from it.
    """

    def __init__(self, capacity: int = 4, max_bytes: int | None = None) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._bytes = 0
        self._chunks: dict[tuple[str, int], np.ndarray] = {}
        self._holes: dict[tuple[str, int], tuple[int, int]] = {}

    def get(self, key: str, index: int, lo: int = 0, hi: int | None = None) -> np.ndarray | None:
        """Chunk ``index`` of ``key`` if kept with bytes ``[lo, hi)`` filled, else None."""
        chunk = self._chunks.get((key, index))
        if chunk is None:
            return None
        a, b = self._holes.get((key, index), (0, 0))
        hi = chunk.nbytes if hi is None else hi
        return chunk if a >= b or hi <= a or lo >= b else None

    def held(self, key: str, index: int) -> bool:
        return (key, index) in self._chunks

    def pop(self, key: str, index: int) -> None:
        chunk = self._chunks.pop((key, index), None)
        self._holes.pop((key, index), None)
        if chunk is not None:
            self._bytes -= chunk.nbytes

    def put(self, key: str, index: int, chunk: np.ndarray, hole: tuple[int, int] = (0, 0)) -> None:
        """Keep ``chunk``; bytes ``hole`` (start, stop) of it were never filled."""
        self.pop(key, index)
        self._chunks[(key, index)] = chunk
        if hole[0] < hole[1]:
            self._holes[(key, index)] = hole
        self._bytes += chunk.nbytes
        while len(self._chunks) > self.capacity or (
            self.max_bytes is not None and self._bytes > self.max_bytes and len(self._chunks) > 1
        ):
            self.pop(*next(iter(self._chunks)))


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
    directly in ``out``, and so does the part of an edge chunk that the range uses (the rest of
    it goes to scratch, checksummed with it and kept in ``cache`` for the neighbouring tensor).
    Chunks a previous read kept in ``cache`` (partly used edges, chunks read ahead) are served
    from it. ``readahead`` more chunks after the range are read in the same request and kept in
    ``cache`` (remote stores: few large requests instead of one per tensor). ``where`` names the
    tensor or array for error messages.
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
        a, b, dst = bounds(i)
        cached = cache.get(key, i, a, b) if cache is not None else None
        if cached is None:
            missing.append(i)
            continue
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
            if cache.held(key, i):
                break
            hi_i = i
    size = geo.chunk_data_nbytes
    buffers: list[memoryview] = []
    # (chunk, its bytes in order, stored crc32c)
    checks: list[tuple[int, list[memoryview], bytearray]] = []
    # chunks read (partly) into scratch: edges, read ahead; with the hole ``out`` took
    kept: list[tuple[int, np.ndarray, tuple[int, int]]] = []
    for i in range(lo_i, hi_i + 1):
        crc_buf = bytearray(CRC_NBYTES)
        if i <= last and whole(i):
            pieces = [out_bytes[(i * c - start) * isz : ((i + 1) * c - start) * isz]]
        else:
            scratch = np.empty(size, dtype=np.uint8)  # no zero fill: the read overwrites it
            sv = scratch.data
            if i <= last:  # an edge: the used bytes go straight to out
                a, b, dst = bounds(i)
                pieces = [sv[:a], out_bytes[dst : dst + (b - a)], sv[b:]]
                pieces = [v for v in pieces if v.nbytes]
                kept.append((i, scratch, (a, b)))
            else:
                pieces = [sv]
                kept.append((i, scratch, (0, 0)))
        buffers += [*pieces, memoryview(crc_buf)]
        checks.append((i, pieces, crc_buf))
    index = bytearray(geo.index_nbytes if joint_index else 0)
    try:
        if joint_index:
            storage.readinto(key, 0, [memoryview(index), *buffers])
            check_index(bytes(index), geo, dt, where)
        else:
            storage.readinto(key, geo.chunk_offset(lo_i), buffers)
    except (StorageError, CorruptDataError) as e:
        raise type(e)(f"{where}: {e}") from None
    for i, pieces, stored in checks:
        value = 0
        for v in pieces:
            value = crc(v, value)
        if np.uint32(value).tobytes() != bytes(stored):
            if i > last:  # read ahead, not asked for: leave it to the read that needs it
                kept = [k for k in kept if k[0] < i]
                break
            raise CorruptDataError(f"{where}: chunk {i} of shard {key} fails its crc32c checksum")
    if cache is not None:
        for i, scratch, hole in kept:
            cache.put(key, i, scratch, hole)


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
