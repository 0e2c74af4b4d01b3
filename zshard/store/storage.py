"""Storage backends: one small interface over local disks and every fsspec file system.

URLs stay ``str`` (a ``Path`` would collapse ``s3://``). Local paths and ``file://`` use the OS
directly (positional reads into caller buffers, fsync, atomic rename); everything else goes
through fsspec, so fsspec's standard configuration (``FSSPEC_S3_ENDPOINT_URL``, AWS variables,
``~/.config/fsspec``) reaches MinIO, Ceph or R2 without zshard flags.

Every write that must not be seen half-done goes through ``write_atomic``, ``open_stream`` or
``open_positional``: the object appears under its final key only once complete (rename on file
systems, a single PUT or a completed multipart upload on object stores). On local disks a
:class:`SyncBatch` can take over the durability of several such writes, making them durable
together (their fsyncs issued concurrently, one directory fsync per directory) instead of one
after the other.

On S3 (s3fs) streamed and positional writes upload as they go: concurrent multipart uploads,
each part retried on its own (:class:`S3Upload`); large ranged reads are split into concurrent
ranged GETs. Both share one bounded pool of I/O threads per process (``ZSHARD_IO_THREADS``,
default 8).

fsspec calls that are safe to repeat go through ``retry.call`` (bounded, jittered backoff; see
retry.py for which operations qualify and the ``ZSHARD_RETRIES``/``ZSHARD_RETRY_BASE_S`` limits).
Local disks are not retried: their errors (ENOSPC, EIO, EACCES) do not go away by asking again.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import math
import os
import posixpath
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, NoReturn, Protocol

from zshard.errors import CorruptDataError, StorageError
from zshard.store import retry

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "r2"}


class StreamWriter(Protocol):
    def write(self, data: memoryview | bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class PositionalWriter(Protocol):
    """An object of known size written at byte offsets, from one thread; every byte is written
    exactly once (the shard writer fills padding with zeros itself). Nothing is visible under
    the key until ``commit``."""

    def pwrite(self, offset: int, data: memoryview | bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    """A tree of named byte objects under one root URL. Keys use ``/`` and are relative."""

    url: str

    def exists(self, key: str) -> bool: ...
    def isdir(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def read(self, key: str) -> bytes: ...
    def read_range(self, key: str, start: int, stop: int) -> bytes: ...
    def readinto(self, key: str, offset: int, buffers: list[memoryview]) -> None: ...
    def write_atomic(
        self, key: str, data: bytes, *, durable: bool = True, batch: SyncBatch | None = None
    ) -> None: ...
    def open_stream(self, key: str) -> StreamWriter: ...
    def open_positional(
        self, key: str, size: int, batch: SyncBatch | None = None
    ) -> PositionalWriter: ...
    def listdir(self, key: str) -> list[str]: ...
    def remove_tree(self, key: str) -> None: ...
    def child(self, key: str) -> Storage: ...


def join(*parts: str) -> str:
    return posixpath.join(*[p for p in parts if p])


# ---------------------------------------------------------------------------------------------
# One bounded pool of I/O threads per process: fsyncs of a SyncBatch, multipart uploads, ranged
# GETs. Threads spend their time in system calls and sockets, which release the GIL.

_POOL: cf.ThreadPoolExecutor | None = None
_POOL_PID = 0
_POOL_LOCK = threading.Lock()


def io_threads() -> int:
    """``ZSHARD_IO_THREADS`` (default 8): concurrent uploads, GETs or fsyncs in flight."""
    raw = os.environ.get("ZSHARD_IO_THREADS", "").strip()
    try:
        return max(1, int(raw)) if raw else 8
    except ValueError:
        return 8


def io_pool() -> cf.ThreadPoolExecutor:
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or os.getpid() != _POOL_PID:  # a forked child gets a pool of its own
            _POOL = cf.ThreadPoolExecutor(io_threads(), thread_name_prefix="zshard-io")
            _POOL_PID = os.getpid()
        return _POOL


def run_all(jobs: Sequence[Callable[[], Any]], concurrent: bool = True) -> list[Any]:
    """Run ``jobs`` on the I/O pool (inline if only one, or not ``concurrent``); results in
    order; the first error raised after every job has finished (none is left running behind the
    caller's back)."""
    if len(jobs) <= 1 or not concurrent:
        return [job() for job in jobs]
    futures = [io_pool().submit(job) for job in jobs]
    cf.wait(futures)
    return [f.result() for f in futures]


@contextlib.contextmanager
def translate_errors(url: str, key: str = "") -> Iterator[None]:
    """Turn backend exceptions into one-line ``StorageError``s naming the object and the fix."""
    where = f"{url.rstrip('/')}/{key}" if key else url
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        attempts = retry.attempts_made(e)
        if attempts > 1:  # retried transient errors: say so, the user may raise ZSHARD_RETRIES
            where = f"{where}: gave up after {attempts} attempts"
        _raise_translated(e, where)


def _raise_translated(exc: Exception, where: str) -> NoReturn:
    try:
        raise exc
    except FileNotFoundError as e:
        raise StorageError(f"{where}: not found ({e.strerror or e})") from e
    except PermissionError as e:
        raise StorageError(f"{where}: permission denied; check write access or credentials") from e
    except OSError as e:
        if getattr(e, "errno", None) == 28:  # ENOSPC
            raise StorageError(f"{where}: no space left on device; free space and retry") from e
        raise StorageError(f"{where}: {e}") from e
    except Exception as e:
        name = type(e).__name__
        if "Credentials" in name or "NoRegion" in name:
            raise StorageError(
                f"{where}: missing credentials ({name}); set AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or the fsspec configuration"
            ) from e
        if "Endpoint" in name or "Connect" in name or "ClientError" in name or "Timeout" in name:
            raise StorageError(f"{where}: unreachable or refused ({name}: {e})") from e
        raise


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


# A streamed object is spooled locally (in memory up to this size, then in a temporary file)
# and uploaded whole at commit: a failed upload can then be replayed from the spool, which a
# half-sent multipart stream cannot. The cost is local scratch space for one object at a time.
SPOOL_MEMORY_BYTES = 16 << 20
_COPY_BYTES = 8 << 20


def publish(fs: Any, path: str, atomic_put: bool, put: Callable[[str], None]) -> None:
    """Make the whole object ``path`` appear at once: ``put(target)`` writes all of it.

    Object stores (``atomic_put``) publish a PUT, a completed multipart upload or a server-side
    copy only when it completes, so ``put`` writes ``path`` itself. Other fsspec file systems
    get a fresh temporary name beside it and a rename; the temporary is removed on failure. A
    retried call starts again from a fresh name, so a retry repeats a whole, idempotent write.
    """
    if atomic_put:
        put(path)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        put(tmp)
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


class _FsspecStream:
    def __init__(
        self,
        fs: Any,
        path: str,
        atomic_put: bool,
        where: str = "",
        policy: retry.RetryPolicy | None = None,
    ) -> None:
        self._fs = fs
        self._final = path
        self._where = where or path  # the URL named in errors
        self._atomic_put = atomic_put
        self._policy = policy
        self._spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed in commit/abort
            max_size=SPOOL_MEMORY_BYTES, prefix="zshard-spool-"
        )
        self._size = 0

    def write(self, data: memoryview | bytes) -> None:
        self.pwrite(self._size, data)

    def pwrite(self, offset: int, data: memoryview | bytes) -> None:
        try:
            if offset != self._spool.tell():
                self._spool.seek(offset)
            self._spool.write(data)
        except OSError as e:
            raise StorageError(
                f"{self._where}: local spool ({tempfile.gettempdir()}) failed: {e}; free space "
                "there or set TMPDIR"
            ) from e
        self._size = max(self._size, offset + memoryview(data).nbytes)

    def _upload_once(self) -> None:
        publish(self._fs, self._final, self._atomic_put, self._upload_to)

    def _upload_to(self, target: str) -> None:
        self._spool.seek(0)
        if self._size <= SPOOL_MEMORY_BYTES:
            self._fs.pipe_file(target, self._spool.read())
            return
        f = self._fs.open(target, "wb")
        try:
            while block := self._spool.read(_COPY_BYTES):
                f.write(block)
            f.close()
        except BaseException:
            _discard(f)
            raise

    def commit(self) -> None:
        try:
            with translate_errors(self._where):
                if self._atomic_put:
                    retry.call(self._upload_once, self._where, self._policy)
                else:
                    # Upload under a temporary name (retried whole, from the spool), then the
                    # rename (retried on its own: a lost success is not re-uploaded).
                    tmp = retry.call(self._upload_tmp, self._where, self._policy)
                    retry.call(lambda: self._move(tmp), self._where, self._policy)
        finally:
            self._spool.close()

    def _upload_tmp(self) -> str:
        tmp = f"{self._final}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            self._upload_to(tmp)
        except BaseException:
            with contextlib.suppress(Exception):
                self._fs.rm(tmp)
            raise
        return tmp

    def _move(self, tmp: str) -> None:
        try:
            self._fs.mv(tmp, self._final)
        except FileNotFoundError:
            # A repeat after a rename whose response was lost: the temporary is gone and the
            # object is in place, whole.
            if self._fs.exists(self._final) and self._fs.size(self._final) == self._size:
                return
            raise
        except Exception:
            moved = not self._fs.exists(tmp) and self._fs.exists(self._final)
            if moved and self._fs.size(self._final) == self._size:
                return  # it took effect; only the response was lost
            raise

    def abort(self) -> None:
        self._spool.close()  # nothing was sent: nothing to clean up remotely


def _discard(f: Any) -> None:
    discard = getattr(f, "discard", None)
    with contextlib.suppress(Exception):
        if discard is not None:
            discard()  # s3fs: abandon the multipart upload, nothing is published
        else:
            f.close()


# Multipart uploads to S3 (s3fs): parts of PART_BYTES (more for objects that would need more than
# S3's 10,000 parts), at most io_threads() in flight per process.
PART_BYTES = 16 << 20
_MIN_PART = 5 << 20  # S3's minimum for every part but the last
_MAX_PARTS = 10_000
_INFLIGHT: threading.BoundedSemaphore | None = None
_INFLIGHT_PID = 0


def _inflight() -> threading.BoundedSemaphore:
    global _INFLIGHT, _INFLIGHT_PID
    with _POOL_LOCK:
        if _INFLIGHT is None or os.getpid() != _INFLIGHT_PID:
            _INFLIGHT = threading.BoundedSemaphore(io_threads())
            _INFLIGHT_PID = os.getpid()
        return _INFLIGHT


def part_bytes(size: int | None) -> int:
    base = max(_MIN_PART, int(os.environ.get("ZSHARD_S3_PART_MB", "0") or 0) << 20 or PART_BYTES)
    if size is None:
        return base
    return max(base, math.ceil(size / _MAX_PARTS))


def is_s3(fs: Any) -> bool:
    """An s3fs file system (multipart uploads through its ``_call_s3``)."""
    protocol = getattr(fs, "protocol", "")
    protocols = {protocol} if isinstance(protocol, str) else set(protocol)
    return bool(protocols & {"s3", "s3a"}) and hasattr(fs, "_call_s3") and hasattr(fs, "loop")


class S3Upload:
    """One object streamed to S3 as a multipart upload, its parts sent while later ones are
    still being written: positional writes (from one thread) fill part buffers; a full part is
    uploaded on the I/O pool at once, retried on its own under the retry policy (an UploadPart
    of the same bytes is idempotent). ``commit`` waits for every part and completes the upload,
    which is when the object appears, whole. An object smaller than two parts is one PUT at
    ``commit``. ``size`` may be None (a stream of unknown length: the last part is what remains).

    Memory: the parts in flight (at most ``io_threads()`` per process, each ``part_bytes``) plus
    the one or two being filled.
    """

    def __init__(self, storage: FsspecStorage, key: str, size: int | None = None) -> None:
        self._st = storage
        self._key = key
        self._path = storage._p(key)
        self._where = f"{storage.url}/{key}"
        self._size = size
        self._part = part_bytes(size)
        if size is not None and size < 2 * self._part:
            self._part = max(size, 1)  # one PUT of the whole object
        self._parts: dict[int, list[Any]] = {}  # index -> [bytearray, bytes filled]
        self._done: dict[int, cf.Future[str]] = {}  # index -> ETag
        self._single: bytearray | None = None  # the whole object, when it is one PUT
        self._upload_id: str | None = None
        self._end = 0
        self._failed = False
        self._errors: list[cf.Future[str]] = []  # parts that failed (after their retries)
        bucket, obj, _ = storage.fs.split_path(self._path)
        self._bucket, self._obj = bucket, obj

    def _s3(self, method: str, **kw: Any) -> Any:
        import fsspec.asyn  # why: slow to import; only object stores need it

        fs = self._st.fs
        return fsspec.asyn.sync(
            fs.loop, fs._call_s3, method, Bucket=self._bucket, Key=self._obj, **kw
        )

    def _call(self, fn: Callable[[], Any]) -> Any:
        with translate_errors(self._where):
            return retry.call(fn, self._where, self._st.retry_policy)

    def write(self, data: memoryview | bytes) -> None:
        self.pwrite(self._end, data)

    def pwrite(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if self._size is not None and offset + view.nbytes > self._size:
            raise ValueError(f"{self._where}: write past the object's {self._size} bytes")
        self._end = max(self._end, offset + view.nbytes)
        while view.nbytes:
            i = offset // self._part
            entry = self._parts.get(i)
            if entry is None:
                if i in self._done:
                    raise ValueError(f"{self._where}: part {i + 1} was written twice")
                n = (
                    self._part
                    if self._size is None
                    else min(self._part, self._size - i * self._part)
                )
                entry = self._parts[i] = [bytearray(n), 0]
            buf, filled = entry
            lo = offset - i * self._part
            take = min(view.nbytes, self._part - lo)
            buf[lo : lo + take] = view[:take]
            entry[1] = filled + take
            view, offset = view[take:], offset + take
            if entry[1] == len(buf):  # every byte of the part written
                self._ship(i)

    def _ship(self, i: int) -> None:
        buf = self._parts.pop(i)[0]
        if i == 0 and self._size is not None and self._size <= self._part:
            self._single = buf  # one part in all: a single PUT at commit
            return
        if self._errors:  # a part failed for good: stop sending the rest
            self._errors[0].result()
        if self._upload_id is None:
            out = self._call(lambda: self._s3("create_multipart_upload"))
            self._upload_id = out["UploadId"]
        upload_id = self._upload_id
        gate = _inflight()
        gate.acquire()  # back-pressure: at most io_threads() parts in flight per process

        def send() -> str:
            try:
                out = self._call(
                    lambda: self._s3(
                        "upload_part", UploadId=upload_id, PartNumber=i + 1, Body=bytes(buf)
                    )
                )
                return str(out["ETag"])
            finally:
                gate.release()

        try:
            fut = io_pool().submit(send)
        except BaseException:
            gate.release()
            raise
        fut.add_done_callback(lambda f: self._errors.append(f) if f.exception() else None)
        self._done[i] = fut

    def commit(self) -> None:
        try:
            self._commit()
        except BaseException:
            self.abort()
            raise

    def _commit(self) -> None:
        if self._size is not None and self._end != self._size:
            raise ValueError(f"{self._where}: {self._end} of {self._size} bytes written")
        if self._size is None and self._parts:
            # A stream: what remains is the last part (or the whole object).
            (i,) = self._parts
            buf, filled = self._parts[i]
            del buf[filled:]
            if self._upload_id is None and not self._done:
                self._single = self._parts.pop(i)[0]
            else:
                self._ship(i)
        if self._parts:
            raise ValueError(f"{self._where}: parts {sorted(self._parts)} were not filled")
        if self._upload_id is None:
            data = bytes(self._single or b"")
            self._st._call(self._key, lambda: self._st.fs.pipe_file(self._path, data))
            return
        cf.wait(list(self._done.values()))
        parts = [{"PartNumber": i + 1, "ETag": f.result()} for i, f in sorted(self._done.items())]
        upload_id = self._upload_id
        attempt = [0]

        def complete() -> None:
            attempt[0] += 1
            try:
                self._s3(
                    "complete_multipart_upload",
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
            except Exception as e:
                # A repeat after a lost success finds the upload gone: the object is there.
                gone = attempt[0] > 1 and "NoSuchUpload" in f"{type(e).__name__} {e}"
                if gone and self._st.exists(self._key):
                    return
                raise

        self._call(complete)
        self._upload_id = None  # completed: nothing to abort
        self._st.fs.invalidate_cache(self._path)

    def abort(self) -> None:
        if self._failed:
            return
        self._failed = True
        futures = list(self._done.values())
        for f in futures:
            if f.cancel():  # never started: its slot in flight is given back here
                _inflight().release()
        cf.wait(futures)
        self._parts.clear()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            with contextlib.suppress(Exception):  # best effort; S3 lifecycle rules do the rest
                self._s3("abort_multipart_upload", UploadId=upload_id)


class FsspecStorage:
    def __init__(self, url: str, fs: Any = None, path: str | None = None) -> None:
        import fsspec  # why: slow to import; local paths never need it

        self.url = url.rstrip("/")
        if fs is None:
            with translate_errors(url):
                fs, path = fsspec.core.url_to_fs(url)
        self.fs = fs
        self.path = (path or "").rstrip("/")
        protocol = getattr(fs, "protocol", "")
        protocols = {protocol} if isinstance(protocol, str) else set(protocol)
        # Object stores publish whole objects; other file systems need a temporary and a rename.
        self.atomic_put = bool(protocols & _OBJECT_STORES)
        self.retry_policy = retry.RetryPolicy.from_env()
        self.s3 = is_s3(fs)

    def _p(self, key: str) -> str:
        return f"{self.path}/{key}" if key else self.path

    def _call(self, key: str, fn: Any) -> Any:
        """``fn()`` with bounded retries (only for calls safe to repeat), errors translated."""
        with translate_errors(self.url, key):
            return retry.call(fn, f"{self.url}/{key}", self.retry_policy)

    def child(self, key: str) -> FsspecStorage:
        c = FsspecStorage(f"{self.url}/{key}", self.fs, self._p(key))
        c.retry_policy = self.retry_policy
        return c

    def _fresh(self, key: str) -> str:
        """The path of ``key``, with fsspec's listing cache for it dropped.

        s3fs (and other fsspec stores) answer ``exists``/``info``/``ls`` from listings cached
        in this process and invalidate them only on their own writes. Other processes write the
        same root (the other ranks' shards, a concurrent save, a commit seen by a reader), so a
        cached answer can miss a committed manifest or list a deleted step: always ask.
        """
        path = self._p(key)
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate(path)
        return path

    def exists(self, key: str) -> bool:
        return bool(self._call(key, lambda: self.fs.exists(self._fresh(key))))

    def isdir(self, key: str) -> bool:
        return bool(self._call(key, lambda: self.fs.isdir(self._fresh(key))))

    def size(self, key: str) -> int:
        return int(self._call(key, lambda: self.fs.size(self._fresh(key))))

    def read(self, key: str) -> bytes:
        return bytes(self._call(key, lambda: self.fs.cat_file(self._p(key))))

    def read_range(self, key: str, start: int, stop: int) -> bytes:
        data = bytes(self._call(key, lambda: self.fs.cat_file(self._p(key), start=start, end=stop)))
        if len(data) != stop - start:
            raise CorruptDataError(f"{self.url}/{key}: truncated, expected {stop - start} bytes")
        return data

    def readinto(self, key: str, offset: int, buffers: list[memoryview]) -> None:
        """Fill ``buffers`` from ``offset`` on: ranges larger than a GET part are fetched as
        concurrent ranged GETs (each retried on its own), at most ``io_threads()`` in flight,
        each copied into place as it arrives."""
        views = [b.cast("B") if b.format != "B" or b.ndim != 1 else b for b in buffers]
        total = sum(v.nbytes for v in views)
        step = read_part_bytes()
        spans = [(a, min(a + step, total)) for a in range(0, total, step)] or [(0, 0)]

        def fetch(lo: int, hi: int) -> None:
            data = memoryview(self.read_range(key, offset + lo, offset + hi))
            _scatter(views, lo, data)

        run_all([functools.partial(fetch, lo, hi) for lo, hi in spans if hi > lo], self.s3)

    def write_atomic(
        self, key: str, data: bytes, *, durable: bool = True, batch: SyncBatch | None = None
    ) -> None:
        # One PUT of the same bytes (or a fresh temporary name per attempt): repeating it after
        # a lost response is harmless. ``durable``/``batch`` concern local disks only.
        path = self._p(key)

        def put(target: str) -> None:
            self.fs.pipe_file(target, data)

        self._call(key, lambda: publish(self.fs, path, self.atomic_put, put))

    def open_stream(self, key: str) -> StreamWriter:
        if self.s3:
            return S3Upload(self, key)
        where = f"{self.url}/{key}"
        return _FsspecStream(self.fs, self._p(key), self.atomic_put, where, self.retry_policy)

    def open_positional(
        self, key: str, size: int, batch: SyncBatch | None = None
    ) -> PositionalWriter:
        if self.s3:
            return S3Upload(self, key, size)
        where = f"{self.url}/{key}"
        return _FsspecStream(self.fs, self._p(key), self.atomic_put, where, self.retry_policy)

    def listdir(self, key: str) -> list[str]:
        def ls() -> list[str]:
            try:
                return list(self.fs.ls(self._fresh(key), detail=False))
            except FileNotFoundError:
                return []

        entries = self._call(key, ls)
        base = self._p(key).rstrip("/")
        names = {posixpath.basename(str(e).rstrip("/")) for e in entries}
        names.discard(posixpath.basename(base))
        return sorted(n for n in names if n)

    def remove_tree(self, key: str) -> None:
        def rm() -> None:
            # Repeatable: a retry after a partial delete finds less, or nothing, to delete.
            try:
                if self.fs.exists(self._fresh(key)):
                    self.fs.rm(self._p(key), recursive=True)
            except FileNotFoundError:
                pass

        self._call(key, rm)


# Ranged GETs of a large read (``FsspecStorage.readinto``): at most this many bytes each, all of
# them in flight at once on the I/O pool. Fewer, larger requests cost the server less per byte
# (moto even reads the whole object for every ranged GET); io_threads() of them keep a link busy.
READ_PART_BYTES = 64 << 20


def read_part_bytes() -> int:
    return READ_PART_BYTES


def _scatter(views: list[memoryview], pos: int, data: memoryview) -> None:
    """Copy ``data`` to byte ``pos`` of the concatenation of ``views``."""
    start = 0
    for v in views:
        end = start + v.nbytes
        if end > pos and data.nbytes:
            a = pos - start
            take = min(v.nbytes - a, data.nbytes)
            v[a : a + take] = data[:take]
            data, pos = data[take:], pos + take
        start = end
        if not data.nbytes:
            return


def concurrent_ok(storage: Storage) -> bool:
    """Whether calls on ``storage`` may run from several threads at once: local disks and S3
    (s3fs runs every request on its own event loop). Other fsspec file systems, such as
    ``memory://``, are not safe to mutate and list from several threads."""
    return isinstance(storage, LocalStorage) or (isinstance(storage, FsspecStorage) and storage.s3)


def open_storage(url: str) -> Storage:
    """Storage rooted at ``url``: a local path, ``file://`` URL, or any fsspec URL."""
    if "://" not in url:
        return LocalStorage(url)
    if url.startswith("file://"):
        return LocalStorage(url[len("file://") :])
    return FsspecStorage(url)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")
