"""One writing run per checkpoint root: the lock refuses a second run with the owner named,
is taken over when stale (dead process on this host, or no heartbeat), heartbeats while held,
detects being taken over, and is released at exit. Local, memory:// and S3 (moto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import snapshot
from tests.harness import REPO
from tests.reliability._harness import _dead_pid, forge_lock, lock_race
from tests.reliability._workload import Workload
from zshard.errors import ZshardError
from zshard.store.lock import HOST, LOCK_KEY, LockInfo, RootLock, RootLockedError, read_lock
from zshard.store.storage import open_storage

HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from zshard.store.lock import RootLock
lock = RootLock({root!r}, run_id="holder", purpose="zshard train held.yaml").acquire()
print("held", flush=True)
sys.stdin.readline()
{exit}
"""


def hold(root: str, env: dict[str, str] | None = None, exit: str = "") -> subprocess.Popen:
    code = HOLDER.format(repo=REPO, root=root, exit=exit)
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def _roots(kind: str, tmp_path, request) -> str:
    if kind == "local":
        return str(tmp_path / "root")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/root"


@pytest.mark.parametrize("kind", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_second_run_is_refused_with_the_owner_named(kind, tmp_path, request, monkeypatch):
    root = _roots(kind, tmp_path, request)
    env = {}
    if kind == "s3":
        env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "FSSPEC_"))}
    p = hold(root, env)
    try:
        with pytest.raises(RootLockedError) as info:
            RootLock(root).acquire()
        msg = str(info.value)
        assert "\n" not in msg
        for words in (root, "run holder", f"host {HOST}", f"pid {p.pid}", "since ",
                      "zshard train held.yaml", "wait for that run", LOCK_KEY):  # fmt: skip
            assert words in msg, (words, msg)
        # A save into the locked root is refused before writing anything.
        before = snapshot(str(tmp_path))
        with pytest.raises(RootLockedError):
            Workload(2).save(root, 1)
        assert snapshot(str(tmp_path)) == before
        # The holder's own run (its workers inherit ZSHARD_RUN_ID) may write.
        monkeypatch.setenv("ZSHARD_RUN_ID", "holder")
        Workload(2).save(root, 1)
        monkeypatch.delenv("ZSHARD_RUN_ID")
    finally:
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(30)
    # Released at exit: the next run takes it without a takeover.
    assert read_lock(open_storage(root)) == (None, None)
    with RootLock(root) as lock:
        assert lock.owned
    assert read_lock(open_storage(root)) == (None, None)


def test_memory_lock_and_reentrance(memory_root, monkeypatch):
    forge_lock(memory_root, pid=os.getppid())  # a live process on this host
    with pytest.raises(RootLockedError, match="run other-run"):
        RootLock(memory_root).acquire()
    open_storage(memory_root).remove_tree(LOCK_KEY)
    with RootLock(memory_root) as outer:
        assert outer.owned
        inner = RootLock(memory_root).acquire()  # same process: re-entrant, not owned
        assert not inner.owned
        inner.release()
        assert read_lock(open_storage(memory_root))[0] is not None
    assert read_lock(open_storage(memory_root)) == (None, None)


def test_stale_locks_are_taken_over(tmp_path, caplog):
    root = str(tmp_path / "root")
    # The owner's process is gone (same host): taken at once.
    forge_lock(root, pid=_dead_pid())
    with RootLock(root) as lock:
        assert lock.owned
    assert "has exited" in caplog.text
    # Another host, no heartbeat for longer than the timeout: taken.
    forge_lock(root, pid=1, host="elsewhere", age_s=1000)
    with RootLock(root, timeout_s=60) as lock:
        assert lock.owned
    assert "no heartbeat for" in caplog.text
    # Another host with a fresh heartbeat: refused (its pid means nothing here).
    forge_lock(root, pid=1, host="elsewhere", age_s=5)
    with pytest.raises(RootLockedError, match="host elsewhere"):
        RootLock(root, timeout_s=60).acquire()
    # A lock that is not zshard's JSON (edited, or from elsewhere) is replaced.
    open_storage(root).write_atomic(LOCK_KEY, b"garbage")
    with RootLock(root) as lock:
        assert lock.owned
    # A process killed holding it leaves it behind; the next run takes it over.
    p = hold(root)
    p.kill()
    p.wait()
    assert read_lock(open_storage(root))[0].pid == p.pid
    with RootLock(root) as lock:
        assert lock.owned


def test_heartbeat_and_loss_detection(tmp_path):
    root = str(tmp_path / "root")
    lock = RootLock(root, timeout_s=0.6).acquire()  # heartbeat every 0.1 s
    try:
        first = read_lock(lock.storage)[0].heartbeat
        time.sleep(0.45)
        info = read_lock(lock.storage)[0]
        assert info.heartbeat > first and info.stale_reason(0.6) is None
        # Someone else takes it (say this run's heartbeats had stalled): the holder notices.
        other = LockInfo(HOST, os.getppid(), "thief", "", time.time(), time.time(), None, "n")
        open_storage(root).write_atomic(LOCK_KEY, other.to_bytes())
        time.sleep(0.35)
        assert lock.lost
    finally:
        lock.release()
    # Not ours any more: release leaves the other run's lock alone.
    assert read_lock(open_storage(root))[0].run_id == "thief"


@pytest.mark.slow
def test_simultaneous_starts_one_winner_local(tmp_path):
    out = lock_race(lambda r: str(tmp_path / f"root{r}"), rounds=3, racers=3, stale=True)
    assert out.counts["exactly one run got the lock"] == 3
    out = lock_race(lambda r: str(tmp_path / f"fresh{r}"), rounds=2, racers=3, stale=False)
    assert out.counts["exactly one run got the lock"] == 2


@pytest.mark.slow
@pytest.mark.s3
def test_simultaneous_starts_one_winner_s3(s3_bucket, moto_endpoint):
    out = lock_race(
        lambda r: f"{s3_bucket}/race{r}", rounds=2, racers=3, s3_endpoint=moto_endpoint,
        label="S3",
    )  # fmt: skip
    assert out.counts["exactly one run got the lock"] == 2


def test_lock_file_is_json_naming_the_owner(tmp_path):
    root = str(tmp_path / "root")
    with RootLock(root, purpose="zshard import x") as lock:
        obj = json.loads((tmp_path / "root" / LOCK_KEY).read_bytes())
        assert obj["host"] == HOST and obj["pid"] == os.getpid()
        assert obj["run_id"] == lock.run_id and obj["purpose"] == "zshard import x"
        assert obj["created"] <= obj["heartbeat"] <= time.time()
    # Released, and the root it had to create is not left behind empty.
    assert not (tmp_path / "root").exists()


def test_lock_errors_are_zshard_errors():
    assert issubclass(RootLockedError, ZshardError)
