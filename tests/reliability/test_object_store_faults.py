"""Object-store faults: transient errors, lost responses, latency and throttling on a seeded
fraction of calls (``flaky://`` over memory, ``flakys3://`` over moto). Save, load, verify,
reshard, consolidate and import succeed through bounded retries, or fail with one StorageError
naming the URL and nothing committed. Plus the retry policy itself."""

from __future__ import annotations

import errno
import random

import pytest

from tests.reliability import _flaky
from tests.reliability._harness import exhausted_retries, flaky_store
from tests.reliability._workload import Workload
from zshard.errors import ConfigError, StorageError
from zshard.store import retry, storage
from zshard.store.retry import RetryPolicy, is_transient


@pytest.fixture(autouse=True)
def _quiet_store():
    yield
    _flaky.configure(_flaky.FaultPlan())


def test_flaky_memory_store_succeeds_through_retries(fast_retries):
    out = flaky_store(runs=6, seed=1, error_rate=0.1)
    assert out.counts["succeeded, bitwise"] == 6, out.counts
    assert out.counts["store faults"] > 50 and out.counts["store faults.after"] > 5


def test_streamed_objects_are_replayed_whole(fast_retries, monkeypatch):
    # Objects larger than the in-memory spool go through open()/write()/close(): a failed
    # upload (close) is replayed from the local spool.
    monkeypatch.setattr(storage, "SPOOL_MEMORY_BYTES", 4096)
    out = flaky_store(runs=3, seed=5, error_rate=0.1)
    assert out.counts["succeeded, bitwise"] == 3, out.counts
    _flaky.configure(_flaky.FaultPlan(error_rate=0.3, seed=9, only={"close", "write"}))
    wl = Workload(2, chunk=1024, rows=40)
    wl.save("flaky://replay/root", 1)
    assert _flaky.STATS["calls.close"] > 4 and _flaky.STATS["faults"] > 0
    _flaky.configure(_flaky.FaultPlan())
    wl.assert_intact("flaky://replay/root", 1)


def test_store_down_fails_cleanly_with_nothing_committed(fast_retries):
    out = exhausted_retries()
    assert out.runs == 4
    assert out.counts["one-line StorageError naming the URL and attempts"] == 4
    assert out.counts["nothing half-committed; earlier checkpoint intact"] == 4


@pytest.mark.s3
def test_flaky_s3_store(s3_bucket, fast_retries):
    out = flaky_store(runs=2, seed=3, error_rate=0.1, target="s3", s3_base=s3_bucket)
    assert out.counts["succeeded, bitwise"] == 2, out.counts
    out = exhausted_retries(target="s3", s3_base=s3_bucket)
    assert out.counts["nothing half-committed; earlier checkpoint intact"] == out.runs == 3


# -- the policy


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "X"
    )


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (TimeoutError("timed out"), True),
        (OSError(errno.EBUSY, "Please reduce your request rate."), True),  # s3fs SlowDown
        (OSError(errno.EREMOTEIO, "InternalError"), True),  # s3fs 500
        (_flaky.ERRORS["503 SlowDown"](), True),
        (_flaky.ERRORS["read timeout"](), True),
        (_flaky.ERRORS["endpoint unreachable"](), True),
        (_client_error("InternalError", 500), True),
        (_client_error("ThrottlingException", 400), True),
        (_client_error("", 503), True),
        (_client_error("AccessDenied", 403), False),
        (_client_error("NoSuchKey", 404), False),
        (_client_error("PreconditionFailed", 412), False),
        (FileNotFoundError("nope"), False),
        (FileExistsError("exists"), False),
        (PermissionError("no"), False),
        (OSError(errno.ENOSPC, "full"), False),
        (ValueError("bad"), False),
        (KeyError("x"), False),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else str(x),
)
def test_what_is_retried(exc, transient):
    assert is_transient(exc) is transient


def test_bounded_attempts_and_backoff():
    sleeps: list[float] = []
    calls = []

    def always_fails():
        calls.append(1)
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    policy = RetryPolicy(attempts=4, base_s=0.1, cap_s=0.25)
    with pytest.raises(ConnectionResetError) as info:
        retry.call(always_fails, "x", policy, sleep=sleeps.append)
    assert len(calls) == 4 and len(sleeps) == 3
    assert retry.attempts_made(info.value) == 4
    assert 0 <= sleeps[0] <= 0.1 and 0 <= sleeps[1] <= 0.2 and 0 <= sleeps[2] <= 0.25
    # A permanent error is not retried.
    calls.clear()

    def missing():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        retry.call(missing, "x", policy, sleep=sleeps.append)
    assert len(calls) == 1
    # Success after transient failures returns the value.
    seq = iter([TimeoutError(), TimeoutError(), "ok"])

    def flaky():
        v = next(seq)
        if isinstance(v, Exception):
            raise v
        return v

    assert retry.call(flaky, "x", policy, sleep=lambda s: None) == "ok"


def test_jitter_spreads_retries():
    p = RetryPolicy(attempts=5, base_s=0.2, cap_s=5)
    rng = random.Random(0)
    draws = [p.backoff(3, rng) for _ in range(200)]
    assert 0 <= min(draws) < 0.1 and 0.7 < max(draws) <= 0.8


def test_policy_from_env(monkeypatch):
    monkeypatch.setenv("ZSHARD_RETRIES", "3")
    monkeypatch.setenv("ZSHARD_RETRY_BASE_S", "0.5")
    assert RetryPolicy.from_env() == RetryPolicy(attempts=3, base_s=0.5)
    monkeypatch.delenv("ZSHARD_RETRIES")
    monkeypatch.delenv("ZSHARD_RETRY_BASE_S")
    assert RetryPolicy.from_env() == RetryPolicy(attempts=5, base_s=0.2, cap_s=5.0)
    for bad in ("0", "many", "-1"):
        monkeypatch.setenv("ZSHARD_RETRIES", bad)
        with pytest.raises(ConfigError, match="ZSHARD_RETRIES"):
            RetryPolicy.from_env()


def test_exhausted_message_is_one_line_naming_url_and_attempts(fast_retries):
    _flaky.configure(_flaky.FaultPlan(always={"cat_file"}))
    s = storage.open_storage("flaky://down/x")
    with pytest.raises(StorageError) as info:
        s.read("manifest.json")
    msg = str(info.value)
    assert msg.startswith("flaky://down/x/manifest.json: gave up after 5 attempts")
    assert "\n" not in msg
