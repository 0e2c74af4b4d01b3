"""Async saves do not stall training, deterministically: with every shard write of the storage
held shut, ``save()`` still returns (so the training thread never waited for a write), its stall
is a small fraction of a synchronous save through the same slow storage, and the checkpoint holds
the state of its own step. Also: the files a stage-3 checkpoint's rank writes do not grow with
the number of modules, and each save reports its stall and snapshot time."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import zshard.train as zt
from zshard.store.reader import CheckpointReader
from zshard.store.storage import LocalStream

try:
    from tests.train import _engine_cases as cases
except ModuleNotFoundError:  # tests/train is not a package: pytest put it on sys.path
    import _engine_cases as cases  # type: ignore[no-redef]

DELAY_S = 0.05  # per shard write reaching the slow storage
STALL_FRACTION = 0.10


class SlowShards:
    """Every positional write of a checkpoint shard (``c.<rank>``) first waits for ``gate``, then
    sleeps ``DELAY_S``: the storage, not the engine, sets the pace of a save."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.writing = threading.Event()
        self.writes = 0
        self.threads: set[str] = set()
        real = LocalStream.pwrite

        def pwrite(stream: LocalStream, offset: int, data: Any) -> None:
            if "/c." in stream._final:
                self.writing.set()
                self.threads.add(threading.current_thread().name)
                if not self.gate.wait(timeout=60):
                    raise TimeoutError("the test never opened the storage")
                time.sleep(DELAY_S)
                self.writes += 1
            real(stream, offset, data)

        monkeypatch.setattr(LocalStream, "pwrite", pwrite)


def test_async_save_never_waits_for_the_storage(tmp_path: Path, monkeypatch) -> None:
    slow = SlowShards(monkeypatch)
    sync = zt.initialize(
        cases.make_model(), cases.config(0, checkpoint={"dir": str(tmp_path / "s")})
    )
    cases.train(sync, range(2))
    t0 = time.perf_counter()
    sync.save()
    sync_s = time.perf_counter() - t0
    assert slow.writes >= 4 and sync_s >= slow.writes * DELAY_S  # the storage sets the pace
    assert sync.checkpointer.last_save["async"] is False
    sync.close()

    root = tmp_path / "a"
    engine = zt.initialize(
        cases.make_model(), cases.config(0, checkpoint={"dir": str(root), "async": True})
    )
    cases.train(engine, range(2))
    expected = {k: v.clone() for k, v in cases.full_params(engine).items()}
    slow.gate.clear()  # from here every shard write blocks until the test opens the gate
    slow.writing.clear()
    slow.threads.clear()
    url = engine.save()  # returns although no shard byte can be written: no wait on writes
    last = dict(engine.checkpointer.last_save)
    assert slow.writing.wait(timeout=30)  # the writer thread reached the storage, and waits
    assert threading.main_thread().name not in slow.threads
    cases.train(engine, range(2, 3))  # a whole step while the save cannot progress
    assert not (root / "step-00000002" / "manifest.json").exists()
    slow.gate.set()
    engine.wait_for_save()
    assert last["async"] is True and last["step"] == 2
    assert 0 < last["snapshot_s"] <= last["stall_s"] == engine.last_save_stall_s
    assert last["stall_s"] <= STALL_FRACTION * sync_s, (last, sync_s)
    # The checkpoint is the state at its own step, not what the overlapping step made of it.
    fresh = zt.initialize(cases.make_model(), cases.config(0))
    fresh.load(url)
    got = cases.full_params(fresh)
    for name, want in expected.items():
        assert torch.equal(got[name], want), name
    fresh.close()

    # The next async save reuses the host buffers of the first (no fresh pages to fault in).
    before = {k: t.data_ptr() for k, t in engine.checkpointer._copies._bufs.items()}
    engine.save()
    engine.wait_for_save()
    after = {k: t.data_ptr() for k, t in engine.checkpointer._copies._bufs.items()}
    assert before and before == after
    engine.close()


@pytest.mark.parametrize("stage", [1, 3])
def test_files_per_rank_do_not_grow_with_the_modules(tmp_path: Path, stage: int) -> None:
    """The built-in GPT at 1 and 6 layers: stage 3 has a flat group per module, yet each rank
    writes as many files as at stage 1 (one shard per state kind, and its rank state)."""
    from zshard.train.models.gpt import GPT, GPTConfig

    counts, groups = {}, {}
    for layers in (1, 6):
        gcfg = GPTConfig(vocab_size=32, seq_len=8, n_layer=layers, n_head=2, d_model=16)
        cfg = {"zero": {"stage": stage}, "train": {"seed": 7, "micro_batch_size": 2}}
        engine = zt.initialize(None, cfg, model_factory=lambda gcfg=gcfg: GPT(gcfg))
        x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
        engine.backward(engine(x, x))
        engine.step()
        root = tmp_path / f"s{stage}-l{layers}"
        url = engine.save(str(root))
        engine.close()
        step = Path(url)
        files = [p for p in step.rglob("*") if p.is_file()]
        per_rank = [p for p in files if p.name.startswith(("c.", "rank-"))]
        counts[layers] = len(per_rank)
        groups[layers] = len(CheckpointReader.open(url).manifest.layout.groups)
        # param, exp_avg, exp_avg_sq (fp32 AdamW), buffers if any, and the rank state
        kinds = {t.kind for t in CheckpointReader.open(url).manifest.tensors}
        assert counts[layers] == len(kinds) + 1, sorted(p.name for p in per_rank)
    if stage == 3:
        assert groups[6] > groups[1] + 4  # many more flat groups ...
    assert counts[6] == counts[1]  # ... and not one file more
