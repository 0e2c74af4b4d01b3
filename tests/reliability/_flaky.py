"""A fault-injecting fsspec file system: ``flaky://`` over ``memory://``, ``flakys3://`` over s3.

Every call zshard's ``FsspecStorage`` makes (exists, info, ls, cat_file, pipe_file, open, mv, rm)
goes through :meth:`FlakyFileSystem._maybe_fail`, which, for a seeded fraction of calls, sleeps
(latency), raises a transient error *before* the call (the request was lost), or - for calls that
change the store - performs the call and raises *after* it (the response was lost, so a retry
repeats a call that already took effect). Errors are drawn from what object stores really raise:
connection resets, timeouts, botocore's transport errors and ``503 SlowDown`` throttling.

Configure with :func:`configure` (a :class:`FaultPlan`); :data:`STATS` counts calls and faults.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

MUTATING = {"pipe_file", "mv", "rm", "close"}


@dataclass
class FaultPlan:
    error_rate: float = 0.0  # fraction of calls that fail
    after_rate: float = 0.5  # of failing mutating calls: fraction that fail after taking effect
    latency_rate: float = 0.0  # fraction of calls delayed
    latency_s: float = 0.002
    seed: int = 0
    only: set[str] = field(default_factory=set)  # restrict faults to these operations
    always: set[str] = field(default_factory=set)  # these operations always fail (before)


def _slowdown() -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {
            "Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
            "ResponseMetadata": {"HTTPStatusCode": 503},
        },
        "PutObject",
    )


def _read_timeout() -> Exception:
    from botocore.exceptions import ReadTimeoutError

    return ReadTimeoutError(endpoint_url="http://127.0.0.1:9/flaky")


def _endpoint() -> Exception:
    from botocore.exceptions import EndpointConnectionError

    return EndpointConnectionError(endpoint_url="http://127.0.0.1:9/flaky")


ERRORS = {
    "connection reset": lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "timeout": lambda: TimeoutError("timed out"),
    "503 SlowDown": _slowdown,
    "s3fs SlowDown": lambda: OSError(errno.EBUSY, "Please reduce your request rate."),
    "read timeout": _read_timeout,
    "endpoint unreachable": _endpoint,
}

_plan = FaultPlan()
_rng = random.Random(0)
_lock = threading.Lock()
STATS: Counter[str] = Counter()


def configure(plan: FaultPlan) -> None:
    global _plan, _rng
    with _lock:
        _plan = plan
        _rng = random.Random(plan.seed)
        STATS.clear()


def _draw(op: str) -> tuple[str, str | None]:
    """("none"|"before"|"after"|"latency", error kind)."""
    with _lock:
        STATS[f"calls.{op}"] += 1
        STATS["calls"] += 1
        p = _plan
        if op in p.always:
            STATS["faults"] += 1
            STATS["faults.always"] += 1
            return "before", "connection reset"
        if p.only and op not in p.only:
            return "none", None
        if _rng.random() < p.latency_rate:
            STATS["latency"] += 1
            time.sleep(p.latency_s)
        if _rng.random() >= p.error_rate:
            return "none", None
        kind = _rng.choice(sorted(ERRORS))
        when = "after" if op in MUTATING and _rng.random() < p.after_rate else "before"
        STATS["faults"] += 1
        STATS[f"faults.{when}"] += 1
        STATS[f"faults.{kind}"] += 1
        return when, kind


class _FlakyFile:
    """A writable file whose writes and close (the upload) fail like the file system's calls."""

    def __init__(self, fs: FlakyFileSystem, f: Any) -> None:
        self._fs, self._f = fs, f

    def write(self, data: Any) -> int:
        when, kind = _draw("write")
        if when == "before" and kind:
            raise ERRORS[kind]()
        return int(self._f.write(data))

    def close(self) -> None:
        when, kind = _draw("close")
        if when == "before" and kind:
            # The upload never completed: nothing may be published.
            discard = getattr(self._f, "discard", None)
            if discard is not None:
                discard()
            raise ERRORS[kind]()
        self._f.close()
        if when == "after" and kind:
            raise ERRORS[kind]()

    def discard(self) -> None:
        discard = getattr(self._f, "discard", None)
        if discard is not None:
            discard()

    def __enter__(self) -> _FlakyFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FlakyFileSystem(AbstractFileSystem):
    """``flaky://<path>`` = ``memory://<path>`` with faults."""

    protocol: Any = "flaky"
    target_protocol = "memory"
    cachable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = fsspec.filesystem(self.target_protocol)

    def _t(self, path: str) -> str:
        path = self._strip_protocol(path)
        return path if self.target_protocol != "memory" else "/" + path.lstrip("/")

    def _call(self, op: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        when, kind = _draw(op)
        if when == "before" and kind:
            raise ERRORS[kind]()
        result = fn(*args, **kwargs)
        if when == "after" and kind:
            raise ERRORS[kind]()
        return result

    # -- what FsspecStorage uses ----------------------------------------------------------------

    def invalidate_cache(self, path: str | None = None) -> None:
        self.target.invalidate_cache(None if path is None else self._t(path))

    def exists(self, path: str, **kw: Any) -> bool:
        return bool(self._call("exists", self.target.exists, self._t(path)))

    def isdir(self, path: str) -> bool:
        return bool(self._call("isdir", self.target.isdir, self._t(path)))

    def info(self, path: str, **kw: Any) -> Any:
        return self._call("info", self.target.info, self._t(path), **kw)

    def size(self, path: str) -> Any:
        return self._call("size", self.target.size, self._t(path))

    def ls(self, path: str, detail: bool = True, **kw: Any) -> Any:
        out = self._call("ls", self.target.ls, self._t(path), detail=detail, **kw)
        if self.target_protocol == "memory":
            if detail:
                return [{**e, "name": e["name"].lstrip("/")} for e in out]
            return [str(e).lstrip("/") for e in out]
        return out

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: Any):
        return self._call("cat_file", self.target.cat_file, self._t(path), start=start, end=end)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kw: Any) -> None:
        self._call("pipe_file", self.target.pipe_file, self._t(path), value, mode=mode)

    def mv(self, path1: str, path2: str, **kw: Any) -> None:
        self._call("mv", self.target.mv, self._t(path1), self._t(path2))

    def rm(self, path: str, recursive: bool = False, **kw: Any) -> None:
        self._call("rm", self.target.rm, self._t(path), recursive=recursive)

    def open(self, path: str, mode: str = "rb", **kw: Any) -> Any:  # type: ignore[override]
        f = self._call("open", self.target.open, self._t(path), mode)
        return _FlakyFile(self, f) if "w" in mode else f


class FlakyS3FileSystem(FlakyFileSystem):
    """``flakys3://bucket/key`` = ``s3://bucket/key`` with faults. The protocol tuple names s3 so
    zshard treats it as an object store (whole-object PUTs, no rename)."""

    protocol = ("flakys3", "s3")
    target_protocol = "s3"


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
fsspec.register_implementation("flakys3", FlakyS3FileSystem, clobber=True)
