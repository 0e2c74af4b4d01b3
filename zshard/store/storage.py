"""Storage backends: one small interface over local disks and every fsspec file system.

URLs stay ``str`` (a ``Path`` would collapse ``s3://``). Local paths and ``file://`` use the OS
directly (positional reads into caller buffers, fsync, atomic rename); everything else goes
through fsspec, so fsspec's standard configuration (``FSSPEC_S3_ENDPOINT_URL``, AWS variables,
``~/.config/fsspec``) reaches MinIO, Ceph or R2 without zshard flags.

Every write that must not be seen half-done goes through ``write_atomic`` or ``open_stream``: the
object appears under its final key only once complete (rename on file systems, a single PUT or a
completed multipart upload on object stores).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from typing import IO, Any, Protocol

from zshard.errors import CorruptDataError, StorageError

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


class _LocalStream:
    def __init__(self, path: str) -> None:
        self._final = path
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

    def commit(self) -> None:
        with translate_errors(self._final):
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, self._final)
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

    def _p(self, key: str) -> str:
        return os.path.join(self.root, *key.split("/")) if key else self.root

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
            s = _LocalStream(self._p(key))
            try:
                s.write(data)
                s.commit()
            except BaseException:
                s.abort()
                raise

    def open_stream(self, key: str) -> StreamWriter:
        with translate_errors(self.url, key):
            return _LocalStream(self._p(key))

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


class _FsspecStream:
    def __init__(self, fs: Any, path: str, atomic_put: bool, where: str = "") -> None:
        self._fs = fs
        self._final = path
        self._where = where or path  # the URL named in errors
        # Object stores publish a multipart upload only when it completes; file-like systems
        # need a temporary name and a rename.
        self._path = path if atomic_put else f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        self._f = fs.open(self._path, "wb")

    def write(self, data: memoryview | bytes) -> None:
        # Buffered parts are uploaded from here: network and quota errors surface in write.
        with translate_errors(self._where):
            self._f.write(data)

    def commit(self) -> None:
        with translate_errors(self._where):
            self._f.close()
            if self._path != self._final:
                self._fs.mv(self._path, self._final)

    def abort(self) -> None:
        discard = getattr(self._f, "discard", None)
        with contextlib.suppress(Exception):
            if discard is not None:
                discard()  # s3fs: abandon the multipart upload, nothing is published
            else:
                self._f.close()
        if self._path != self._final:
            with contextlib.suppress(Exception):
                self._fs.rm(self._path)


class FsspecStorage:
    def __init__(self, url: str, fs: Any = None, path: str | None = None) -> None:
        import fsspec

        self.url = url.rstrip("/")
        if fs is None:
            with translate_errors(url):
                fs, path = fsspec.core.url_to_fs(url)
        self.fs = fs
        self.path = (path or "").rstrip("/")
        protocol = getattr(fs, "protocol", "")
        protocols = {protocol} if isinstance(protocol, str) else set(protocol)
        self._atomic_put = bool(protocols & _OBJECT_STORES)

    def _p(self, key: str) -> str:
        return f"{self.path}/{key}" if key else self.path

    def child(self, key: str) -> FsspecStorage:
        return FsspecStorage(f"{self.url}/{key}", self.fs, self._p(key))

    def exists(self, key: str) -> bool:
        with translate_errors(self.url, key):
            return bool(self.fs.exists(self._p(key)))

    def isdir(self, key: str) -> bool:
        with translate_errors(self.url, key):
            return bool(self.fs.isdir(self._p(key)))

    def size(self, key: str) -> int:
        with translate_errors(self.url, key):
            return int(self.fs.size(self._p(key)))

    def read(self, key: str) -> bytes:
        with translate_errors(self.url, key):
            return bytes(self.fs.cat_file(self._p(key)))

    def read_range(self, key: str, start: int, stop: int) -> bytes:
        with translate_errors(self.url, key):
            data = bytes(self.fs.cat_file(self._p(key), start=start, end=stop))
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
        with translate_errors(self.url, key):
            if self._atomic_put:
                self.fs.pipe_file(self._p(key), data)
            else:
                s = _FsspecStream(self.fs, self._p(key), False, f"{self.url}/{key}")
                try:
                    s.write(data)
                    s.commit()
                except BaseException:
                    s.abort()
                    raise

    def open_stream(self, key: str) -> StreamWriter:
        with translate_errors(self.url, key):
            return _FsspecStream(self.fs, self._p(key), self._atomic_put, f"{self.url}/{key}")

    def listdir(self, key: str) -> list[str]:
        with translate_errors(self.url, key):
            try:
                entries = self.fs.ls(self._p(key), detail=False)
            except FileNotFoundError:
                return []
        base = self._p(key).rstrip("/")
        names = {posixpath.basename(str(e).rstrip("/")) for e in entries}
        names.discard(posixpath.basename(base))
        return sorted(n for n in names if n)

    def remove_tree(self, key: str) -> None:
        with translate_errors(self.url, key):
            if self.fs.exists(self._p(key)):
                self.fs.rm(self._p(key), recursive=True)


def open_storage(url: str) -> Storage:
    """Storage rooted at ``url``: a local path, ``file://`` URL, or any fsspec URL."""
    if "://" not in url:
        return LocalStorage(url)
    if url.startswith("file://"):
        return LocalStorage(url[len("file://") :])
    return FsspecStorage(url)


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")
