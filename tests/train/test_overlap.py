"""Communication that overlaps compute (``zero.overlap_comm``), backend-aware collectives and the
communication counters, in real gloo process groups (world sizes 2 and 3).

Overlap is shown without clocks: every collective the engine waits for goes through
``Handle.wait``, which the checks replace by a *gate*. While the gate is held, each collective is
artificially slow: a wait on it blocks until the test releases the gate (a generous deadline
turns a wrong engine into a failure rather than a hang). A check holds the gate around
``engine.backward()`` and asserts on counts: how many collectives were still in flight when
backward returned, and how many waits backward made. With ``overlap_comm: true`` backward at
stages 0-1 returns with every reduction in flight and no wait at all; with ``false`` every
reduction is complete when it returns.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import zshard.train as zt
from tests.harness import run_ranks
from zshard.train.zero import STAGE2_SLOTS, STAGE3_SLOTS, Handle

try:
    from tests.train import _engine_cases as cases
except ModuleNotFoundError:  # tests/train is not a package: pytest put it on sys.path
    import _engine_cases as cases  # type: ignore[no-redef]

pytestmark = pytest.mark.slow

FP32_TOL = 1e-5
BLOCK_S = 20.0  # a wait that should never happen blocks this long before it is recorded


class Gate:
    """Makes collectives slow while held: ``Handle.wait`` blocks until :meth:`release`."""

    def __init__(self) -> None:
        self.held = False
        self.block = False  # block waits while held (else only count them)
        self.released = threading.Event()
        self.waits_while_held = 0
        self.blocked = 0  # waits that reached the deadline while blocking
        self._real = Handle.wait

    def hold(self, *, block: bool) -> None:
        self.held, self.block, self.waits_while_held = True, block, 0
        self.released.clear()

    def release(self) -> None:
        self.held = False
        self.released.set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[Gate]:
        gate, real = self, self._real

        def wait(handle: Handle) -> bool:
            if not handle.done and gate.held:
                gate.waits_while_held += 1
                if gate.block and not gate.released.wait(BLOCK_S):
                    gate.blocked += 1
            return real(handle)

        Handle.wait = wait  # type: ignore[method-assign]
        try:
            yield self
        finally:
            Handle.wait = real  # type: ignore[method-assign]


def _overlap_config(stage: int, overlap: bool) -> dict[str, Any]:
    # Stage 2: 250-element buckets, 2 of them for the 418-element model (no more than its
    # STAGE2_SLOTS), so that backward never has to wait for a free slot.
    zero = {
        "stage": stage,
        "reduce_bucket_size": 250 if stage == 2 else 50,
        "allgather_bucket_size": 20,
        "param_persistence_threshold": 20,
        "overlap_comm": overlap,
    }
    return cases.config(stage, zero=zero)


def _one_run(stage: int, overlap: bool, rank: int, world_size: int, gate: Gate) -> dict[str, Any]:
    engine = zt.initialize(cases.make_model(), _overlap_config(stage, overlap))
    out: dict[str, Any] = {}
    for micro in range(engine.grad_accum):
        loss = engine(*cases.micro_batch(0, micro, rank, world_size))
        # Stages 0-1 must not wait at all during backward: block any such wait.
        gate.hold(block=overlap and stage < 2)
        engine.backward(loss)
        out[f"in_flight_after_backward_{micro}"] = engine.comm.in_flight
        if stage == 3:
            out[f"in_flight_bytes_after_backward_{micro}"] = engine._sink.in_flight_bytes
            out["max_in_flight_bytes"] = engine._sink.max_in_flight_bytes
            out["largest_group_bytes"] = max(
                g.padded_numel * g.dtype.itemsize for g in engine.groups if g.trainable
            )
        out[f"waits_in_backward_{micro}"] = gate.waits_while_held
        gate.release()
    gate.hold(block=False)
    engine.step()
    gate.release()
    out["waits_in_step"] = gate.waits_while_held
    out["in_flight_after_step"] = engine.comm.in_flight
    gather = engine._gather
    out["gathers_armed"] = gather.pending if gather is not None else 0
    seen: list[int] = []
    hook = engine.module.emb.register_forward_pre_hook(
        lambda m, a: seen.append(engine.comm.in_flight)  # after the engine's own pre-hook
    )
    loss = engine(*cases.micro_batch(1, 0, rank, world_size))
    hook.remove()
    out["in_flight_at_first_block"] = seen[0]
    out["in_flight_after_forward"] = engine.comm.in_flight
    engine.backward(loss)
    engine.backward(engine(*cases.micro_batch(1, 1, rank, world_size)))
    engine.step()
    cases.train(engine, range(2, 5))
    out["err"] = cases.rel_err(cases.full_params(engine), cases.reference(5, cases.adamw))
    engine.close()
    return out


def check_overlap(rank: int, world_size: int) -> dict[str, Any]:
    gate = Gate()
    out: dict[str, Any] = {}
    with gate.installed():
        for stage in range(4):
            for overlap in (True, False):
                out[f"{stage}-{overlap}"] = _one_run(stage, overlap, rank, world_size, gate)
    out["blocked"] = gate.blocked
    return out


@contextlib.contextmanager
def _collectives(mode: str) -> Iterator[None]:
    old = os.environ.get("ZSHARD_COLLECTIVES")
    os.environ["ZSHARD_COLLECTIVES"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["ZSHARD_COLLECTIVES"]
        else:
            os.environ["ZSHARD_COLLECTIVES"] = old


def check_parity_modes(rank: int, world_size: int) -> dict[str, float]:
    """Stages 0-3 equal the single-process reference with overlap off, and with the native
    collectives (reduce-scatter / all-gather / reduce to owners: NCCL's path, run on gloo)."""
    want = cases.reference(5, cases.adamw)
    out = {}
    for s in range(4):
        out[f"off_stage{s}"] = cases.rel_err(cases._parity(s, zero__overlap_comm=False), want)
        with _collectives("native"):
            out[f"native_stage{s}"] = cases.rel_err(cases._parity(s), want)
            out[f"native_off_stage{s}"] = cases.rel_err(
                cases._parity(s, zero__overlap_comm=False), want
            )
    bf16 = cases.reference_mixed(5, torch.bfloat16, 1e-2)
    with _collectives("native"):
        for s in (1, 2, 3):
            out[f"native_bf16_stage{s}"] = cases.rel_err(cases._parity(s, precision="bf16"), bf16)
    return out


def check_counters(rank: int, world_size: int) -> dict[str, Any]:
    """Bytes per step and kind, counted in Comm at the call, against what the stage must move."""
    out: dict[str, Any] = {}
    for mode in ("allreduce", "native"):
        with _collectives(mode):
            for stage in range(4):
                engine = zt.initialize(cases.make_model(), cases.config(stage))
                cases.train(engine, range(2))
                stats = engine.stats()
                out[f"{mode}-{stage}"] = {
                    "comm": stats["comm"],
                    "collectives": stats["collectives"],
                    "numel": sum(g.numel for g in engine.groups if g.trainable),
                    "padded": sum(g.padded_numel for g in engine.groups if g.trainable),
                    "buffers": engine.memory_report()["comm_buffers"],
                }
                engine.close()
    # Two nodes of one rank each (LOCAL_WORLD_SIZE=1): all-reduce traffic crosses them.
    os.environ["LOCAL_WORLD_SIZE"] = "1"
    try:
        engine = zt.initialize(cases.make_model(), cases.config(0))
        cases.train(engine, range(1))
        out["two_nodes"] = engine.stats()["comm"]["all_reduce"]
        engine.close()
    finally:
        os.environ["LOCAL_WORLD_SIZE"] = str(world_size)
    return out


def check_resume_save(rank: int, world_size: int, root: str) -> float:
    """Stage 2, overlap off: 3 steps, save (a resume at world size 3 follows)."""
    engine = zt.initialize(cases.make_model(), cases.config(2, zero__overlap_comm=False))
    cases.train(engine, range(3))
    engine.save(root)
    engine.close()
    return 0.0


def check_resume_load(rank: int, world_size: int, root: str) -> float:
    """Load at stage 1 with native collectives and overlap on, finish the run."""
    with _collectives("native"):
        engine = zt.initialize(cases.make_model(), cases.config(1))
        engine.load(root)
        cases.train(engine, range(engine.global_step, 5))
        err = cases.rel_err(cases.full_params(engine), cases.reference(5, cases.adamw))
        engine.close()
    return err


def run_all(rank: int, world_size: int, checks: list[str], root: str) -> dict[str, Any]:
    out = {}
    for name in checks:
        fn = globals()[name]
        out[name] = fn(rank, world_size, root) if "resume" in name else fn(rank, world_size)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("overlap-ckpt"))


@pytest.fixture(scope="module")
def ws2(root: str) -> list[dict[str, Any]]:
    checks = ["check_overlap", "check_parity_modes", "check_counters", "check_resume_save"]
    return run_ranks(run_all, 2, (checks, root), timeout=300)


@pytest.fixture(scope="module")
def ws3(root: str, ws2: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = ["check_parity_modes", "check_counters", "check_resume_load"]
    return run_ranks(run_all, 3, (checks, root), timeout=300)


def same_on_every_rank(ranks: list[dict[str, Any]], check: str) -> dict[str, Any]:
    per_rank = [r[check] for r in ranks]
    assert all(r == per_rank[0] for r in per_rank), per_rank
    out: dict[str, Any] = per_rank[0]
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_backward_returns_before_reductions_complete(ws2: list[dict[str, Any]], stage: int) -> None:
    out = same_on_every_rank(ws2, "check_overlap")
    assert out["blocked"] == 0, "a wait that overlap should have avoided blocked"
    on, off = out[f"{stage}-True"], out[f"{stage}-False"]
    # The window's last backward: reductions still in flight with overlap, none without.
    assert on["in_flight_after_backward_1"] > 0, on
    assert off["in_flight_after_backward_1"] == 0, off
    assert on["waits_in_step"] >= on["in_flight_after_backward_1"]
    if stage < 2:
        # Stages 0-1: no collective in a mid-window backward; in the last one, none waited for.
        assert on["in_flight_after_backward_0"] == off["in_flight_after_backward_0"] == 0
        assert on["waits_in_backward_1"] == 0
        assert off["waits_in_backward_1"] > 0  # the blocking path reduces inside backward()
    else:
        # Stages 2-3 reduce every backward, with a bounded number (stage 2: of slots) or (stage
        # 3 on gloo: each gradient all-reduced where autograd left it) of bytes in flight.
        assert on["in_flight_after_backward_0"] > 0
        if stage == 2:
            assert on["in_flight_after_backward_0"] <= STAGE2_SLOTS
        else:
            assert on["max_in_flight_bytes"] == STAGE3_SLOTS * on["largest_group_bytes"]
            assert 0 < on["in_flight_bytes_after_backward_0"] <= on["max_in_flight_bytes"]
            assert off["in_flight_bytes_after_backward_0"] == 0
        assert off["in_flight_after_backward_0"] == 0
    assert on["err"] < FP32_TOL and off["err"] < FP32_TOL


@pytest.mark.parametrize("stage", [1, 2])
def test_parameter_gather_overlaps_forward(ws2: list[dict[str, Any]], stage: int) -> None:
    """Stages 1-2: step() arms the all-gathers of the updated partitions, the next forward
    starts them, and its first modules run while later buckets are still in flight; without
    overlap, step() completes them."""
    out = same_on_every_rank(ws2, "check_overlap")
    on, off = out[f"{stage}-True"], out[f"{stage}-False"]
    assert on["gathers_armed"] > 1 and on["in_flight_after_step"] == 0
    assert 0 < on["in_flight_at_first_block"] < on["gathers_armed"]
    assert on["in_flight_after_forward"] == 0  # every bucket waited for by its module
    assert off["gathers_armed"] == off["in_flight_after_step"] == 0
    assert off["in_flight_at_first_block"] == 0


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_parity_overlap_off_and_native_collectives(
    request: pytest.FixtureRequest, world_size: int, stage: int
) -> None:
    out = same_on_every_rank(request.getfixturevalue(f"ws{world_size}"), "check_parity_modes")
    for key in (f"off_stage{stage}", f"native_stage{stage}", f"native_off_stage{stage}"):
        assert out[key] < FP32_TOL, (key, out[key])
    if stage:
        assert out[f"native_bf16_stage{stage}"] < 2e-2


@pytest.mark.parametrize("world_size", [2, 3])
def test_counters_are_exact(request: pytest.FixtureRequest, world_size: int) -> None:
    """One step's bytes per kind: gradients once per window (Ψ elements, 4 bytes; stage 2 once
    per micro batch), parameters once at stages 1-2, plus the 4-byte norm all-reduce; gloo
    builds everything on all-reduce."""
    out = same_on_every_rank(request.getfixturevalue(f"ws{world_size}"), "check_counters")
    norm = 4
    a0 = out["allreduce-0"]
    psi = 4 * a0["numel"]
    assert a0["collectives"] == "allreduce"
    assert a0["comm"]["all_reduce"]["bytes"] == psi + norm
    assert a0["comm"]["all_reduce"]["calls"] == -(-a0["numel"] // 50) + 1  # 50-element buckets
    # gloo, stages 1-2: gradients and parameters both by all-reduce, in place (no staging).
    # Stage 2 reduces every backward: twice per step with 2 micro batches.
    for s in (1, 2):
        a = out[f"allreduce-{s}"]
        assert a["comm"]["all_reduce"]["bytes"] == s * psi + psi + norm, (s, a)
        assert a["comm"]["reduce_scatter"]["calls"] == a["comm"]["all_gather"]["calls"] == 0
    assert out["allreduce-1"]["buffers"] == 0  # in place: no staging slot
    # native, stages 1-2: gradients reduced to their owners, partitions all-gathered.
    for s in (1, 2):
        n = out[f"native-{s}"]
        assert n["collectives"] == "native"
        assert n["comm"]["reduce"]["bytes"] == s * psi
        assert n["comm"]["all_gather"]["bytes"] == 4 * n["padded"]
        assert n["comm"]["all_reduce"]["bytes"] == norm
    # native, stage 3: per module one reduce-scatter, all-gathers in forward and backward.
    n3 = out["native-3"]["comm"]
    assert n3["reduce_scatter"]["calls"] > 0 and n3["all_gather"]["calls"] > 0
    assert n3["reduce"]["calls"] == n3["broadcast"]["calls"] == 0
    two = out["two_nodes"]
    if world_size == 2:
        assert two["cross_node_bytes"] == two["bytes"]  # half sent, half received, all remote
    else:
        assert 0 < two["cross_node_bytes"] < 2 * two["bytes"]
    assert all(c["cross_node_bytes"] == 0 for k in out if "-" in k for c in out[k]["comm"].values())


def test_resume_across_stages_world_sizes_and_modes(ws3: list[dict[str, Any]]) -> None:
    """Saved at world size 2, stage 2, overlap off; resumed at world size 3, stage 1, overlap on
    with native collectives: equal to the uninterrupted single-process run."""
    assert same_on_every_rank(ws3, "check_resume_load") < FP32_TOL  # type: ignore[operator]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_parity_world_size_1_overlap_off(stage: int) -> None:
    want = cases.reference(5, cases.adamw)
    assert cases.rel_err(cases._parity(stage, zero__overlap_comm=False), want) < FP32_TOL
