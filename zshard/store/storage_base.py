"""The storage interface shared by every backend: the protocols, key joining, the process's
bounded pool of I/O threads and the translation of backend errors into ``StorageError``s."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import posixpath
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, Protocol

from zshard.errors import StorageError
from zshard.store import retry


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
