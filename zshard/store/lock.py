"""The checkpoint-root lock: one writing run per root, so steps of two runs never interleave.

A root being written holds ``.zshard-lock``, a small JSON object: owner host, pid (and its start
time, so a recycled pid is not mistaken for the owner), run id, purpose, creation time and a
heartbeat time that the owner refreshes every ``timeout / 6`` seconds from a daemon thread.

Taking the lock:

- **Local disks**: the JSON is written to a temporary file and hard-linked to the lock name.
  ``link`` fails if the name exists, atomically, and the lock appears with its whole content.
- **Object stores**: a conditional PUT (``If-None-Match: *``, s3fs ``pipe_file(mode="create")``;
  AWS S3, MinIO and moto honour it). A backend that lacks it gets write, wait
  ``ZSHARD_LOCK_SETTLE_S`` (default 1 s), read back and compare the run id: two writers that
  start within the settle time of each other are told apart only if the store is consistent
  within it. This is the weaker guarantee of such backends.

A lock is **stale** when its heartbeat is older than ``ZSHARD_LOCK_TIMEOUT_S`` (default 120 s;
clocks of the hosts involved must roughly agree) or, on the same host, when its process has
exited. A stale lock is taken over under a short-lived mutex (``.zshard-lock.takeover``, created
exclusively the same way): the taker re-reads the lock and replaces it in place only if it is
still the one judged stale, so the lock's name never goes missing and two takers never both win.
Each heartbeat re-reads the lock first; if another run took it (this run's heartbeats stalled
past the timeout, or clocks disagree), ``RootLock.lost`` is set and the launcher reports it.

The lock is re-entrant for its run: a process whose ``ZSHARD_RUN_ID`` equals the holder's (the
workers of a ``zshard train`` launcher that holds it), or the holding process itself, may write.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from zshard.errors import ConfigError, StorageError, ZshardError
from zshard.store.storage import (
    FsspecStorage,
    LocalStorage,
    Storage,
    open_storage,
    translate_errors,
)

log = logging.getLogger("zshard.store")

LOCK_KEY = ".zshard-lock"
RUN_ID_ENV = "ZSHARD_RUN_ID"  # the launcher's run id, inherited by its workers
HOST = socket.gethostname()


class RootLockedError(ZshardError, RuntimeError):
    """Another run holds the checkpoint root's lock."""


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    return value


def lock_timeout_s() -> float:
    return _env_seconds("ZSHARD_LOCK_TIMEOUT_S", 120.0)


def _process_start(pid: int) -> float | None:
    import psutil  # why: only a contested lock needs it

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def _process_alive(pid: int, start: float | None) -> bool:
    """Whether ``pid`` on this host still runs, and is the process that took the lock."""
    import psutil  # why: only a contested lock needs it

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped: gone
            return False
        return start is None or abs(p.create_time() - start) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists but not ours to inspect: assume alive
        return True


@dataclass(frozen=True)
class LockInfo:
    host: str
    pid: int
    run_id: str
    purpose: str
    created: float  # seconds since the epoch (UTC)
    heartbeat: float
    pid_start: float | None = None
    nonce: str = ""  # unique per acquisition: tells our own lock from our run's other locks

    def to_bytes(self) -> bytes:
        return json.dumps({"zshard_lock": 1, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LockInfo | None:
        """The lock's content, or None if it is not a lock zshard wrote (treated as stale)."""
        try:
            obj = json.loads(raw)
            return cls(
                host=str(obj["host"]),
                pid=int(obj["pid"]),
                run_id=str(obj["run_id"]),
                purpose=str(obj.get("purpose", "")),
                created=float(obj["created"]),
                heartbeat=float(obj["heartbeat"]),
                pid_start=None if obj.get("pid_start") is None else float(obj["pid_start"]),
                nonce=str(obj.get("nonce", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def is_ours(self) -> bool:
        """Held by our run (``ZSHARD_RUN_ID``) or by this very process."""
        env = os.environ.get(RUN_ID_ENV)
        return (env is not None and env == self.run_id) or (
            self.host == HOST and self.pid == os.getpid()
        )

    def stale_reason(self, timeout_s: float, now: float | None = None) -> str | None:
        """Why this lock no longer protects anything, or None if its owner looks alive."""
        now = time.time() if now is None else now
        if now - self.heartbeat > timeout_s:
            return f"no heartbeat for {now - self.heartbeat:.0f} s (timeout {timeout_s:.0f} s)"
        if self.host == HOST and not _process_alive(self.pid, self.pid_start):
            return f"its process {self.pid} on {self.host} has exited"
        return None

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        since = _dt.datetime.fromtimestamp(self.created, _dt.timezone.utc).isoformat(
            timespec="seconds"
        )
        what = f" ({self.purpose})" if self.purpose else ""
        return (
            f"run {self.run_id}{what} on host {self.host}, pid {self.pid}, since {since}, last "
            f"heartbeat {max(0.0, now - self.heartbeat):.0f} s ago"
        )


def read_lock(storage: Storage) -> tuple[LockInfo | None, bytes | None]:
    """The current lock of a root: (parsed or None, raw bytes or None if there is no lock)."""
    try:
        raw = storage.read(LOCK_KEY)
    except StorageError:
        if storage.exists(LOCK_KEY):
            raise
        return None, None
    return LockInfo.from_bytes(raw), raw


# -- backend primitives -------------------------------------------------------------------------


def _create_exclusive(storage: Storage, data: bytes, key: str = LOCK_KEY) -> bool:
    """Create ``key`` with ``data`` unless it exists; True if we created it."""
    if isinstance(storage, LocalStorage):
        path = os.path.join(storage.root, key)
        with translate_errors(storage.url, key):
            os.makedirs(storage.root, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
            # No fsync: a lock guards live processes only. After a crash of the machine every
            # holder is dead, and a lock file whose content did not survive reads as "not a
            # zshard lock", which is stale, like a dead holder's.
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)  # atomic, fails if the name exists, never half-written
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
    if isinstance(storage, FsspecStorage):
        path = storage._p(key)
        try:
            # Retried like any PUT: after a lost success the repeat fails with "exists", and the
            # caller's read-back then finds its own nonce.
            storage._call(key, lambda: storage.fs.pipe_file(path, data, mode="create"))
            return True
        except StorageError as e:
            if isinstance(e.__cause__, FileExistsError):
                return False
            raise
        except (TypeError, NotImplementedError, ValueError):
            pass  # this backend has no exclusive create
        # No exclusive create in this backend: write if absent, settle, and read back.
        if storage.exists(key):
            return False
        storage.write_atomic(key, data)
        time.sleep(_env_seconds("ZSHARD_LOCK_SETTLE_S", 1.0))
        return True  # the caller reads back and compares the nonce
    raise StorageError(f"{storage.url}: no lock support for this storage backend")


TAKEOVER_KEY = f"{LOCK_KEY}.takeover"
_TAKEOVER_STALE_S = 10.0  # a taker that died holding the takeover mutex is ignored after this


def _take_stale(storage: Storage, seen: bytes, data: bytes) -> bool:
    """Replace a lock judged stale by ``data``, provided it is still the bytes ``seen``.

    Takers first create a short-lived mutex (``.zshard-lock.takeover``, exclusively), re-read
    the lock, and replace it in place, so its name never goes missing: a run starting meanwhile
    cannot create a second lock, and two takers cannot both win. True if ``data`` is in place.
    """
    mutex = json.dumps({"host": HOST, "pid": os.getpid(), "time": time.time()}).encode()
    if not _create_exclusive(storage, mutex, TAKEOVER_KEY):
        with contextlib.suppress(ZshardError, ValueError, KeyError, TypeError):
            held = json.loads(storage.read(TAKEOVER_KEY))
            if time.time() - float(held["time"]) > _TAKEOVER_STALE_S:
                storage.remove_tree(TAKEOVER_KEY)
        time.sleep(0.02)
        return False
    try:
        _, raw = read_lock(storage)
        if raw != seen:
            return False  # refreshed or taken meanwhile: look again
        storage.write_atomic(LOCK_KEY, data)
        return True
    finally:
        storage.remove_tree(TAKEOVER_KEY)


# -- the lock -----------------------------------------------------------------------------------


class RootLock:
    """The lock of one checkpoint root. ``acquire`` it, and ``release`` (or use ``with``).

    Args:
        root_url: the checkpoint root (local path or fsspec URL).
        run_id: this run's id (default ``$ZSHARD_RUN_ID`` or a new one).
        purpose: shown to whoever is refused, e.g. ``"zshard train examples/tiny.yaml"``.
        timeout_s: heartbeat age after which the lock is stale (default ``$ZSHARD_LOCK_TIMEOUT_S``
            or 120 s); heartbeats are sent every ``timeout_s / 6``.
    """

    def __init__(
        self,
        root_url: str,
        *,
        run_id: str | None = None,
        purpose: str = "",
        timeout_s: float | None = None,
        heartbeat: bool = True,
    ) -> None:
        self.url = root_url
        self.storage = open_storage(root_url)
        self.run_id = run_id or os.environ.get(RUN_ID_ENV) or uuid.uuid4().hex[:16]
        self.purpose = purpose
        self.timeout_s = lock_timeout_s() if timeout_s is None else timeout_s
        self.owned = False  # we created it (and will remove it)
        self.lost = False  # someone took it over while we held it
        self._heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._info: LockInfo | None = None
        self._created_root = False

    def _new_info(self) -> LockInfo:
        now = time.time()
        return LockInfo(
            host=HOST,
            pid=os.getpid(),
            run_id=self.run_id,
            purpose=self.purpose,
            created=now,
            heartbeat=now,
            pid_start=_process_start(os.getpid()),
            nonce=uuid.uuid4().hex,
        )

    def acquire(self) -> RootLock:
        """Take the lock, take over a stale one, or raise ``RootLockedError`` naming the owner."""
        if isinstance(self.storage, LocalStorage):
            self._created_root = not os.path.isdir(self.storage.root)
        for _ in range(50):
            info = self._new_info()
            data = info.to_bytes()
            created = _create_exclusive(self.storage, data)
            current, raw = read_lock(self.storage)
            if current is not None and current.nonce == info.nonce:
                # Ours: created now, or created by an attempt whose success response was lost.
                return self._own(current)
            if raw is None or created:
                continue  # released meanwhile, or a weak backend let another writer win
            if current is not None and current.is_ours():
                return self  # our run (or this process) holds it already: nothing to release
            reason = (
                "it is not a zshard lock"
                if current is None
                else current.stale_reason(self.timeout_s)
            )
            if reason is None:
                assert current is not None
                raise RootLockedError(
                    f"checkpoint root {self.url} is in use by {current.describe()}; wait for "
                    f"that run to finish or write to another root. If it is gone, remove "
                    f"{self.url.rstrip('/')}/{LOCK_KEY} (taken over automatically after "
                    f"{self.timeout_s:.0f} s without heartbeat, or at once on the same host "
                    "once its process has exited)"
                )
            if _take_stale(self.storage, raw, data):
                log.warning("took over the stale lock of %s: %s", self.url, reason)
                current, _ = read_lock(self.storage)
                if current is not None and current.nonce == info.nonce:
                    return self._own(current)
        raise RootLockedError(
            f"checkpoint root {self.url}: could not take the lock (others kept taking it); retry"
        )

    def _own(self, info: LockInfo) -> RootLock:
        self._info = info
        self.owned = True
        _HELD.add(self)
        _release_at_exit()
        if self._heartbeat and self.timeout_s > 0:
            self._thread = threading.Thread(
                target=self._beat, name="zshard-lock-heartbeat", daemon=True
            )
            self._thread.start()
        return self

    def _beat(self) -> None:
        interval = max(0.05, self.timeout_s / 6)
        while not self._stop.wait(interval):
            try:
                self.refresh()
            except ZshardError as e:  # a blip: the next beat tries again, well before timeout
                log.warning("lock heartbeat for %s failed: %s", self.url, e)
            if self.lost:
                return

    def refresh(self) -> None:
        """Write a new heartbeat, after checking the lock is still ours."""
        if not self.owned or self._info is None:
            return
        current, _ = read_lock(self.storage)
        if current is None or current.nonce != self._info.nonce:
            self.lost = True
            who = "nobody" if current is None else current.describe()
            log.error(
                "lost the lock of checkpoint root %s: it is now held by %s; another run may be "
                "writing there",
                self.url,
                who,
            )
            return
        self._info = LockInfo(**{**asdict(self._info), "heartbeat": time.time()})
        self.storage.write_atomic(LOCK_KEY, self._info.to_bytes())

    def release(self) -> None:
        """Remove the lock if we created it and still hold it. Safe to call twice."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if not self.owned:
            return
        self.owned = False
        _HELD.discard(self)
        with contextlib.suppress(ZshardError):
            current, _ = read_lock(self.storage)
            if current is not None and self._info is not None and current.nonce == self._info.nonce:
                self.storage.remove_tree(LOCK_KEY)
            if self._created_root and isinstance(self.storage, LocalStorage):
                with contextlib.suppress(OSError):
                    os.rmdir(self.storage.root)  # only if we made it and left it empty

    def __enter__(self) -> RootLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


_HELD: set[RootLock] = set()


def _release_all() -> None:
    # A process that exits while holding locks (an exception between prepare and commit) frees
    # them; a killed one cannot, which is what staleness is for.
    for lock in list(_HELD):
        with contextlib.suppress(Exception):
            lock.release()


def _release_at_exit() -> None:
    # Registered at each acquisition, after the storage backend was set up: atexit runs
    # handlers last-in first-out, so this runs before s3fs/aiohttp close their sessions.
    atexit.unregister(_release_all)  # re-registering moves it to the front of the queue
    atexit.register(_release_all)


def check_not_locked(root_url: str) -> None:
    """Raise ``RootLockedError`` if another live run holds the root's lock (no lock is taken)."""
    storage = open_storage(root_url)
    current, raw = read_lock(storage)
    if raw is None or current is None or current.is_ours():
        return
    if current.stale_reason(lock_timeout_s()) is None:
        raise RootLockedError(f"checkpoint root {root_url} is in use by {current.describe()}")


__all__ = [
    "LOCK_KEY",
    "RUN_ID_ENV",
    "LockInfo",
    "RootLock",
    "RootLockedError",
    "check_not_locked",
    "read_lock",
]
