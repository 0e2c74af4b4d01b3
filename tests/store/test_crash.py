"""Crash consistency: a writer process killed with SIGKILL at random points while saving.

A subprocess saves step 1, then saves step 2 over and over (overwrite) until it is killed. After
every kill, step 1 must load bitwise and verify; step 2 must be invisible or fully committed and
verifiable; and a fresh save of step 2 must succeed.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.harness import REPO
from zshard.store import layout
from zshard.store.layout import Layout, pack
from zshard.store.manifest import MANIFEST_KEY, ArrayEntry, TensorEntry
from zshard.store.reader import CheckpointReader
from zshard.store.root import committed_steps, resolve, step_dir_name
from zshard.store.storage import open_storage
from zshard.store.verify import verify
from zshard.store.writer import CheckpointWriter

WORLD = 3
KINDS = ("param", "exp_avg")
CHUNK = 4096  # elements: 16 KiB chunks, ~30 per shard, so kills land between chunks too
KILLS = 12


def expected(step: int) -> dict[str, np.ndarray]:
    """~1.6 MB per kind, deterministic per step."""
    rng = np.random.default_rng(step)
    return {
        "w": rng.standard_normal((301, 997), dtype=np.float32),
        "b": rng.standard_normal(1009, dtype=np.float32),
        "s": np.float32(step).reshape(()),
    }


def _kind_values(a: np.ndarray, kind: str) -> np.ndarray:
    return a if kind == "param" else a * np.float32(0.5)


def save(root: str, step: int, overwrite: bool = False) -> None:
    """One complete single-process save (all ranks' shards, then the commit)."""
    layout.TARGET_CHUNK_NUMEL = CHUNK
    data = expected(step)
    g, frags = pack("g0000", [(n, a.size) for n, a in data.items()], WORLD)
    arrays = [ArrayEntry(g.name, k, "float32") for k in KINDS]
    tensors = [
        TensorEntry(n, k, a.shape, "float32", tuple(frags[n]))
        for k in KINDS
        for n, a in data.items()
    ]
    w = CheckpointWriter(root, step, Layout(WORLD, 1, (g,)), arrays, tensors, overwrite=overwrite)
    w.prepare()
    for k in KINDS:
        flat = np.zeros(g.partition_numel * WORLD, dtype=np.float32)
        for n, a in data.items():
            values = _kind_values(a, k).reshape(-1)
            for f in frags[n]:
                flat[f.offset : f.offset + f.length] = values[f.start : f.start + f.length]
        for rank in range(WORLD):
            lo, hi = g.partition_range(rank)
            w.write_shard(g.name, k, flat[lo:hi], rank)
    for rank in range(WORLD):
        w.write_rank_state({"rank": rank, "step": step}, rank)
    w.commit({"step": step})


def writer_main(root: str) -> None:
    """The subprocess: save step 1 if needed, report, then save step 2 until killed."""
    seconds = 0.0
    if not open_storage(root).exists(f"{step_dir_name(1)}/{MANIFEST_KEY}"):
        t0 = time.perf_counter()
        save(root, 1)
        seconds = time.perf_counter() - t0
    print(f"ready {seconds:.4f}", flush=True)
    while True:
        save(root, 2, overwrite=True)


def assert_intact(url: str, step: int) -> None:
    reader = CheckpointReader.open(url)
    assert reader.manifest.step == step and reader.manifest.state == {"step": step}
    for k in KINDS:
        for n, a in expected(step).items():
            got = reader.read_tensor(n, k)
            assert got.shape == a.shape
            assert got.tobytes() == _kind_values(a, k).tobytes(), (url, n, k)
    for rank in range(WORLD):
        assert reader.read_rank_state(rank) == {"rank": rank, "step": step}
    report = verify(url, all_faults=True)
    assert report.ok, report.faults


@pytest.mark.slow
def test_sigkill_at_random_points_never_corrupts(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "TARGET_CHUNK_NUMEL", CHUNK)
    root = str(tmp_path / "ckpt")
    step1, step2 = os.path.join(root, step_dir_name(1)), os.path.join(root, step_dir_name(2))
    code = (
        f"import sys; sys.path.insert(0, {REPO!r}); "
        f"from tests.store.test_crash import writer_main; writer_main({root!r})"
    )
    rng = random.Random(1234)
    period = None
    outcomes = {"committed": 0, "partial": 0, "absent": 0}
    t_start = time.monotonic()
    for i in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = proc.stdout.readline()
            assert line.startswith("ready"), (line, proc.stderr.read() if proc.poll() else "")
            if period is None:
                period = max(float(line.split()[1]), 0.02)
            # Stratified delays over ~1.5 saves: early (un-commit, clearing), mid-shards, commit.
            time.sleep((i + rng.random()) / KILLS * 1.5 * period)
            assert proc.poll() is None, proc.stderr.read()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL

        # Step 1 survives every kill, bitwise and verified.
        assert_intact(step1, 1)
        steps = [s for s, _ in committed_steps(open_storage(root))]
        assert steps in ([1], [1, 2])
        if steps == [1, 2]:
            outcomes["committed"] += 1
            assert_intact(step2, 2)
            assert resolve(root).name == step_dir_name(2)
        else:
            outcomes["partial" if os.path.isdir(step2) else "absent"] += 1
            # The dead save is invisible: the root resolves to step 1 whatever `latest` says.
            assert resolve(root).name == step_dir_name(1)
            assert_intact(root, 1)
        # A fresh save of step 2 succeeds and is complete.
        save(root, 2, overwrite=True)
        assert_intact(step2, 2)
        assert [s for s, _ in committed_steps(open_storage(root))] == [1, 2]
    # The kills did land mid-write (a dead save left an uncommitted step 2 behind).
    assert outcomes["partial"] >= 1, outcomes
    assert time.monotonic() - t_start < 30
