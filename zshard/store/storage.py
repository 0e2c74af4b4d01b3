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

The interface shared by every backend (the writer protocols, the I/O pool, error translation)
lives in storage_base.py and the local-disk backend in storage_local.py; both are re-exported
here, the one place the rest of zshard imports storage from.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import math
import os
import posixpath
import tempfile
import threading
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from zshard.errors import CorruptDataError, StorageError
from zshard.store import retry
from zshard.store.storage_base import (
    _POOL_LOCK,
    PositionalWriter,
    StreamWriter,
    io_pool,
    io_threads,
    run_all,
    translate_errors,
)
from zshard.store.storage_base import join as join
from zshard.store.storage_local import LocalStorage, SyncBatch
from zshard.store.storage_local import LocalStream as LocalStream
from zshard.store.storage_local import makedirs as makedirs

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "r2"}


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
