"""An async save overlaps training: with the storage slowed down by a delay wrapper, the
training thread's stall stays below a stated fraction of a synchronous save of the same state,
and the next training step runs while the save is provably still writing."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

import zshard.train as zt
from zshard.store.reader import CheckpointReader
from zshard.store.writer import CheckpointWriter

try:
    from tests.train import _engine_cases as cases
except ModuleNotFoundError:  # tests/train is not a package: pytest put it on sys.path
    import _engine_cases as cases  # type: ignore[no-redef]

DELAY_S = 0.15  # per shard written
STALL_FRACTION = 0.25  # an async save may block training for at most this much of a sync one


def _engine(root: Path, async_save: bool) -> zt.Engine:
    cfg = cases.config(2, checkpoint={"dir": str(root), "async": async_save})
    engine = zt.initialize(cases.make_model(), cfg)
    cases.train(engine, range(2))
    return engine


def test_async_save_overlaps_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = CheckpointWriter.write_shard
    gate = threading.Event()
    gate.set()
    writing = threading.Event()
    shards = [0]

    def slow(self: Any, *args: Any, **kw: Any) -> int:
        writing.set()
        if not gate.wait(timeout=60):
            raise TimeoutError("the test never released the storage")
        time.sleep(DELAY_S)
        shards[0] += 1
        return real(self, *args, **kw)

    monkeypatch.setattr(CheckpointWriter, "write_shard", slow)

    sync = _engine(tmp_path / "sync", async_save=False)
    t0 = time.perf_counter()
    sync.save()
    sync_s = time.perf_counter() - t0
    n = shards[0]
    assert n >= 4 and sync_s >= n * DELAY_S  # the delay wrapper is what a sync save waits for
    sync.close()

    engine = _engine(tmp_path / "async", async_save=True)
    gate.clear()  # the storage now blocks until the training step below is done
    writing.clear()
    url = engine.save()
    stall = engine.last_save_stall_s
    assert writing.wait(timeout=30)  # the background writer has started and is held
    cases.train(engine, range(2, 3))  # a whole training step while the save cannot finish
    assert engine.checkpointer._saver._thread is not None  # type: ignore[attr-defined]
    assert engine.checkpointer._saver._thread.is_alive()  # type: ignore[attr-defined]
    gate.set()
    engine.wait_for_save()
    assert stall < STALL_FRACTION * sync_s, (stall, sync_s)
    # The checkpoint holds the state of its own step (taken before the step that overlapped).
    reader = CheckpointReader.open(url)
    assert reader.manifest.step == 2
    fresh = zt.initialize(cases.make_model(), cases.config(0))
    fresh.load(url)
    assert cases.rel_err(cases.full_params(fresh), cases.reference(2, cases.adamw)) < 1e-5
    fresh.close()
    engine.close()
