"""Memory that follows the ZeRO formula: no per-step allocation of large buffers (steady RSS),
the optimizer step in windows (no partition-sized temporaries), stage 3 freeing gathered
parameters in place between forward and backward, and start-up buffers that the engine and
``zshard estimate`` report alike, at the default sizes under ~5% of the model states."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import zshard.train as zt
from tests.harness import run_python_json, run_ranks
from zshard.train.config import load_config
from zshard.train.report._estimate import from_config, per_rank

try:
    from tests.train import _engine_cases as cases
except ModuleNotFoundError:  # tests/train is not a package: pytest put it on sys.path
    import _engine_cases as cases  # type: ignore[no-redef]

STEPS, EARLY = 50, 5
RSS_GROWTH = 0.05


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def check_rss_steady(rank: int, world_size: int) -> dict[int, dict[str, int]]:
    """RSS after window 5 and after window 50, at each stage (tiny model, default buckets)."""
    out = {}
    for stage in range(4):
        cfg = cases.config(
            stage, zero={"stage": stage, "param_persistence_threshold": 100}, precision="bf16"
        )
        engine = zt.initialize(cases.make_model(d=64), cfg)
        early = 0
        for step in range(STEPS):
            cases.train(engine, range(step, step + 1))
            if step + 1 == EARLY:
                early = rss_bytes()
        out[stage] = {"early": early, "late": rss_bytes()}
        engine.close()
    return out


def check_stage3_frees_in_place(rank: int, world_size: int) -> dict[str, Any]:
    """Between forward and backward, every gathered module's full storage is 0 bytes although
    autograd keeps views of it; backward re-gathers into the same storage and trains exactly."""
    engine = zt.initialize(cases.make_model(), cases.config(3))
    s3 = engine._stage3
    assert s3 is not None
    out: dict[str, Any] = {"held": [], "released": []}
    for step in range(3):
        for micro in range(engine.grad_accum):
            loss = engine(*cases.micro_batch(step, micro, rank, world_size))
            # Forward done, graph alive: the non-persistent groups' storages are released.
            storages = {
                g.name: s3._full[g.name].untyped_storage()
                for g in engine.groups
                if not g.persistent and g.name in s3._full
            }
            out["released"].append(sum(s.nbytes() for s in storages.values()))
            out["held"].append(len(storages))
            engine.backward(loss)
        engine.step()
    cases.train(engine, range(3, 5))
    out["err"] = cases.rel_err(cases.full_params(engine), cases.reference(5, cases.adamw))
    engine.close()
    return out


def check_buffers(rank: int, world_size: int) -> dict[int, dict[str, int]]:
    """memory_report's buffers of the built-in GPT at each stage, to compare with the estimate."""
    import torch.distributed as dist

    from zshard.train.models import make_model

    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    out = {}
    for stage in range(4):
        cfg = load_config(_gpt_config(stage))
        args = dict(cfg.model.args, seq_len=cfg.data.seq_len)
        engine = zt.initialize(None, cfg, model_factory=lambda a=args: make_model("gpt", **a).model)
        report = engine.memory_report()
        out[stage] = {k: report[k] for k in ("comm_buffers", "update_scratch", "total")}
        engine.close()
    return out


def _gpt_config(stage: int) -> dict[str, Any]:
    return {
        "model": {"name": "gpt", "args": {"n_layer": 2, "n_head": 2, "d_model": 64}},
        "data": {"seq_len": 16},
        "precision": "bf16",
        "zero": {
            "stage": stage,
            "reduce_bucket_size": 5000,
            "allgather_bucket_size": 3000,
            "param_persistence_threshold": 0,  # every module gathered: the estimate's largest
        },
        "train": {"micro_batch_size": 2},
        "dist": {"backend": "gloo", "device": "cpu"},
    }


def run_all(rank: int, world_size: int, checks: list[str]) -> dict[str, Any]:
    return {name: globals()[name](rank, world_size) for name in checks}


@pytest.fixture(scope="module")
def ws2() -> list[dict[str, Any]]:
    checks = ["check_rss_steady", "check_stage3_frees_in_place", "check_buffers"]
    return run_ranks(run_all, 2, (checks,), timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_rss_steady_over_50_steps(ws2: list[dict[str, Any]], stage: int) -> None:
    for rank, out in enumerate(ws2):
        r = out["check_rss_steady"][stage]
        growth = (r["late"] - r["early"]) / r["early"]
        assert growth < RSS_GROWTH, (rank, stage, r, f"{growth:.1%}")


@pytest.mark.slow
def test_stage3_frees_gathered_parameters_in_place(ws2: list[dict[str, Any]]) -> None:
    for out in ws2:
        r = out["check_stage3_frees_in_place"]
        assert min(r["held"]) >= 3  # emb, block.up, block.down (block.ln: 32 >= 20 elements too)
        assert r["released"] == [0] * len(r["released"])
        assert r["err"] < 1e-5


@pytest.mark.slow
def test_buffers_reported_as_estimated(ws2: list[dict[str, Any]]) -> None:
    """The engine's staging slots and scratch equal the estimate's (gloo: all-reduce mode)."""
    for out in ws2:
        for stage, report in out["check_buffers"].items():
            est = per_rank(from_config(load_config(_gpt_config(stage)), 2), stage).buffers
            staged = est.get("reduce_bucket", 0) + est.get("allgather_bucket", 0)
            staged += est.get("module_grad", 0)
            assert report["update_scratch"] == est["update_scratch"], (stage, report, est)
            assert report["comm_buffers"] == staged, (stage, report, est)
            # Stage 2 stages gradient buckets; gloo's stage 3 all-reduces each gradient where
            # autograd left it, stages 0-1 reduce in place.
            assert (stage == 2) == (report["comm_buffers"] > 0)


def test_default_buffers_under_5_percent_of_model_states() -> None:
    """The benchmark's 57M GPT on 2 gloo ranks, fp32, default bucket sizes."""
    cfg = load_config(
        {
            "model": {"name": "gpt", "args": {"n_layer": 8, "n_head": 12, "d_model": 768}},
            "data": {"seq_len": 128},
            "precision": "fp32",
            "dist": {"backend": "gloo", "device": "cpu"},
        }
    )
    inp = from_config(cfg, 2)
    for stage in range(4):
        s = per_rank(inp, stage)
        staging = sum(v for k, v in s.buffers.items() if k not in ("gathered_modules",))
        staging -= s.buffers.get("persistent_modules", 0)
        assert staging <= 0.05 * s.model_states, (stage, s.buffers, s.model_states)


class _Wide(nn.Module):
    """Two million parameters: partitions far larger than the update window."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(1000, 2000)
        self.b = nn.Linear(2000, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).float().sum()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_optimizer_step_allocates_no_partition_sized_temporary(stage: int) -> None:
    optimizers = [
        {"name": "adam", "weight_decay": 0.1},  # L2 decay: once a gradient-sized temporary
        {"name": "adamw", "weight_decay": 0.1},
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    ]
    for precision in ("fp32", "bf16"):
        for opt in optimizers:
            cfg = {
                "zero": {"stage": stage},
                "precision": precision,
                "optimizer": opt,
                "train": {"micro_batch_size": 4},
            }
            engine = zt.initialize(_Wide(), cfg)
            x = torch.randn(4, 1000)
            engine.backward(engine(x))
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                assert engine.step()
            largest = max((ev.cpu_memory_usage for ev in prof.events()), default=0)
            partition = sum(g.numel for g in engine.groups) * 4
            assert largest < partition // 4, (stage, precision, opt, largest, partition)
            engine.close()


def test_windowed_update_is_bitwise_the_whole_update() -> None:
    """Window by window through a small scratch equals one call on the whole partition."""
    from zshard.train.config import OptimizerConfig
    from zshard.train.optim import build_optimizer

    g = torch.Generator().manual_seed(3)
    n = 10_007
    for name, kw in (("adam", {"weight_decay": 0.1}), ("adamw", {"weight_decay": 0.1})):
        opt = build_optimizer(OptimizerConfig(name=name, **kw))  # type: ignore[arg-type]
        p0 = torch.randn(n, generator=g)
        grads = [torch.randn(n, generator=g) for _ in range(3)]
        whole = p0.clone()
        st = {k: torch.zeros(n) for k in opt.state_keys}
        parts = p0.clone()
        st2 = {k: torch.zeros(n) for k in opt.state_keys}
        scratch = torch.empty(1000)
        for step, grad in enumerate(grads, 1):
            opt.update(whole, grad.clone(), st, step=step, lr=1e-2)
            for a in range(0, n, 3001):
                b = min(n, a + 3001)
                opt.update(  # type: ignore[call-arg]
                    parts[a:b],
                    grad[a:b].clone(),
                    {k: t[a:b] for k, t in st2.items()},
                    step=step,
                    lr=1e-2,
                    scratch=scratch,
                )
        assert torch.equal(whole, parts), name
        for k in st:
            assert torch.equal(st[k], st2[k]), (name, k)


# The host allocator policy (engine/_host_alloc.py) is process-wide and set once, so it is
# checked in fresh interpreters. ``mapped_after`` frees a 16 MiB tensor (glibc raises its mmap
# threshold to 16 MiB), allocates 8 MiB and says whether those 8 MiB got a mapping of their own.
_MAPPED_PROBE = """
import ctypes, json, os, sys
import torch

class Info(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def mapped_after():
    big = torch.empty(16 << 20, dtype=torch.uint8)
    del big
    before = libc.mallinfo2().hblkhd
    t = torch.empty(8 << 20, dtype=torch.uint8)
    return libc.mallinfo2().hblkhd - before >= 8 << 20

out = {"default": mapped_after()}
if sys.argv[1] == "engine":
    import zshard.train as zt
    from tests.train import _engine_cases as cases
    zt.initialize(cases.make_model(), cases.config(1))
else:
    from zshard.train.engine import apply_host_alloc_policy
    out["applied"] = apply_host_alloc_policy()
out["policy"] = mapped_after()
print(json.dumps(out))
"""


GLIBC = "glibc" in (getattr(os, "confstr", lambda _: "")("CS_GNU_LIBC_VERSION") or "")


@pytest.mark.skipif(not GLIBC, reason="the policy applies to glibc only")
def test_a_cpu_engine_keeps_large_tensors_out_of_the_heap() -> None:
    got = run_python_json(_MAPPED_PROBE, "engine")
    # Without the policy glibc's risen threshold puts the 8 MiB on the heap; the engine fixes it.
    assert got == {"default": False, "policy": True}


@pytest.mark.skipif(not GLIBC, reason="the policy applies to glibc only")
def test_a_users_own_malloc_threshold_is_left_alone() -> None:
    # glibc reads the variable at start-up: 32 MiB keeps 8 MiB on the heap before and after.
    got = run_python_json(_MAPPED_PROBE, "policy", MALLOC_MMAP_THRESHOLD_=str(32 << 20))
    assert got == {"default": False, "applied": False, "policy": False}


# The probe leaves 56 MiB of free, touched chunks between live ones on the heap (256 KiB each:
# below any mmap threshold), then runs one backward of a CPU engine, and reports how much RSS
# that backward gave back (the live chunks are kept until the end).
_TRIM_PROBE = """
import json, sys
import torch
import zshard.train as zt
from tests.train import _engine_cases as cases

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

engine = zt.initialize(cases.make_model(), cases.config(1))
x, y = cases.micro_batch(0, 0, 0, 1)
loss = engine(x, y)
chunks = [torch.ones(1 << 16) for _ in range(256)]  # 256 KiB each, touched
kept = chunks[::8]
del chunks
before = rss()
engine.backward(loss)
print(json.dumps({"released": before - rss(), "kept": len(kept)}))
"""


@pytest.mark.skipif(not GLIBC, reason="the policy applies to glibc only")
def test_each_backward_returns_the_heaps_free_pages() -> None:
    got = run_python_json(_TRIM_PROBE)
    assert got["released"] >= 40 << 20, got  # of the 56 MiB freed between kept chunks
    # A user's own allocator settings: the engine leaves the heap alone.
    got = run_python_json(_TRIM_PROBE, MALLOC_MMAP_THRESHOLD_=str(32 << 20))
    assert got["released"] < 8 << 20, got


class _Four(nn.Module):
    """Four equal modules at stage 3: four flat groups of the same size."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(64, 64, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.float().sum()


def test_stage3_backward_releases_host_memory_as_modules_finish(monkeypatch) -> None:
    """On the CPU, stage 3's backward hands the host heap's free pages back each time modules
    worth its in-flight bound (2 x the largest group) are done: twice per backward of four
    equal groups; after the backward's start (every stage) that is 3 releases per backward."""
    from zshard.train.engine import _engine, _setup

    calls: list[str] = []
    monkeypatch.setattr(_setup, "release_free_heap", lambda: calls.append("module"))
    monkeypatch.setattr(_engine, "release_free_heap", lambda: calls.append("start"))
    engine = zt.initialize(_Four(), {"zero": {"stage": 3, "param_persistence_threshold": 0}})
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 64)))
        engine.step()
    assert calls == ["start", "module", "module"] * 2
