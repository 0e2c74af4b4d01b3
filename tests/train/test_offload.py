"""Offload in one process (world size 1): parity with the in-memory engine, memory accounting,
swap directories (fresh per run, removed at exit, stale ones swept), start-up checks, I/O faults
mid-run, and checkpoints copied shard to shard. Multi-process runs: test_offload_dist.py."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

import zshard.train as zt
from zshard.errors import CorruptDataError, StorageError
from zshard.store.root import committed_steps
from zshard.store.storage import open_storage
from zshard.store.verify import verify
from zshard.train.offload import OffloadError, _swap
from zshard.train.run import preflight

try:
    from tests.train import _engine_cases as cases
except ModuleNotFoundError:  # tests/train is not a package: pytest put it on sys.path
    import _engine_cases as cases  # type: ignore[no-redef]

STEPS = 5


def offload_zero(
    stage: int,
    where: str,
    path: str | None = None,
    *,
    params: bool | None = None,
    sub: int = 7,
    buffers: int = 2,
) -> dict[str, Any]:
    """``zero`` section of the engine tests' config with offload on ``where`` (cpu/nvme)."""
    block: dict[str, Any] = {"device": where, "buffer_count": buffers}
    if path is not None:
        block["path"] = path
    z: dict[str, Any] = {
        "stage": stage,
        "reduce_bucket_size": 50,
        "allgather_bucket_size": 20,
        "param_persistence_threshold": 20,
        "offload_optimizer": {**block, "sub_group_size": sub},
    }
    if params if params is not None else stage == 3:
        z["offload_param"] = block
    return z


def swap_url(where: str, tmp: Any) -> tuple[str, str | None]:
    """(device, path) for a parametrised location: host memory, a local directory, memory://."""
    if where == "cpu":
        return "cpu", None
    if where == "local":
        return "nvme", str(tmp / "swap")
    return "nvme", f"memory://zshard-offload-{os.getpid()}-{time.monotonic_ns()}"


def trained(cfg: dict[str, Any], steps: int = STEPS) -> tuple[dict[str, torch.Tensor], dict]:
    engine = zt.initialize(cases.make_model(), cfg)
    cases.train(engine, range(steps))
    out, report = cases.full_params(engine), engine.memory_report()
    engine.close()
    return out, report


@functools.cache
def baseline(stage: int, precision: str) -> dict[str, torch.Tensor]:
    return trained(cases.config(stage, precision=precision))[0]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


# -- parity and memory ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["cpu", "local", "memory"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_trains_bitwise_like_memory(
    tmp_path: Any, stage: int, precision: str, where: str
) -> None:
    """Sub-groups of 7 elements through 2 slots: the streamed step is the same arithmetic."""
    device, path = swap_url(where, tmp_path)
    got, report = trained(
        cases.config(stage, precision=precision, zero=offload_zero(stage, device, path))
    )
    assert max_diff(got, baseline(stage, precision)) == 0.0
    assert report["offloaded"] > 0 and report["master"] == report["optimizer"] == 0
    if path is not None and "://" not in path:
        assert os.listdir(path) == [], "swap directory left behind"


@pytest.mark.parametrize("params_only", [True, False])
def test_parameter_offload_alone_and_prefetch_cache(tmp_path: Any, params_only: bool) -> None:
    """Stage 3 parameter offload without optimizer offload (fp32: the master is the offloaded
    partition itself), and with a cache that keeps fetched partitions."""
    z = offload_zero(3, "nvme", str(tmp_path / "swap"), buffers=1)
    if params_only:
        del z["offload_optimizer"]
    else:
        z["offload_param"]["max_in_memory"] = 40
    for precision in ("fp32", "bf16"):
        got, report = trained(cases.config(3, precision=precision, zero=z))
        assert max_diff(got, baseline(3, precision)) == 0.0
        assert report["offloaded"] > 0


def test_memory_report_counts_offloaded_bytes(tmp_path: Any) -> None:
    """bf16 AdamW: master + exp_avg + exp_avg_sq (12 bytes per element of the partition) leave
    the rank; what stays is the slots: buffer_count x sub_group_size elements per kind."""
    sub, buffers = 64, 2
    for stage in (1, 2, 3):
        base = trained(cases.config(stage, precision="bf16"), steps=1)[1]
        z = offload_zero(stage, "nvme", str(tmp_path / "swap"), sub=sub, buffers=buffers)
        off = trained(cases.config(stage, precision="bf16", zero=z), steps=1)[1]
        assert off["master"] == off["optimizer"] == 0
        moved = base["master"] + base["optimizer"]
        if stage == 3:
            moved += base["params"] - off["params"]  # partitions of non-persistent modules
            assert off["params"] < base["params"]
        assert off["offloaded"] == moved
        kinds_bytes = 4 * 3 + (2 if stage == 3 else 0)  # fp32 master + 2 states, bf16 param
        assert 0 < off["offload_buffers"] <= buffers * sub * kinds_bytes
        assert off["total"] == base["total"] - moved + off["offload_buffers"]


def test_gathered_parameter_edits_reach_offloaded_master(tmp_path: Any) -> None:
    sgd = {"name": "sgd", "lr": 1e-9}
    for stage in (1, 3):
        z = offload_zero(stage, "nvme", str(tmp_path / "swap"))
        engine = zt.initialize(
            cases.make_model(), cases.config(stage, precision="bf16", zero=z, optimizer=sgd)
        )
        with engine.gathered_parameters(), torch.no_grad():
            engine.module.block.up.weight.fill_(0.5)
        cases.train(engine, range(1))
        assert bool((cases.full_params(engine)["block.up.weight"] == 0.5).all()), stage
        engine.close()


# -- swap directories ------------------------------------------------------------------------------


def test_swap_directory_per_run_and_rank_removed_at_close(tmp_path: Any) -> None:
    swap = tmp_path / "swap"
    engine = zt.initialize(
        cases.make_model(), cases.config(3, zero=offload_zero(3, "nvme", str(swap)))
    )
    (run,) = os.listdir(swap)
    assert re.fullmatch(r"zshard-swap-\d{8}T\d{6}-[0-9a-f]{8}", run)
    rank_dir = swap / run / "rank-00000"
    owner = json.loads((rank_dir / "owner.json").read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    # Store-format shards, one per (flat group, kind): here block.up's exp_avg.
    assert (rank_dir / "block.up" / "exp_avg").is_file()
    assert (rank_dir / "block.up" / "param").is_file()
    engine.close()
    assert os.listdir(swap) == []


def _owner_dir(root: Any, run: str, owner: dict[str, Any]) -> Any:
    d = root / run / "rank-00000"
    d.mkdir(parents=True)
    (d / "owner.json").write_text(json.dumps(owner))
    (d / "params").mkdir()
    (d / "params" / "exp_avg").write_bytes(b"x" * 10)
    return d


def test_stale_swap_directories_are_swept_live_ones_kept(tmp_path: Any) -> None:
    swap = tmp_path / "swap"
    host, now = socket.gethostname(), time.time()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = _swap.owner_record("x", 0)
    runs = {
        "dead_pid": {"host": host, "pid": dead.pid, "heartbeat": now},
        "reused_pid": {**me, "process_start": me["process_start"] - 1000},
        "live_here": {**me, "heartbeat": now - 10 * _swap.STALE_AFTER_S},  # alive: kept
        "silent_elsewhere": {"host": "other-host", "pid": 1, "heartbeat": now - 3600},
        "fresh_elsewhere": {"host": "other-host", "pid": 1, "heartbeat": now - 5},
    }
    dirs = {}
    for i, (label, owner) in enumerate(runs.items()):
        dirs[label] = _owner_dir(swap, f"zshard-swap-20240101T00000{i}-0000000{i}", owner)
    unrelated = swap / "my-data"
    unrelated.mkdir()
    (unrelated / "rank-00000").mkdir()
    (unrelated / "rank-00000" / "owner.json").write_text(json.dumps(runs["dead_pid"]))
    engine = zt.initialize(
        cases.make_model(), cases.config(1, zero=offload_zero(1, "nvme", str(swap)))
    )
    engine.close()
    gone = {label for label, d in dirs.items() if not d.exists()}
    assert gone == {"dead_pid", "reused_pid", "silent_elsewhere"}
    assert not dirs["dead_pid"].parent.exists(), "empty run directory left"
    assert unrelated.exists(), "a directory zshard did not create was touched"


# -- bad input before training ---------------------------------------------------------------------


def _gpt_cfg(path: str) -> Any:
    return zt.load_config(
        {
            "model": {"name": "gpt", "args": {"n_layer": 1, "d_model": 16, "n_head": 2}},
            "zero": {"stage": 2, "offload_optimizer": {"device": "nvme", "path": path}},
        }
    )


def _one_line_error(fn: Any, *patterns: str) -> str:
    with pytest.raises(StorageError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in patterns:
        assert re.search(p, msg), (p, msg)
    return msg


def test_unwritable_path_fails_before_training(tmp_path: Any) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    bad = str(blocker / "swap")
    pattern = r"zero\.offload_optimizer\.path .*file/swap: not usable as swap space"
    _one_line_error(lambda: preflight(_gpt_cfg(bad), 2), pattern)
    z = offload_zero(1, "nvme", bad)
    _one_line_error(lambda: zt.initialize(cases.make_model(), cases.config(1, zero=z)), pattern)


def test_not_enough_space_fails_before_training(tmp_path: Any, monkeypatch: Any) -> None:
    import zshard.train.offload._preflight as offload

    real = shutil.disk_usage
    monkeypatch.setattr(offload.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    path = str(tmp_path / "swap")
    _one_line_error(lambda: preflight(_gpt_cfg(path), 2), r"not enough space.*GB free")
    z = offload_zero(1, "nvme", path)
    _one_line_error(
        lambda: zt.initialize(cases.make_model(), cases.config(1, zero=z)), r"not enough space"
    )
    assert not os.listdir(path), "nothing may be left after a failed start"


def test_unreachable_object_store_fails_before_training(monkeypatch: Any) -> None:
    from tests.conftest import _point_fsspec_at
    from tests.harness import free_port

    _point_fsspec_at(monkeypatch, f"http://127.0.0.1:{free_port()}")  # nobody listens there
    monkeypatch.setenv("ZSHARD_RETRIES", "1")
    _one_line_error(
        lambda: preflight(_gpt_cfg("s3://no-such-bucket/swap"), 2),
        r"zero\.offload_optimizer\.path s3://no-such-bucket/swap: not usable as swap space",
    )


# -- faults mid-run and checkpoints ----------------------------------------------------------------


def test_checkpoint_shards_are_byte_copies_of_swap_files(tmp_path: Any) -> None:
    swap, root = tmp_path / "swap", str(tmp_path / "ckpt")
    engine = zt.initialize(
        cases.make_model(),
        cases.config(2, precision="bf16", zero=offload_zero(2, "nvme", str(swap))),
    )
    cases.train(engine, range(2))
    url = engine.save(root)
    (run,) = os.listdir(swap)
    for kind in ("master", "exp_avg", "exp_avg_sq"):
        # One flat group: each kind's shard holds just its partition, in the swap file's geometry.
        with open(os.path.join(url, "data", f"{kind}.float32", "c.0"), "rb") as f:
            saved = f.read()
        assert saved == (swap / run / "rank-00000" / "params" / kind).read_bytes()
    engine.close()
    assert verify(url).faults == []


def test_io_fault_fails_the_step_and_keeps_the_checkpoint(tmp_path: Any) -> None:
    swap, root = tmp_path / "swap", str(tmp_path / "ckpt")
    cfg = cases.config(2, zero=offload_zero(2, "nvme", str(swap)))
    engine = zt.initialize(cases.make_model(), cfg)
    cases.train(engine, range(2))
    url = engine.save(root)
    (run,) = os.listdir(swap)
    os.truncate(swap / run / "rank-00000" / "params" / "exp_avg", 100)  # the disk lost data
    with pytest.raises(OffloadError) as e:
        cases.train(engine, range(2, 3))
    msg = str(e.value)
    assert "params" in msg and "exp_avg" in msg and "restart from the last checkpoint" in msg
    with pytest.raises(OffloadError):
        engine.save(root)
    with pytest.raises(OffloadError):
        cases.train(engine, range(3, 4))
    assert verify(url).faults == []
    # Restart from the last checkpoint: in a new engine, or in this one (load rewrites every
    # offloaded array whole, so its state is consistent again).
    fresh = zt.initialize(cases.make_model(), cases.config(2))
    for e in (fresh, engine):
        e.load(root)
        assert e.global_step == 2
        cases.train(e, range(2, STEPS))
        assert max_diff(cases.full_params(e), baseline(2, "fp32")) == 0.0
        e.close()


def test_write_fault_aborts_new_versions(tmp_path: Any, monkeypatch: Any) -> None:
    swap = tmp_path / "swap"
    engine = zt.initialize(
        cases.make_model(), cases.config(1, zero=offload_zero(1, "nvme", str(swap)))
    )
    cases.train(engine, range(1))
    real = _swap.SwapArray.writer
    calls = []

    def failing(self: _swap.SwapArray) -> Any:
        w = real(self)
        write = w.write

        def flaky(piece: Any) -> None:
            calls.append(1)
            if len(calls) == 3:
                raise StorageError(f"{self.key}: injected EIO")
            write(piece)

        w.write = flaky  # type: ignore[method-assign]
        return w

    monkeypatch.setattr(_swap.SwapArray, "writer", failing)
    with pytest.raises(OffloadError, match="injected EIO"):
        cases.train(engine, range(1, 2))
    leftovers = [n for _, _, files in os.walk(swap) for n in files if ".tmp-" in n]
    assert leftovers == []
    engine.close()
    assert os.listdir(swap) == []


def _flip_last_chunk(url: str, kind: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    (path,) = [p for p in fs.find(url) if p.endswith(f"/params/{kind}")]
    raw = bytearray(fs.cat_file(path))
    raw[-10] ^= 0xFF  # a bit flip inside the last chunk's data
    fs.pipe_file(path, bytes(raw))


def test_memory_swap_saves_across_file_systems_and_catches_corruption(tmp_path: Any) -> None:
    """Swap on memory://, checkpoint on disk: shards stream across file systems with every
    chunk's crc32c checked. A flipped bit in a swap file fails the save (nothing committed) and
    the next step (the engine is then unusable)."""
    url = f"memory://zshard-offload-save-{os.getpid()}"
    root = str(tmp_path / "ckpt")
    engine = zt.initialize(
        cases.make_model(), cases.config(1, precision="bf16", zero=offload_zero(1, "nvme", url))
    )
    cases.train(engine, range(2))
    first = engine.save(root)
    assert verify(first).faults == []
    cases.train(engine, range(2, 3))
    _flip_last_chunk(url, "exp_avg_sq")
    with pytest.raises(CorruptDataError, match="crc32c"):
        engine.save(root)
    assert committed_steps(open_storage(root)) == [(2, "step-00000002")]
    with pytest.raises(OffloadError, match="crc32c"):
        cases.train(engine, range(3, 4))
    engine.close()
