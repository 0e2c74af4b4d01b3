"""Storage backends: one small interface over local disks and every fsspec file system.

URLs stay ``str`` (a ``Path`` would collapse ``s3://``). Local paths and ``file://`` use the OS
directly (positional reads into caller buffers, fsync, atomic rename); everything else goes
through fsspec, so fsspec's standard configuration (``FSSPEC_S3_ENDPOINT_URL``, AWS variables,
``~/.config/fsspec``) reaches MinIO, Ceph or R2 without zshard flags.

Every write that must not be seen half-done goes through ``write_atomic`` or ``open_stream``: the
object appears under its final key only once complete (rename on file systems, a single PUT or a
completed multipart upload on object stores).

fsspec calls that are safe to repeat go through ``retry.call`` (bounded, jittered backoff; see
retry.py for which operations qualify and the ``ZSHARD_RETRIES``/``ZSHARD_RETRY_BASE_S`` limits).
Local disks are not retried: their errors (ENOSPC, EIO, EACCES) do not go away by asking again.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, NoReturn, Protocol

from zshard.errors import CorruptDataError, StorageError
from zshard.store import retry

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "r2"}


class StreamWriter(Protocol):
    def write(self, data: memoryview | bytes) -> None: ...
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
    def write_atomic(self, key: str, data: bytes) -> None: ...
    def open_stream(self, key: str) -> StreamWriter: ...
    def listdir(self, key: str) -> list[str]: ...
    def remove_tree(self, key: str) -> None: ...
    def child(self, key: str) -> Storage: ...


def join(*parts: str) -> str:
    return posixpath.join(*[p for p in parts if p])


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


class LocalStream:
    """A local file written under a temporary name and renamed to ``path`` by ``commit``.

    ``durable`` (checkpoints): the file is fsynced before the rename and its directory after
    it, so a committed object survives a crash. Scratch files that a crash discards whole
    (offload swap) pass ``durable=False`` and skip both.
    """

    def __init__(self, path: str, *, durable: bool = True) -> None:
        self._final = path
        self._durable = durable
        self._tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._f: IO[bytes] = open(self._tmp, "wb", buffering=0)  # noqa: SIM115 - closed in commit

    # Writes and the commit fail like any other I/O (ENOSPC, EIO): one StorageError naming the
    # file, so callers abort the stream and the CLI prints one line.
    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        with translate_errors(self._final):
            while view:
                n = self._f.write(view)
                view = view[n or 0 :]

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
        with translate_errors(self._final):
            if self._durable:
                os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, self._final)
        if self._durable:
            _fsync_dir(os.path.dirname(self._final))

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(OSError):
            os.remove(self._tmp)


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

    def write_atomic(self, key: str, data: bytes) -> None:
        with translate_errors(self.url, key):
            s = LocalStream(self._p(key))
            try:
                s.write(data)
                s.commit()
            except BaseException:
                s.abort()
                raise

    def open_stream(self, key: str) -> StreamWriter:
        with translate_errors(self.url, key):
            return LocalStream(self._p(key))

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
        try:
            self._spool.write(data)
        except OSError as e:
            raise StorageError(
                f"{self._where}: local spool ({tempfile.gettempdir()}) failed: {e}; free space "
                "there or set TMPDIR"
            ) from e
        self._size += memoryview(data).nbytes

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
                retry.call(self._upload_once, self._where, self._policy)
        finally:
            self._spool.close()

    def abort(self) -> None:
        self._spool.close()  # nothing was sent: nothing to clean up remotely


def _discard(f: Any) -> None:
    discard = getattr(f, "discard", None)
    with contextlib.suppress(Exception):
        if discard is not None:
            discard()  # s3fs: abandon the multipart upload, nothing is published
        else:
            f.close()


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
        total = sum(b.nbytes for b in buffers)
        data = memoryview(self.read_range(key, offset, offset + total))
        pos = 0
        for b in buffers:
            b.cast("B")[:] = data[pos : pos + b.nbytes]
            pos += b.nbytes

    def write_atomic(self, key: str, data: bytes) -> None:
        # One PUT of the same bytes (or a fresh temporary name per attempt): repeating it after
        # a lost response is harmless.
        path = self._p(key)

        def put(target: str) -> None:
            self.fs.pipe_file(target, data)

        self._call(key, lambda: publish(self.fs, path, self.atomic_put, put))

    def open_stream(self, key: str) -> StreamWriter:
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


def open_storage(url: str) -> Storage:
    """Storage rooted at ``url``: a local path, ``file://`` URL, or any fsspec URL."""
    if "://" not in url:
        return LocalStorage(url)
    if url.startswith("file://"):
        return LocalStorage(url[len("file://") :])
    return FsspecStorage(url)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")
