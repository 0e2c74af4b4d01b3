"""Bounded retries with jittered exponential backoff for object-store calls.

Object stores fail transiently: a connection resets, a request times out, the service throttles
(S3's ``503 SlowDown``). ``FsspecStorage`` wraps every call that is safe to repeat in
:func:`call`; everything else fails at once.

Safe to repeat (idempotent): reads, ``exists``/``size``/``ls``, a whole-object PUT of the same
bytes, a delete that treats "already gone" as done, and a streamed write replayed whole from its
local spool (see ``storage._FsspecStream``). Never repeated: an exclusive create (a lost success
would look like someone else's object: ``lock.py`` reads it back instead), a rename, and any part
of an upload that cannot be replayed.

Limits come from the environment so every process of a run (launcher, workers, tools) agrees:
``ZSHARD_RETRIES`` attempts in all (default 5; 1 disables retries), ``ZSHARD_RETRY_BASE_S`` the
first backoff (default 0.2 s), doubled per attempt, capped at ``ZSHARD_RETRY_CAP_S`` (default 5 s),
with full jitter (a uniform draw in ``[0, backoff]``) so that many ranks throttled together do not
retry in lockstep. Worst case with the defaults: about 3 s of sleeping before the error surfaces.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from zshard.errors import ConfigError

log = logging.getLogger("zshard.store")

T = TypeVar("T")

# errno values of transient failures. EBUSY: s3fs's translation of 503 SlowDown and
# ServiceUnavailable; EREMOTEIO: its translation of 500 InternalError; EIO: its catch-all for an
# unrecognised service error (bounded, so retrying a permanent one costs only the backoff).
_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.EBUSY,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.EHOSTUNREACH,
    errno.EIO,
    errno.ENETDOWN,
    errno.ENETRESET,
    errno.ENETUNREACH,
    errno.EPIPE,
    errno.EREMOTEIO,
    errno.ETIMEDOUT,
}
# Service error codes (botocore ClientError, also found in messages) that mean "try again".
_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "OperationAborted",
    "500",
    "502",
    "503",
    "504",
}
# Exception class names of transport failures from botocore/aiohttp/urllib3, matched by name so
# this module imports none of them.
_TRANSIENT_NAMES = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
    "ProxyConnectionError",
    "ResponseStreamingError",
    "IncompleteRead",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientPayloadError",
    "ClientOSError",
    "FSTimeoutError",
    "ProtocolError",
)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently to repeat a transient failure."""

    attempts: int = 5  # calls in all, including the first
    base_s: float = 0.2  # first backoff; doubled per attempt
    cap_s: float = 5.0  # no single backoff exceeds this

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"ZSHARD_RETRIES must be >= 1, got {self.attempts}")
        if self.base_s < 0 or self.cap_s < 0:
            raise ConfigError(
                f"ZSHARD_RETRY_BASE_S/ZSHARD_RETRY_CAP_S must be >= 0, got {self.base_s}, "
                f"{self.cap_s}"
            )

    @classmethod
    def from_env(cls) -> RetryPolicy:
        def num(name: str, default: float, kind: Callable[[str], float]) -> float:
            raw = os.environ.get(name, "").strip()
            if not raw:
                return default
            try:
                return kind(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r} is not a number") from None

        return cls(
            attempts=int(num("ZSHARD_RETRIES", cls.attempts, int)),
            base_s=num("ZSHARD_RETRY_BASE_S", cls.base_s, float),
            cap_s=num("ZSHARD_RETRY_CAP_S", cls.cap_s, float),
        )

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to sleep after failed attempt ``attempt`` (1-based): full jitter."""
        ceiling = min(self.cap_s, self.base_s * 2 ** (attempt - 1))
        return (rng or random).uniform(0, ceiling)


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error") or {}
        code = str(err.get("Code", ""))
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if not code and status:
            code = str(status)
        if status in (429, 500, 502, 503, 504):
            return code or str(status)
        return code
    return ""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure that the same call may not hit again."""
    # Definite answers first: these never get better by asking again.
    if isinstance(
        exc,
        FileNotFoundError
        | FileExistsError
        | PermissionError
        | IsADirectoryError
        | NotADirectoryError,
    ):
        return False
    name = type(exc).__name__
    if "Credentials" in name or "NoRegion" in name or "ParamValidation" in name:
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if any(n in name for n in _TRANSIENT_NAMES):
        return True
    code = _code(exc)
    if code:
        return code in _TRANSIENT_CODES
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return False
        if exc.errno in _TRANSIENT_ERRNOS:
            return True
        text = str(exc)
        return any(c in text for c in ("SlowDown", "reduce your request rate", "Throttl"))
    # The cause of a translated error (s3fs sets __cause__ to botocore's ClientError).
    cause = exc.__cause__
    return cause is not None and cause is not exc and is_transient(cause)


def call(
    fn: Callable[[], T],
    what: str,
    policy: RetryPolicy | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, repeated on transient errors up to the policy's attempts, with backoff.

    The last error propagates unchanged (callers translate it into a ``StorageError``), with a
    note of how many attempts were made. Only wrap calls that are safe to repeat.
    """
    p = policy or RetryPolicy.from_env()
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            if attempt >= p.attempts or not is_transient(exc):
                if attempt > 1:
                    exc.add_note(f"zshard: gave up after {attempt} attempts")
                    _mark_attempts(exc, attempt)
                raise
            delay = p.backoff(attempt)
            log.debug(
                "%s: %s: %s; retry %d in %.2f s", what, type(exc).__name__, exc, attempt, delay
            )
            sleep(delay)
            attempt += 1


def _mark_attempts(exc: BaseException, attempts: int) -> None:
    # translate_errors puts the count in its one-line message.
    with contextlib.suppress(AttributeError):  # exceptions with __slots__
        exc.zshard_attempts = attempts  # type: ignore[attr-defined]


def attempts_made(exc: BaseException) -> int:
    """How many attempts ``call`` made before ``exc`` propagated (1 if it was not retried)."""
    return int(getattr(exc, "zshard_attempts", 1))
