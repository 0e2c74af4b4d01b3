"""Fixtures of the fault-injection suite: loopback-only networking, fast retries, S3 helpers."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.conftest import _loopback


@pytest.fixture(autouse=True)
def _reliability_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Like the store tests: any in-process connection outside 127.0.0.0/8 fails the test."""
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: object) -> None:
        if not _loopback(address):
            raise AssertionError(f"test tried to reach {address!r}; only 127.0.0.0/8 is allowed")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Retries with millisecond backoff: the policy under test, without the waiting."""
    monkeypatch.setenv("ZSHARD_RETRIES", "5")
    monkeypatch.setenv("ZSHARD_RETRY_BASE_S", "0.001")
    yield
