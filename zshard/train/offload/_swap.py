"""Swap space for offload: one directory per run and rank, holding store-format shards.

Layout under an offload ``path`` (any fsspec URL)::

    <path>/zshard-swap-<utc time>-<id>/       one per run (the id is rank 0's, shared by all ranks)
        rank-00001/owner.json                 host, pid, process start time, heartbeat
        rank-00001/<flat group>/<state kind>  one shard: this rank's partition, crc32c per chunk

Each array is a shard exactly as a checkpoint stores it (``store.shard``: same flat-group
geometry, same dtype), so saving copies bytes (``copy_shard``) and reading verifies every chunk.

Writing a new version of an array: on a local file system the chunks are overwritten in place
(data, then its crc32c, at their canonical offsets; the index never changes). Writing a new file
and renaming it over the old one costs about four times the CPU per GB on Linux (page-cache
pages allocated for the new file, the old file's freed) and needs twice the space, and swap
files need none of what it buys: they are scratch that a crash discards whole (the run restarts
from a checkpoint). For the same reason local swap files are never fsynced. Object stores and
other fsspec file systems cannot overwrite part of an object: there a new version streams through
``ShardWriter`` and replaces the old one whole (one PUT, or a rename).

A rank directory is created fresh and removed by ``close`` (or at interpreter exit). A crashed
run leaves one behind: ``sweep_stale`` removes rank directories whose owner is dead (same host,
pid gone or reused) or silent (another host, heartbeat older than ``stale_after_s()``), and never
one whose owner is alive. It only considers directories named like ours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from typing import Any, Protocol

import numpy as np
import psutil

from zshard.errors import CorruptDataError, StorageError, ZshardError
from zshard.store.dtypes import DType
from zshard.store.layout import FlatGroup
from zshard.store.root import join_url
from zshard.store.shard import (
    CRC_NBYTES,
    ChunkWriter,
    ShardWriter,
    copy_shard,
    crc,
    encode_index,
    index_nbytes,
    read_shard_range,
    shard_nbytes,
)
from zshard.store.storage import (
    LocalStorage,
    LocalStream,
    Storage,
    StreamWriter,
    open_storage,
    translate_errors,
)

log = logging.getLogger("zshard.train")

OWNER_KEY = "owner.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # silent this long (owner on another host) -> stale
_RUN_DIR = re.compile(r"^zshard-swap-\d{8}T\d{6}-[0-9a-f]{8}$")
_RANK_DIR = re.compile(r"^rank-\d{5}$")


def stale_after_s() -> float:
    """Heartbeat age after which another host's swap directory counts as abandoned
    (``ZSHARD_SWAP_STALE_S`` overrides the default)."""
    return float(os.environ.get("ZSHARD_SWAP_STALE_S", STALE_AFTER_S))


def new_run_id() -> str:
    return f"zshard-swap-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def local_path(url: str) -> str | None:
    """The OS path of a local URL (plain path or ``file://``), else None."""
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url))
    if url.startswith("file://"):
        return os.path.abspath(url[len("file://") :])
    return None


# -- scratch storage: local files without fsync -------------------------------------------------


class ScratchStorage(LocalStorage):
    """Local storage for swap files: streams skip fsync, and reads keep recently read files
    open (``MAX_OPEN`` at most), so the kernel's readahead follows a sub-group by sub-group scan
    instead of restarting small at every open."""

    MAX_OPEN = 64

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def child(self, key: str) -> ScratchStorage:
        return ScratchStorage(self.os_path(key))

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is not None:
                self._fds.move_to_end(path)
                return fd
            fd = os.open(path, os.O_RDONLY)
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._fds[path] = fd
            while len(self._fds) > self.MAX_OPEN:
                os.close(self._fds.popitem(last=False)[1])
            return fd

    def readinto(self, key: str, offset: int, buffers: list[memoryview]) -> None:
        path = self.os_path(key)
        want = sum(b.nbytes for b in buffers)
        with translate_errors(self.url, key):
            fd = self._fd(path)
            got = 0
            for i in range(0, len(buffers), 512):  # preadv takes at most IOV_MAX buffers
                batch = buffers[i : i + 512]
                n = os.preadv(fd, batch, offset + got)
                if n < sum(b.nbytes for b in batch):
                    raise CorruptDataError(f"{path}: truncated, expected {offset + want} bytes")
                got += n

    def will_need(self, key: str, offset: int, length: int) -> None:
        """Ask the kernel to start reading a byte range now (asynchronously)."""
        path = self.os_path(key)
        with contextlib.suppress(OSError):
            os.posix_fadvise(self._fd(path), offset, length, os.POSIX_FADV_WILLNEED)

    def close_files(self) -> None:
        with self._lock:
            while self._fds:
                with contextlib.suppress(OSError):
                    os.close(self._fds.popitem()[1])

    def open_stream(self, key: str) -> StreamWriter:
        # Scratch: renamed into place like the store's streams, minus the fsyncs (module doc).
        with translate_errors(self.url, key):
            return LocalStream(self.os_path(key), durable=False)


def swap_storage(url: str) -> Storage:
    path = local_path(url)
    return ScratchStorage(path) if path is not None else open_storage(url)


# -- owners and staleness ----------------------------------------------------------------------


def _process_start(pid: int) -> float | None:
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return float(p.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def owner_record(run_id: str, rank: int) -> dict[str, Any]:
    pid = os.getpid()
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "process_start": _process_start(pid),
        "run_id": run_id,
        "rank": rank,
        "created": now,
        "heartbeat": now,
    }


def is_stale(owner: dict[str, Any], *, now: float, host: str, stale_after: float) -> bool:
    """Whether the run that wrote ``owner`` is certainly gone.

    Same host: the pid must be dead, or reused by a process that started at another time (a
    live owner is never stale, however old its heartbeat). Another host: its pids mean nothing
    here, so only a heartbeat older than ``stale_after`` counts.
    """
    if owner.get("host") == host:
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return False
        started = _process_start(pid)
        if started is None:
            return True
        recorded = owner.get("process_start")
        return isinstance(recorded, (int, float)) and abs(started - recorded) > 1.0
    beat = owner.get("heartbeat")
    return isinstance(beat, (int, float)) and now - beat > stale_after


def sweep_stale(url: str, *, stale_after: float | None = None) -> list[str]:
    """Remove the swap directories of dead runs under ``url``; returns the URLs removed."""
    root = open_storage(url)
    host, now = socket.gethostname(), time.time()
    limit = stale_after_s() if stale_after is None else stale_after
    removed: list[str] = []
    for run in root.listdir(""):
        if not _RUN_DIR.match(run):
            continue
        gone = 0
        ranks = [r for r in root.listdir(run) if _RANK_DIR.match(r)]
        for r in ranks:
            try:
                owner = json.loads(root.read(f"{run}/{r}/{OWNER_KEY}"))
            except (ZshardError, ValueError):
                continue  # no owner yet (being created) or unreadable: not ours to judge
            if isinstance(owner, dict) and is_stale(owner, now=now, host=host, stale_after=limit):
                log.warning(
                    "removing stale swap directory %s/%s/%s (owner %s pid %s is gone)",
                    url,
                    run,
                    r,
                    owner.get("host"),
                    owner.get("pid"),
                )
                with contextlib.suppress(ZshardError, OSError):
                    root.remove_tree(f"{run}/{r}")
                    removed.append(join_url(url, f"{run}/{r}"))
                    gone += 1
        if gone and not root.listdir(run):
            with contextlib.suppress(ZshardError, OSError):
                root.remove_tree(run)
    return removed


# -- the swap space of one rank ------------------------------------------------------------------


class SwapSpace:
    """``<url>/<run_id>/rank-<rank>/``: created fresh, kept alive by a heartbeat, removed by
    :meth:`close` (or at interpreter exit if nobody called it)."""

    def __init__(self, url: str, run_id: str, rank: int) -> None:
        self.base_url = url
        self.url = join_url(url, f"{run_id}/rank-{rank:05d}")
        self.storage: Storage = swap_storage(self.url)
        if self.storage.exists(OWNER_KEY) or self.storage.listdir(""):
            raise StorageError(f"{self.url}: swap directory already exists; refusing to share it")
        self._owner = owner_record(run_id, rank)
        self._write_owner()
        # Read it back: proves the path is readable too, not only writable.
        json.loads(self.storage.read(OWNER_KEY))
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="zshard-swap-heartbeat")
        self._beat.daemon = True
        self._beat.start()
        # Runs once: from close(), or at interpreter exit (weakref.finalize's atexit hook).
        self._finalizer = weakref.finalize(
            self, _remove, self.storage, self._stop, self._beat, self.url
        )

    def _write_owner(self) -> None:
        self._owner["heartbeat"] = time.time()
        self.storage.write_atomic(OWNER_KEY, json.dumps(self._owner).encode())

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write_owner()
            except Exception as e:  # a missed beat is not fatal; a run of them makes us stale
                log.warning("swap directory %s: heartbeat failed: %s", self.url, e)

    def array(self, group: FlatGroup, kind: str, dt: DType) -> SwapArray:
        return SwapArray(self.storage, f"{group.name}/{kind}", group, dt, kind)

    def close(self) -> None:
        self._finalizer()


def _remove(storage: Storage, stop: threading.Event, beat: threading.Thread, url: str) -> None:
    stop.set()
    beat.join(timeout=30)  # a beat in flight would re-create the directory
    if isinstance(storage, ScratchStorage):
        storage.close_files()
    try:
        storage.remove_tree("")
    except Exception as e:  # best effort at exit; a later run sweeps what is left
        log.warning("could not remove swap directory %s: %s", url, e)
        return
    path = local_path(url)
    if path is not None:  # the run directory, once its last rank is gone
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))


class SwapArray:
    """One (flat group, state kind) partition held as a store shard in a swap space."""

    def __init__(self, storage: Storage, key: str, group: FlatGroup, dt: DType, kind: str) -> None:
        self.storage = storage
        self.key = key
        self.group = group
        self.dt = dt
        self.kind = kind
        self.numel = group.partition_numel
        self.nbytes = self.numel * dt.itemsize
        self.file_nbytes = shard_nbytes(group, dt)
        self._index_checked = False

    @property
    def where(self) -> str:
        return f"offloaded {self.kind} of {self.group.name!r} in {self.storage.url}/{self.key}"

    def read(self, start: int, out: np.ndarray) -> None:
        """``out`` <- elements ``[start, start + out.size)``, every chunk's crc32c verified."""
        read_shard_range(
            self.storage,
            self.key,
            self.group,
            self.dt,
            start,
            out,
            self.where,
            check_index_bytes=not self._index_checked,
        )
        self._index_checked = True
        if isinstance(self.storage, ScratchStorage) and start + out.size < self.numel:
            # Reads scan an array front to back: have the disk fetch the next two windows
            # while this one is checked and used (more I/O in flight than one read at a time).
            c = self.group.chunk_numel
            first = (start + out.size) // c
            last = min(self.group.chunks_per_shard, -(-(start + 3 * out.size) // c))
            stride = c * self.dt.itemsize + CRC_NBYTES
            base = index_nbytes(self.group.chunks_per_shard)
            self.storage.will_need(self.key, base + first * stride, (last - first) * stride)

    def writer(self) -> ArrayWriter:
        """A writer of the next version, front to back (see module doc: in place locally, else
        a whole new object replacing this one on ``close``)."""
        if isinstance(self.storage, ScratchStorage):
            return InPlaceWriter(self.storage.os_path(self.key), self.group, self.dt)
        self._index_checked = False
        return ShardWriter(self.storage, self.key, self.group, self.dt)

    def copy_to(self, dst: Storage, dst_key: str) -> int:
        return copy_shard(self.storage, self.key, dst, dst_key, self.group, self.dt)

    def snapshot(self, key: str) -> SwapArray:
        """A frozen copy of the current version under ``key`` (a copy on the same file system:
        in-kernel locally, server-side on object stores)."""
        copy_shard(self.storage, self.key, self.storage, key, self.group, self.dt)
        return SwapArray(self.storage, key, self.group, self.dt, self.kind)

    def remove(self) -> None:
        self.storage.remove_tree(self.key)


class ArrayWriter(Protocol):
    def write(self, piece: np.ndarray) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class InPlaceWriter(ChunkWriter):
    """Overwrites a local shard's chunks front to back, each chunk's data and crc32c in one
    ``pwritev`` at its canonical offset; creates the file (index first) if it is missing.

    Like ``ShardWriter`` (the same ``ChunkWriter`` loop): pieces of any size, at most one partial
    chunk buffered, ``close`` pads the rest with zeros. Unlike it, not atomic: chunks are visible
    as they are written, and a failure leaves the array part old, part new (offload then declares
    the state broken).
    """

    def __init__(self, path: str, group: FlatGroup, dt: DType) -> None:
        super().__init__(path, group, dt)
        self.path = path
        self._base = index_nbytes(group.chunks_per_shard)
        self._chunks = 0  # whole chunks written
        size = shard_nbytes(group, dt)
        with translate_errors(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                if os.fstat(self._fd).st_size != size:
                    os.ftruncate(self._fd, size)
                    os.pwrite(self._fd, encode_index(group, dt), 0)
            except BaseException:
                self.abort()
                raise

    def _emit(self, chunk: memoryview) -> None:
        assert self._fd is not None
        offset = self._base + self._chunks * (self._chunk_bytes + CRC_NBYTES)
        tail = np.uint32(crc(chunk)).tobytes()
        with translate_errors(self.path):
            n = os.pwritev(self._fd, [chunk, tail], offset)
        if n != len(chunk) + CRC_NBYTES:
            raise StorageError(f"{self.path}: short write ({n} bytes); disk full?")
        self._chunks += 1

    def close(self) -> None:
        try:
            self._pad()
        finally:
            self.abort()

    def abort(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
