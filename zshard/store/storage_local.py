"""Local file systems: streams written beside their final name and renamed into place, the
:class:`SyncBatch` that makes several such writes durable together, and :class:`LocalStorage`."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
import uuid
from typing import IO

from zshard.errors import CorruptDataError, StorageError
from zshard.store.storage_base import PositionalWriter, StreamWriter, run_all, translate_errors

# ---------------------------------------------------------------------------------------------
# Local file systems


def makedirs(path: str) -> list[str]:
    """``os.makedirs(path, exist_ok=True)``; returns the directories it created, outermost
    first (their parents' entries must be made durable too)."""
    missing = []
    p = os.path.abspath(path)
    while p and not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    os.makedirs(path or ".", exist_ok=True)
    return missing[::-1]


class LocalStream:
    """A local file written under a temporary name and renamed to ``path`` by ``commit``.

    ``durable`` (checkpoints): the file is fsynced before the rename and its directory after
    it, so a committed object survives a crash. Scratch files that a crash discards whole
    (offload swap) pass ``durable=False`` and skip both. With a ``batch``, ``commit`` hands the
    file to it instead: the batch makes it durable and renames it together with others.

    ``write`` appends; ``pwrite`` writes at an offset (a positional writer of known size).
    """

    def __init__(self, path: str, *, durable: bool = True, batch: SyncBatch | None = None) -> None:
        self._final = path
        self._durable = durable
        self._batch = batch
        self._tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        self._created = makedirs(os.path.dirname(path) or ".")
        self._f: IO[bytes] = open(self._tmp, "wb", buffering=0)  # noqa: SIM115 - closed in commit
        self._pos = 0
        self._flushed = 0  # bytes before this offset were handed to writeback

    # Writes and the commit fail like any other I/O (ENOSPC, EIO): one StorageError naming the
    # file, so callers abort the stream and the CLI prints one line.
    def write(self, data: memoryview | bytes) -> None:
        self.pwrite(self._pos, data)

    def pwrite(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        with translate_errors(self._final):
            if offset != self._pos:
                self._f.seek(offset)
            while view:
                n = self._f.write(view) or 0
                view = view[n:]
                offset += n
        self._pos = offset
        if self._durable and offset - self._flushed >= _writeback_bytes() > 0:
            _start_writeback(self._f.fileno(), self._flushed, offset - self._flushed)
            self._flushed = offset

    def copy_from(self, src: str) -> None:
        """Fill the file with the bytes of local file ``src`` (an in-kernel copy)."""
        try:
            shutil.copyfile(src, self._tmp)
        except FileNotFoundError as e:
            raise StorageError(
                f"{src}: not found while copying to {self._final} ({e.strerror or e})"
            ) from e
        except OSError as e:
            hint = "; free space and retry" if e.errno == 28 else ""
            raise StorageError(f"{self._final}: copying {src} failed: {e}{hint}") from e

    def commit(self) -> None:
        if self._batch is not None and self._durable:
            self._batch.add(self)
            return
        with translate_errors(self._final):
            if self._durable:
                os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, self._final)
        if self._durable:
            for d in self.dirs_to_sync():
                _fsync_dir(d)

    def dirs_to_sync(self) -> list[str]:
        """The directory of the new entry, and the parents of the directories created for it."""
        return [os.path.dirname(self._final), *(os.path.dirname(d) for d in self._created)]

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(OSError):
            os.remove(self._tmp)


def _writeback_bytes() -> int:
    """``ZSHARD_WRITEBACK_MB`` (default 32; 0 disables): how much a durable local file writes
    before its pages are handed to the kernel's writeback."""
    raw = os.environ.get("ZSHARD_WRITEBACK_MB", "").strip()
    try:
        return (int(raw) if raw else 32) << 20
    except ValueError:
        return 32 << 20


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``[offset, offset + length)`` of a file to the device now, without waiting.

    A durable file is fsynced at the end anyway; starting its writeback while later bytes are
    still being written overlaps the device's work with the writer's, so the final fsync finds
    little left to do (on Linux, ``POSIX_FADV_DONTNEED`` starts writeback of dirty pages and
    drops the clean ones: a checkpoint being written does not push the training job's files out
    of the page cache either). Elsewhere, or if refused, nothing happens.
    """
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class SyncBatch:
    """Local files written under temporary names, made durable and published together.

    ``flush`` fsyncs every file (concurrently, on the I/O pool: a journaling file system commits
    them in one or two journal transactions instead of one each), renames each to its final
    name, then fsyncs every directory that gained an entry, once each and concurrently. The
    durability is that of one ``LocalStream.commit`` per file; the cost is about that of one.
    """

    def __init__(self) -> None:
        self._files: list[LocalStream] = []
        self._lock = threading.Lock()

    def add(self, stream: LocalStream) -> None:
        with self._lock:
            self._files.append(stream)

    def __len__(self) -> int:
        return len(self._files)

    def flush(self) -> None:
        with self._lock:
            files, self._files = self._files, []
        if not files:
            return
        try:
            run_all([functools.partial(_fsync_file, f) for f in files])
            for f in files:
                with translate_errors(f._final):
                    f._f.close()
                    os.replace(f._tmp, f._final)
        except BaseException:
            for f in files:
                f.abort()
            raise
        dirs = sorted({d for f in files for d in f.dirs_to_sync()})
        run_all([functools.partial(_fsync_dir, d) for d in dirs])

    def discard(self) -> None:
        """Drop every file not yet published (an aborted save)."""
        with self._lock:
            files, self._files = self._files, []
        for f in files:
            f.abort()


def _fsync_file(f: LocalStream) -> None:
    with translate_errors(f._final):
        os.fsync(f._f.fileno())


def _fsync_dir(path: str) -> None:
    # The rename is durable only once the directory entry is; not every platform allows it.
    with contextlib.suppress(OSError):
        fd = os.open(path or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LocalStorage:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.url = self.root

    def os_path(self, key: str) -> str:
        """The OS path of ``key``."""
        return os.path.join(self.root, *key.split("/")) if key else self.root

    _p = os_path

    def child(self, key: str) -> LocalStorage:
        return LocalStorage(self._p(key))

    def exists(self, key: str) -> bool:
        return os.path.exists(self._p(key))

    def isdir(self, key: str) -> bool:
        return os.path.isdir(self._p(key))

    def size(self, key: str) -> int:
        with translate_errors(self.url, key):
            return os.path.getsize(self._p(key))

    def read(self, key: str) -> bytes:
        with translate_errors(self.url, key), open(self._p(key), "rb") as f:
            return f.read()

    def read_range(self, key: str, start: int, stop: int) -> bytes:
        with translate_errors(self.url, key), open(self._p(key), "rb") as f:
            data = os.pread(f.fileno(), stop - start, start)
        if len(data) != stop - start:
            raise CorruptDataError(f"{self._p(key)}: truncated, expected {stop} bytes")
        return data

    def readinto(self, key: str, offset: int, buffers: list[memoryview]) -> None:
        want = sum(b.nbytes for b in buffers)
        with translate_errors(self.url, key):
            fd = os.open(self._p(key), os.O_RDONLY)
            try:
                got = 0
                # preadv takes at most IOV_MAX buffers at once; read in batches.
                for i in range(0, len(buffers), 512):
                    batch = buffers[i : i + 512]
                    n = os.preadv(fd, batch, offset + got)
                    if n < sum(b.nbytes for b in batch):
                        raise EOFError
                    got += n
            except EOFError:
                raise CorruptDataError(
                    f"{self._p(key)}: truncated, expected {want} bytes"
                ) from None
            finally:
                os.close(fd)

    def write_atomic(
        self, key: str, data: bytes, *, durable: bool = True, batch: SyncBatch | None = None
    ) -> None:
        """Publish ``data`` whole under ``key``. ``durable=False``: no fsync (advisory files
        such as ``latest``); ``batch``: durability and the rename left to the batch."""
        with translate_errors(self.url, key):
            s = LocalStream(self._p(key), durable=durable, batch=batch)
            try:
                s.write(data)
                s.commit()
            except BaseException:
                s.abort()
                raise

    def open_stream(self, key: str) -> StreamWriter:
        with translate_errors(self.url, key):
            return LocalStream(self._p(key))

    def open_positional(
        self, key: str, size: int, batch: SyncBatch | None = None
    ) -> PositionalWriter:
        with translate_errors(self.url, key):
            return LocalStream(self._p(key), batch=batch)

    def listdir(self, key: str) -> list[str]:
        path = self._p(key)
        if not os.path.isdir(path):
            return []
        return sorted(os.listdir(path))

    def remove_tree(self, key: str) -> None:
        with translate_errors(self.url, key):
            path = self._p(key)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)


# ---------------------------------------------------------------------------------------------
# fsspec file systems (memory://, s3://, gs://, ...)
