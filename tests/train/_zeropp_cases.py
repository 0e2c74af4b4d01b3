"""Per-rank check functions of the ZeRO++ tests (run by ``tests.harness.run_ranks``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tests.harness import COLLECTIVE_TIMEOUT_S


def _comm(rank: int, world_size: int, local_world_size: int) -> Any:
    import datetime

    from zshard.train.zero import Comm

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return Comm(
        None,
        rank,
        world_size,
        owns_group=False,
        timeout_s=COLLECTIVE_TIMEOUT_S,
        backend="gloo",
        local_world_size=local_world_size,
    )


def check_hierarchical_reduce(
    rank: int, world_size: int, node_sizes: list[int], partitions: list[int]
) -> dict[str, Any]:
    """For each node size L and partition size P: qgZ's two-hop all-to-all of every rank's
    (N*P,) gradient, unquantized (fp32 and bf16 inputs) and quantized (int8, int4), against a
    reduce-scatter of the same values in fp32. Returns errors and bounds per case."""
    from zshard.train.zero import HierarchicalReduceScatter, Hierarchy

    out: dict[str, Any] = {}
    for lsz in node_sizes:
        comm = _comm(rank, world_size, lsz)
        hier = Hierarchy(comm, lsz)
        for p in partitions:
            g = torch.Generator().manual_seed(1000 * rank + p)
            base = torch.randn(world_size * p, generator=g) * torch.linspace(
                0.01, 3.0, world_size * p
            )
            for dtype, bits in (
                (torch.float32, None),
                (torch.bfloat16, None),
                (torch.float32, 8),
                (torch.bfloat16, 8),
                (torch.float16, 4),
            ):
                full = base.to(dtype)
                # The reference: a reduce-scatter of the same values, in fp32.
                ref_full = full.float().clone()
                ref = torch.empty(p)
                comm.reduce_scatter(ref, ref_full)
                # The worst-case error: each hop's half steps, summed over what it adds up.
                red = HierarchicalReduceScatter(
                    hier,
                    bits=bits,
                    block=64,
                    dtype=dtype,
                    max_partition=max(partitions),
                    slots=2,
                    device=torch.device("cpu"),
                )
                got = torch.full((p,), 0.5)  # added to, as into a gradient partition
                h = red.start(full, got)
                h.wait()
                got -= 0.5
                err = (got - ref).abs()
                # Bound: hop 1 quantizes N rows of |x| <= max|x| (half step each: amax/qmax/2
                # per contributing rank), hop 2 partial sums of up to L ranks.
                amax = torch.tensor([full.float().abs().max().item()])
                dist.all_reduce(amax, op=dist.ReduceOp.MAX)
                key = f"L{lsz}-P{p}-{str(dtype).removeprefix('torch.')}-{bits}"
                out[key] = {
                    "max_err": float(err.max()),
                    "max_ref": float(ref.abs().max()),
                    "amax": float(amax),
                    "equal": bool(torch.equal(got, ref)),
                }
    return out


# -- training ---------------------------------------------------------------------------------

ZEROPP = {
    "plain": {},
    "qwz": {"quantized_weights": True},
    "hpz": {"hpz_partition_size": 2},
    "qgz": {"quantized_gradients": True},
    "all": {"quantized_weights": True, "hpz_partition_size": 2, "quantized_gradients": True},
}


def gpt_config(zero: dict[str, Any], *, steps: int, precision: str = "fp32", **over: Any) -> Any:
    """A tiny GPT (2 layers, d_model 32) on the built-in text at 32 tokens, 8 sequences per
    step, every module gathered (persistence threshold 0)."""
    from zshard.train.config import load_config

    tree: dict[str, Any] = {
        "model": {"name": "gpt", "args": {"n_layer": 2, "n_head": 2, "d_model": 32}},
        "data": {"name": "builtin", "seq_len": 32},
        "train": {"steps": steps, "micro_batch_size": 1, "global_batch_size": 8, "seed": 7},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
        "precision": {"dtype": precision},
        "zero": {"stage": 3, "param_persistence_threshold": 0, **zero},
        "dist": {"timeout_s": COLLECTIVE_TIMEOUT_S},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        tree.setdefault(section, {})[field] = value
    return load_config(tree)


def as_nodes(rank: int, node: int) -> None:
    """Make this process look like local rank ``rank % node`` of a node of ``node`` ranks."""
    import os

    os.environ["LOCAL_WORLD_SIZE"] = str(node)
    os.environ["LOCAL_RANK"] = str(rank % node)


def run_steps(engine: Any, dataset: Any, cfg: Any, steps: range) -> list[float]:
    """Train ``steps``; the mean loss over ranks of each."""
    from tests.harness import mean_over_ranks
    from zshard.train.data import GlobalBatchSampler, collate

    micro, accum, global_batch = cfg.train.resolve_batch(engine.world_size)
    sampler = GlobalBatchSampler(len(dataset), global_batch, cfg.train.seed)
    losses = []
    for step in steps:
        total = 0.0
        for a in range(accum):
            x, y = collate(
                dataset, sampler.micro_batch(step, engine.rank, engine.world_size, micro, a)
            )
            loss = engine(x, y)
            engine.backward(loss)
            total += float(loss.detach())
        engine.step()
        losses.append(mean_over_ranks(torch.tensor(total / accum)))
    return losses


class CallLog:
    """While :attr:`on`: every collective ``Comm`` counts, in order, as ``(group, kind, bytes,
    cross_node_bytes)`` where ``group`` is the flat group whose parameter gather started it (None
    otherwise: gradient reductions, whose second qgZ hop starts lazily); ``"|"`` marks the end of
    a micro step's backward; :attr:`reduced` lists the groups whose gradients were reduced."""

    def __init__(self) -> None:
        from zshard.train.zero import Comm, Stage3

        self.on = False
        self.calls: list[tuple[str | None, str, int, int]] = []
        self.reduced: list[str] = []
        self._group: str | None = None
        log = self
        count, start_gather = Comm._count, Stage3._start_gather
        reduce, release_all = Stage3._reduce, Stage3.release_all

        def _count(comm: Any, kind: str, nbytes: int, cross: int) -> None:
            if log.on:
                log.calls.append((log._group, kind, nbytes, cross))
            count(comm, kind, nbytes, cross)

        def _start_gather(s3: Any, g: Any, **kw: Any) -> Any:
            log._group = g.name
            try:
                return start_gather(s3, g, **kw)
            finally:
                log._group = None

        def _reduce(s3: Any, g: Any) -> None:
            if log.on:
                log.reduced.append(g.name)
            reduce(s3, g)

        def _release_all(s3: Any) -> None:
            release_all(s3)
            if log.on:
                log.calls.append(("|", "", 0, 0))

        Comm._count = _count  # type: ignore[method-assign]
        Stage3._start_gather = _start_gather  # type: ignore[method-assign]
        Stage3._reduce = _reduce  # type: ignore[method-assign]
        Stage3.release_all = _release_all  # type: ignore[method-assign]


def train_variants(
    rank: int,
    world_size: int,
    node: int,
    names: list[str],
    steps: int,
    precision: str = "fp32",
    log_step: int | None = None,
    save: tuple[str, int, str] | None = None,
) -> dict[str, Any]:
    """Each ZeRO++ variant in ``names`` trained from the same seed for ``steps`` steps, with
    nodes of ``node`` ranks and native collectives (each kind counted as itself): its losses,
    time, last step's counters, memory report, the collectives of step ``log_step`` in order,
    the flat groups' partition sizes and the final master weights of this rank. ``save``
    ``(variant, step, ckpt)``: that variant also saves into ``ckpt`` after ``step``."""
    import os
    import time

    import zshard.train as zt
    from zshard.train.run._loop import build

    as_nodes(rank, node)
    os.environ["ZSHARD_COLLECTIVES"] = "native"
    log = CallLog()
    out: dict[str, Any] = {}
    for name in names:
        cfg = gpt_config(ZEROPP[name], steps=steps, precision=precision)
        factory, dataset, _ = build(cfg)
        engine = zt.initialize(None, cfg, model_factory=factory)
        t0 = time.perf_counter()
        losses: list[float] = []
        for step in range(steps):
            log.on = step == log_step
            losses += run_steps(engine, dataset, cfg, range(step, step + 1))
            log.on = False
            if save is not None and save[0] == name and step + 1 == save[1]:
                engine.save(save[2])
        state = engine.state_tensors()
        out[name] = {
            "losses": losses,
            "seconds": time.perf_counter() - t0,
            "stats": engine.stats(),
            "memory": engine.memory_report(),
            "calls": [c for c in log.calls if c[1] != "all_reduce"],  # not the norm
            "reduced": list(log.reduced),
            "partitions": {g.name: g.partition_numel for g in engine.groups},
            "itemsize": torch.empty((), dtype=engine.dtype).element_size(),
            # numpy: torch tensors would travel through shared memory that dies with the rank
            "master": {
                f"{g}/{kind}": t.detach().float().numpy().copy()
                for (g, kind), t in state.items()
                if kind in ("master", "param")
            },
        }
        log.calls.clear()
        log.reduced.clear()
        engine.close()
    return out


def check_fp16_overflow(rank: int, world_size: int, node: int) -> dict[str, Any]:
    """fp16 with all of ZeRO++: a rank's inf loss (as an fp16 overflow gives) skips the step on
    every rank and halves the loss scale, as without ZeRO++."""
    import math

    import zshard.train as zt
    from zshard.train.data import GlobalBatchSampler, collate
    from zshard.train.run._loop import build

    as_nodes(rank, node)
    cfg = gpt_config(
        ZEROPP["all"],
        steps=4,
        precision="fp16",
        precision__loss_scale={"initial_scale_power": 8, "hysteresis": 1},
    )
    factory, dataset, _ = build(cfg)
    engine = zt.initialize(None, cfg, model_factory=factory)
    micro, accum, global_batch = cfg.train.resolve_batch(world_size)
    sampler = GlobalBatchSampler(len(dataset), global_batch, cfg.train.seed)
    stepped, scales = [], []
    for step in range(4):
        for a in range(accum):
            x, y = collate(dataset, sampler.micro_batch(step, rank, world_size, micro, a))
            loss = engine(x, y)
            if step == 2 and rank == 1:
                loss = loss * math.inf
            engine.backward(loss)
        stepped.append(engine.step())
        scales.append(engine.scaler.scale)
    out = {"stepped": stepped, "scales": scales, "skipped": engine.skipped_steps}
    engine.close()
    return out


def train_and_save(
    rank: int,
    world_size: int,
    node: int,
    name: str,
    steps: int,
    save_at: int,
    ckpt: str,
    resume_from: str | None = None,
) -> dict[str, Any]:
    """Variant ``name`` (after loading ``resume_from`` if given) trained to ``steps``, saving
    into ``ckpt`` after step ``save_at``; the losses of the steps it ran."""
    import zshard.train as zt
    from zshard.train.run._loop import build

    as_nodes(rank, node)
    cfg = gpt_config(ZEROPP[name], steps=steps)
    factory, dataset, _ = build(cfg)
    engine = zt.initialize(None, cfg, model_factory=factory)
    if resume_from is not None:
        engine.load(resume_from)
    start = engine.global_step
    losses: list[float] = []
    for step in range(start, steps):
        losses += run_steps(engine, dataset, cfg, range(step, step + 1))
        if step + 1 == save_at:
            engine.save(ckpt)
    engine.close()
    return {"start": start, "losses": losses}


def run_all(rank: int, world_size: int, calls: list[tuple[str, tuple]]) -> list[Any]:
    """Several checks in one process group (start-up costs seconds): their results, in order."""
    return [globals()[name](rank, world_size, *args) for name, args in calls]
