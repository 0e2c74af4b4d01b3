"""Offload in real gloo processes: world sizes 2 and 3 (uneven partitions), swap on a local
directory, on ``memory://`` (per process: each rank has its own files, as it must) and on S3
(moto on 127.0.0.1, reached by the ranks through ``FSSPEC_S3_ENDPOINT_URL``); a checkpoint saved
with offload at world size 2 resumes at world size 3 with offload."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import zshard.train as zt
from tests.harness import AWS_DUMMY, new_bucket, run_ranks

try:
    from tests.train import _engine_cases as cases
    from tests.train.test_offload import max_diff, offload_zero
except ModuleNotFoundError:  # tests/train is not a package: pytest put it on sys.path
    import _engine_cases as cases  # type: ignore[no-redef]
    from test_offload import max_diff, offload_zero  # type: ignore[no-redef]

pytestmark = pytest.mark.slow
STEPS = 4


def _run(cfg: dict[str, Any], steps: range) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    engine = zt.initialize(cases.make_model(), cfg)
    cases.train(engine, steps)
    out, report = cases.full_params(engine), engine.memory_report()
    engine.close()
    return out, report


def _left_behind(path: str, rank: int) -> list[str]:
    return [
        os.path.join(d, n) for d, dirs, _ in os.walk(path) for n in dirs if n == f"rank-{rank:05d}"
    ]


def check_parity(rank: int, world_size: int, tmp: str, s3: str | None) -> dict[str, Any]:
    """Max |offload - in memory| after STEPS steps, per (stage, swap location)."""
    out: dict[str, Any] = {}
    places = [
        ("local", "nvme", f"{tmp}/swap"),
        ("memory", "nvme", "memory://swap"),
        ("cpu", "cpu", None),
    ]
    for stage in (1, 2, 3):
        base, mem = _run(cases.config(stage), range(STEPS))
        for label, device, path in places:
            if label == "cpu" and stage != 2:
                continue
            got, rep = _run(
                cases.config(stage, zero=offload_zero(stage, device, path)), range(STEPS)
            )
            out[f"stage{stage}_{label}"] = max_diff(got, base)
            out[f"stage{stage}_{label}_optimizer_bytes"] = rep["master"] + rep["optimizer"]
            out[f"stage{stage}_{label}_offloaded"] = rep["offloaded"] >= mem["optimizer"]
    if s3 is not None:
        base, _ = _run(cases.config(2, precision="bf16"), range(STEPS))
        z = offload_zero(2, "nvme", f"{s3}/swap", sub=9)
        got, _ = _run(cases.config(2, precision="bf16", zero=z), range(STEPS))
        out["stage2_s3_bf16"] = max_diff(got, base)
    out["left_behind"] = _left_behind(f"{tmp}/swap", rank)
    return out


def check_save(rank: int, world_size: int, tmp: str, root: str) -> dict[str, Any]:
    """World size 2, stage 2, optimizer offloaded to a local directory: 3 steps, then save."""
    z = offload_zero(2, "nvme", f"{tmp}/swap", sub=11)
    engine = zt.initialize(cases.make_model(), cases.config(2, zero=z))
    cases.train(engine, range(3))
    url = engine.save(root, extra={"data_position": 3})
    engine.close()
    return {"url": url}


def check_resume(rank: int, world_size: int, tmp: str, root: str) -> dict[str, Any]:
    """World size 3, stage 3, optimizer and parameters offloaded to memory://: load the world
    size 2 checkpoint, finish the run; compare with the same resume without offload."""
    ends = {}
    for label, zero in (
        ("offload", offload_zero(3, "nvme", "memory://resume", sub=5)),
        ("memory", cases.config(3)["zero"]),
    ):
        engine = zt.initialize(None, cases.config(3, zero=zero), model_factory=cases.TinyNet)
        extra = engine.load(root)
        assert engine.global_step == 3 and extra == {"data_position": 3}
        cases.train(engine, range(3, 5))
        ends[label] = cases.full_params(engine)
        engine.close()
    return {
        "same_as_in_memory": max_diff(ends["offload"], ends["memory"]),
        "vs_reference": cases.rel_err(ends["offload"], cases.reference(5, cases.adamw)),
    }


def run_all(rank: int, world_size: int, checks: dict[str, tuple[Any, ...]]) -> dict[str, Any]:
    """Several checks in one process group: ``{check name: its extra arguments}``."""
    return {name: globals()[name](rank, world_size, *args) for name, args in checks.items()}


@pytest.fixture(scope="module")
def s3_url(moto_endpoint: str) -> Iterator[str]:
    """A fresh bucket, and the environment the spawned ranks inherit to reach it."""
    url = new_bucket(moto_endpoint, prefix="zshard-offload")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in AWS_DUMMY.items():
            mp.setenv(key, value)
        mp.setenv("FSSPEC_S3_ENDPOINT_URL", moto_endpoint)
        yield url


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return str(tmp_path_factory.mktemp("offload")), str(tmp_path_factory.mktemp("offload-ckpt"))


@pytest.fixture(scope="module")
def ws2(dirs: tuple[str, str], s3_url: str) -> list[dict[str, Any]]:
    tmp, root = dirs
    checks = {"check_parity": (tmp, s3_url), "check_save": (tmp, root)}
    return run_ranks(run_all, 2, (checks,), timeout=240)


@pytest.fixture(scope="module")
def ws3(dirs: tuple[str, str], ws2: list[dict[str, Any]]) -> list[dict[str, Any]]:
    tmp, root = dirs
    checks = {"check_parity": (tmp, None), "check_resume": (tmp, root)}
    return run_ranks(run_all, 3, (checks,), timeout=240)


@pytest.mark.s3
def test_offload_parity_world_size_2(ws2: list[dict[str, Any]]) -> None:
    """Stages 1-3 (3 also offloads parameters) on a local directory and memory://, stage 2 on
    host memory, stage 2 bf16 on S3: the same parameters as without offload."""
    for rank, out in enumerate(ws2):
        p = out["check_parity"]
        for key in (
            "stage1_local",
            "stage1_memory",
            "stage2_local",
            "stage2_memory",
            "stage2_cpu",
            "stage3_local",
            "stage3_memory",
            "stage2_s3_bf16",
        ):
            assert p[key] <= 1e-7, (rank, key, p[key])
        for key in [k for k in p if k.endswith("_optimizer_bytes")]:
            assert p[key] == 0, (rank, key)
        assert all(p[k] for k in p if k.endswith("_offloaded")), (rank, p)
        assert p["left_behind"] == [], p["left_behind"]


def test_offload_parity_world_size_3(ws3: list[dict[str, Any]]) -> None:
    for rank, out in enumerate(ws3):
        p = out["check_parity"]
        for key in [k for k in p if k.startswith("stage") and isinstance(p[k], float)]:
            assert p[key] <= 1e-7, (rank, key, p[key])
        assert p["left_behind"] == []


def test_offloaded_checkpoint_resumes_at_another_world_size(ws3: list[dict[str, Any]]) -> None:
    """Saved at world size 2 (stage 2, optimizer swapped to disk) and resumed at world size 3
    (stage 3, everything swapped to memory://): as the in-memory resume, and as plain torch."""
    for out in ws3:
        r = out["check_resume"]
        assert r["same_as_in_memory"] == 0.0
        assert r["vs_reference"] < 1e-5
