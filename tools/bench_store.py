"""Benchmark the zshard store: save, load and consolidate, against raw I/O, torch.save and DCP.

Run from the repository root (results go to stdout as markdown tables)::

    python tools/bench_store.py                   # 1 GiB of fp32 state, 5 rounds (+ S3 rounds)
    python tools/bench_store.py --quick           # 64 MiB smoke run (16 MiB on S3), ~2 minutes
    python tools/bench_store.py --max-load 1.5    # on a shared machine: wait for quiet rounds
    python tools/bench_store.py --no-s3           # without the moto S3 rounds
    python tools/bench_store.py --size-gb 2 --dir /mnt/scratch --repeats 3 --report out.md

One run builds one transformer-like fp32 state dict (GPT-2-style names and shapes: two large
embeddings, many medium matrices, small norms and biases) and, on those same bytes, measures:

* save and load through ``CheckpointWriter``/``CheckpointReader`` for world size 1, and world
  size 2 simulated in this one process (rank 0's shard, then rank 1's: one process owns each
  shard), the store's own fsync included; the same bytes laid out as stage 3 lays them out (one
  flat group per module, ~90 groups at 1 GiB), world size 1; plus, as a diagnostic, loading
  whole shards; and the number of files each rank writes per checkpoint for each layout;
* raw sequential I/O into one file + fsync (``tofile``/``np.fromfile`` per tensor, and 4 MiB
  writes/reads), ``torch.save`` + fsync / ``torch.load(weights_only=True)``, and
  ``torch.distributed.checkpoint`` without a process group (whose FileSystemWriter fsyncs every
  file by default);
* ``consolidate(..., dtype="fp32")`` versus "read everything, then ``safetensors`` save_file",
  each in a fresh child process that reports its own peak RSS and its RSS after imports;
* S3 (unless ``--no-s3``): a moto server in its own process on 127.0.0.1; the store's save
  (concurrent multipart uploads) and load (concurrent ranged GETs) of the state (``--s3-size-gb``,
  default 0.25 GiB) against s3fs ``put_file`` / ``cat_file`` of the same bytes as one object
  (s3fs's own concurrent multipart upload and ranged GETs for large objects: the raw baseline),
  in the same rounds. moto is a Python server on the same cores: a floor for both.

Fairness: every file written is evicted from the page cache before it is read (``drop_caches``
when permitted, else ``posix_fadvise(DONTNEED)``); every local load follows its own save
(``--loads-per-save`` loads, default 3, each from a cold cache); methods run once per round in a
shuffled order and tables report medians over all samples, with wall and CPU time; numpy's
huge-page requests are turned off so that all methods get the same kind of memory
(see ``_bench_util.disable_numpy_hugepages``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from _bench_util import (
    GIB,
    MIB,
    PageCache,
    Samples,
    Timing,
    TimingSamples,
    dir_bytes,
    disable_numpy_hugepages,
    emit_child_result,
    fsync_path,
    gib_per_s,
    git_revision,
    load_average,
    machine_info,
    markdown_table,
    remove,
    reset_peak_rss,
    rss_bytes,
    run_child,
    scratch_dir,
    settle,
    timed,
    wait_for_idle,
)

from zshard.store import ArrayEntry, CheckpointReader, CheckpointWriter, Layout, TensorEntry, pack
from zshard.store.dtypes import dtype as store_dtype
from zshard.store.layout import FlatGroup, Fragment
from zshard.store.shard import Geometry, read_shard_range

State = dict[str, torch.Tensor]
GROUP, KIND = "g0000", "param"
SAVE_TARGET = LOAD_TARGET = 0.9  # store throughput as a fraction of raw I/O
S3_TARGET = 0.8  # store throughput on S3 as a fraction of s3fs on one object
STAGE3_TARGET = 1.1  # stage-3 layout save time at most this times the stage-1 layout's
RSS_SLACK = 256 * MIB  # consolidate peak RSS target: largest tensor + this
STORE_CODE = ("zshard/store", "zshard/convert/consolidate.py")  # what the timings depend on
RAW_PIECE = 4 << 20  # bytes per syscall in the chunked raw baseline, like the store's chunks
RAW_SAVES = ("raw tofile per tensor + fsync", "raw 4 MiB writes + fsync")
RAW_LOADS = ("raw np.fromfile per tensor", "raw 4 MiB reads")


def progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def quiet(args: argparse.Namespace) -> None:
    """With --max-load, start a round only once other processes leave the CPUs mostly free."""
    if args.max_load:
        waited = wait_for_idle(args.max_load)
        if waited >= 1:
            progress(f"waited {waited:.0f}s for load average < {args.max_load:g}")


# ---------------------------------------------------------------------------------------------
# The state


def model_shapes(target_bytes: int) -> dict[str, tuple[int, ...]]:
    """GPT-2-style fp32 shapes totalling at least ``target_bytes``.

    Width and vocabulary scale with the square root of the size so that every tensor scales
    with it; layers are added until the target is reached. At 1 GiB: d=1024, vocab=50304,
    14 layers, 173 tensors, largest (embedding and untied head) 196.5 MiB each.
    """
    s = math.sqrt(target_bytes / GIB)
    d = max(64, 64 * round(16 * s))
    vocab = max(64, 64 * round(50304 * s / 64))
    ctx = 1024
    per_layer = 12 * d * d + 13 * d
    fixed = 2 * vocab * d + ctx * d + 2 * d
    layers = max(1, math.ceil((target_bytes / 4 - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocab, d),
        "transformer.wpe.weight": (ctx, d),
    }
    for i in range(layers):
        p = f"transformer.h.{i}."
        shapes |= {
            p + "ln_1.weight": (d,),
            p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (3 * d, d),
            p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d),
            p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,),
            p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (4 * d, d),
            p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (d, 4 * d),
            p + "mlp.c_proj.bias": (d,),
        }
    shapes |= {
        "transformer.ln_f.weight": (d,),
        "transformer.ln_f.bias": (d,),
        "lm_head.weight": (vocab, d),
    }
    return shapes


def make_state(shapes: dict[str, tuple[int, ...]]) -> State:
    # Random values: nothing in any path compresses, so bytes on disk equal bytes in memory.
    g = torch.Generator().manual_seed(0)
    return {n: torch.empty(s).normal_(0.0, 0.02, generator=g) for n, s in shapes.items()}


def state_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def check_equal(want: State, got: State, what: str) -> None:
    """Every benchmark load is also a correctness check (outside the timing)."""
    if set(got) != set(want):
        raise AssertionError(f"{what}: loaded names differ from the saved ones")
    for name, t in want.items():
        if got[name].shape != t.shape or not torch.equal(got[name], t):
            raise AssertionError(f"{what}: tensor {name} differs after the round trip")


# ---------------------------------------------------------------------------------------------
# Baselines


# Two raw baselines, because the syscall size alone moves the cost: on the machine this was
# written on, one write per tensor (up to 196 MiB) took about 2.5x the CPU of 4 MiB writes.
# The store is judged against the faster of the two.


def raw_save(state: State, path: str) -> None:
    with open(path, "wb") as f:
        for t in state.values():
            t.numpy().tofile(f)
        f.flush()
        os.fsync(f.fileno())


def raw_load(path: str, shapes: dict[str, tuple[int, ...]]) -> State:
    # One np.fromfile per tensor, sequentially through one open file: one array per tensor, the
    # same allocation pattern as every other loader here.
    out = {}
    with open(path, "rb") as f:
        for name, shape in shapes.items():
            a = np.fromfile(f, dtype=np.float32, count=math.prod(shape))
            out[name] = torch.from_numpy(a).view(shape)
    return out


def raw_save_pieces(state: State, path: str) -> None:
    with open(path, "wb", buffering=0) as f:
        for t in state.values():
            view = memoryview(t.numpy()).cast("B")
            for i in range(0, len(view), RAW_PIECE):
                piece = view[i : i + RAW_PIECE]
                while piece:
                    piece = piece[f.write(piece) :]
        os.fsync(f.fileno())


def raw_load_pieces(path: str, shapes: dict[str, tuple[int, ...]]) -> State:
    out = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        for name, shape in shapes.items():
            a = np.empty(math.prod(shape), dtype=np.float32)
            view = memoryview(a).cast("B")
            for i in range(0, len(view), RAW_PIECE):
                pread_full(fd, view[i : i + RAW_PIECE], pos + i)
            pos += len(view)
            out[name] = torch.from_numpy(a).view(shape)
    finally:
        os.close(fd)
    return out


def pread_full(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise EOFError(f"file ends at byte {offset}")
        view, offset = view[n:], offset + n


def torch_save(state: State, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def torch_load(path: str) -> State:
    out: State = torch.load(path, weights_only=True)
    return out


def dcp_save(state: State, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group" notices
        dcp.save(state, checkpoint_id=path, no_dist=True)


def dcp_load(path: str, shapes: dict[str, tuple[int, ...]]) -> State:
    import torch.distributed.checkpoint as dcp

    # DCP loads in place; allocating the destination is part of loading, as for the others.
    out = {n: torch.empty(s) for n, s in shapes.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(out, checkpoint_id=path, no_dist=True)
    return out


# ---------------------------------------------------------------------------------------------
# The store, used the way a training job uses it


@dataclass(frozen=True)
class StorePlan:
    """Computed once per job, like an engine's layout: state kind param, fp32; one flat group
    (stages 0-2), or one flat group per module (``stage3``: what stage 3 checkpoints hold)."""

    layout: Layout
    arrays: tuple[ArrayEntry, ...]
    tensors: tuple[TensorEntry, ...]
    frags: dict[str, list[Fragment]]
    members: dict[str, list[str]]  # group -> its tensors, in order


def module_of(name: str) -> str:
    return name.rpartition(".")[0]


def store_plan(
    shapes: dict[str, tuple[int, ...]], world_size: int, stage3: bool = False
) -> StorePlan:
    by_group: dict[str, list[str]] = {}
    if stage3:
        modules: dict[str, str] = {}
        for n in shapes:
            g = modules.setdefault(module_of(n), f"g{len(modules):04d}")
            by_group.setdefault(g, []).append(n)
    else:
        by_group[GROUP] = list(shapes)
    groups: list[FlatGroup] = []
    frags: dict[str, list[Fragment]] = {}
    for g, names in by_group.items():
        group, fr = pack(g, [(n, math.prod(shapes[n])) for n in names], world_size)
        groups.append(group)
        frags.update(fr)
    tensors = tuple(TensorEntry(n, KIND, s, "float32", tuple(frags[n])) for n, s in shapes.items())
    layout = Layout(world_size, 3 if stage3 else 1, tuple(groups))
    arrays = tuple(ArrayEntry(g.name, KIND, "float32") for g in groups)
    return StorePlan(layout, arrays, tensors, frags, by_group)


def store_save(state: State, root: str, plan: StorePlan) -> None:
    writer = CheckpointWriter(root, 1, plan.layout, plan.arrays, plan.tensors)
    writer.prepare()
    # In a job each rank writes its own shard concurrently; here one process writes them in
    # turn, so the time is comparable to one process doing raw I/O on the same bytes.
    for rank in range(plan.layout.world_size):
        write_rank_shard(writer, state, plan, rank)
    writer.commit()


def write_rank_shard(writer: CheckpointWriter, state: State, plan: StorePlan, rank: int) -> None:
    """Stream this rank's fragments straight from the tensors (no flat copy), group by group
    in the order of the rank's shard, as the engine does."""
    for s in writer.stored:
        for group, _ in s.segments:
            w = writer.shard_writer(group, KIND, rank)
            try:
                for name in plan.members[group]:
                    flat = state[name].reshape(-1).numpy()
                    for f in plan.frags[name]:
                        if f.rank == rank:
                            w.write(flat[f.start : f.start + f.length])
            except BaseException:
                w.abort()
                raise
            w.close()


def files_per_rank(root: str) -> dict[int, int]:
    """Files each rank wrote in the newest step directory: its shards and rank state."""
    r = CheckpointReader.open(root)
    step = r.url
    counts: dict[int, int] = {}
    for _, _, names in os.walk(step):
        for n in names:
            rank = _rank_of(n)
            if rank is not None:
                counts[rank] = counts.get(rank, 0) + 1
    return counts


def _rank_of(name: str) -> int | None:
    if name.startswith("c.") and name[2:].isdigit():
        return int(name[2:])
    if name.startswith("rank-") and name.endswith(".json"):
        return int(name[5:-5])
    return None


def store_load(root: str) -> State:
    """What a loader does with the public reader: every tensor, whole, into new memory."""
    r = CheckpointReader.open(root)
    return {t.name: torch.from_numpy(r.read_tensor(t.name, t.kind)) for t in r.iter_tensors()}


def store_load_partitions(root: str) -> State:
    """Diagnostic: each shard read whole (one verified sequential read) into a flat buffer, the
    tensors being views of it, as a ZeRO 1-2 engine restoring its flat partitions would.

    Uses the store's internal ``read_shard_range``. The buffer is a torch tensor, like an
    engine's flat buffer.
    """
    r = CheckpointReader.open(root)
    m = r.manifest
    g = m.layout.group(GROUP)
    s, _ = m.locate(GROUP, KIND)  # one group: at base 0 of each rank's shard
    dt = store_dtype(s.dtype)
    geo = Geometry(s.shard_numel, s.chunk_numel, dt.itemsize)
    p = g.partition_numel
    flat = torch.empty(p * m.layout.world_size, dtype=torch.float32).numpy()
    for rank in range(m.layout.world_size):
        key = s.shard_key(rank)
        read_shard_range(r.dir, key, geo, dt, 0, flat[rank * p : (rank + 1) * p], where=key)
    out = {}
    for t in r.iter_tensors({KIND}):
        base = t.fragments[0].offset - t.fragments[0].start  # pack() lays tensors end to end
        out[t.name] = torch.from_numpy(flat[base : base + t.numel]).view(t.shape)
    return out


# ---------------------------------------------------------------------------------------------
# Save/load rounds


@dataclass(frozen=True)
class Phase:
    label: str
    role: str  # "target" (judged), "raw" (the reference), "baseline" or "diagnostic"


@dataclass(frozen=True)
class Method:
    """One save and the load that reads it back. Every load follows its own save, so no load
    inherits a different machine state (page cache, free memory) than the others."""

    key: str  # file or directory name in the scratch dir
    save_phase: Phase | None  # None: the save only prepares the load and is not reported
    save: Callable[[State, str], None]
    load_phase: Phase
    load: Callable[[str], State]


@dataclass
class Row:
    phase: Phase
    disk_bytes: int = 0
    t: TimingSamples = field(default_factory=TimingSamples)


WS1, WS2 = "zshard store, world size 1", "zshard store, world size 2 (1 process)"
STAGE3 = "zshard store, stage 3 layout, world size 1"


def methods(shapes: dict[str, tuple[int, ...]]) -> list[Method]:
    plan1, plan2 = store_plan(shapes, 1), store_plan(shapes, 2)
    plan3 = store_plan(shapes, 1, stage3=True)
    ws1, ws2 = WS1, WS2
    return [
        Method(
            "raw.bin",
            Phase(RAW_SAVES[0], "raw"),
            raw_save,
            Phase(RAW_LOADS[0], "raw"),
            lambda p: raw_load(p, shapes),
        ),
        Method(
            "raw-pieces.bin",
            Phase(RAW_SAVES[1], "raw"),
            raw_save_pieces,
            Phase(RAW_LOADS[1], "raw"),
            lambda p: raw_load_pieces(p, shapes),
        ),
        Method(
            "store-ws1",
            Phase(ws1, "target"),
            lambda s, p: store_save(s, p, plan1),
            Phase(ws1, "target"),
            store_load,
        ),
        Method(
            "store-ws2",
            Phase(ws2, "target"),
            lambda s, p: store_save(s, p, plan2),
            Phase(ws2, "target"),
            store_load,
        ),
        Method(
            "store-stage3",
            Phase(STAGE3, "target"),
            lambda s, p: store_save(s, p, plan3),
            Phase(STAGE3, "target"),
            store_load,
        ),
        Method(
            "store-ws1-shards",
            None,
            lambda s, p: store_save(s, p, plan1),
            Phase("zshard store, ws 1, whole shards", "diagnostic"),
            store_load_partitions,
        ),
        Method(
            "model.pt",
            Phase("torch.save + fsync", "baseline"),
            torch_save,
            Phase("torch.load(weights_only=True)", "baseline"),
            torch_load,
        ),
        Method(
            "dcp",
            Phase("DCP save (its own fsync)", "baseline"),
            dcp_save,
            Phase("DCP load", "baseline"),
            lambda p: dcp_load(p, shapes),
        ),
    ]


def warm_up(scratch: str) -> None:
    """Run every method once on a tiny state so one-time costs (imports, DCP's planner code
    paths) are not billed to the first timed round."""
    shapes = {"a.weight": (256, 64), "a.bias": (64,), "b.weight": (64, 256)}
    state = make_state(shapes)
    for m in methods(shapes):
        path = os.path.join(scratch, "warmup-" + m.key)
        m.save(state, path)
        check_equal(state, m.load(path), f"warm-up {m.load_phase.label}")
        remove(path)


def run_rounds(
    state: State, scratch: str, args: argparse.Namespace, cache: PageCache
) -> tuple[dict[str, Row], dict[str, Row]]:
    """Save/load rounds. Every method runs once per round, in a new shuffled order, so drift
    (other tenants, the VM host) and what the previous method left behind (free memory, its
    state) land on all methods alike; the tables report medians over rounds."""
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    ms = methods(shapes)
    saves = {m.save_phase.label: Row(m.save_phase) for m in ms if m.save_phase}
    loads = {m.load_phase.label: Row(m.load_phase) for m in ms}
    for rep in range(args.repeats):
        quiet(args)
        order = random.Random(rep).sample(ms, len(ms))
        for m in order:
            path = os.path.join(scratch, m.key)
            settle(args.settle)
            t_save, _ = timed(lambda m=m, path=path: m.save(state, path))
            if m.save_phase:
                saves[m.save_phase.label].t.add(t_save)
                saves[m.save_phase.label].disk_bytes = dir_bytes(path)
            # Loads take about a second, and a cold read's cost on a VM varies by +-20% from
            # one to the next (page faults land on host memory or not): several loads per save
            # steady the medians of the load table at little cost.
            for _ in range(args.loads_per_save):
                cache.evict([path])  # the load must read the disk, not what the save cached
                settle(args.settle)
                t_load, loaded = timed(lambda m=m, path=path: m.load(path))
                loads[m.load_phase.label].t.add(t_load)
                loads[m.load_phase.label].disk_bytes = dir_bytes(path)
                check_equal(state, loaded, m.load_phase.label)
                del loaded
            remove(path)
            progress(
                f"round {rep + 1}/{args.repeats} {m.key}: "
                f"save {t_save.wall:.2f}s, load {t_load.wall:.2f}s"
            )
    return saves, loads


# ---------------------------------------------------------------------------------------------
# Consolidate, each run in a fresh child process


CONSOLIDATE_MODES = {
    "streaming": "consolidate(), torch imported",
    "streaming-lean": "consolidate(), no torch (as the CLI)",
    "naive": "naive: read all, then save_file",
}

# The lean child imports only zshard, as the `zshard consolidate` CLI does (it never imports
# torch for an fp32 output), so its RSS shows what the command itself costs.
_LEAN_CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
from _bench_util import (disable_numpy_hugepages, emit_child_result, reset_peak_rss,
                         rss_bytes, timed)
from zshard.convert.consolidate import consolidate
disable_numpy_hugepages()
baseline = rss_bytes()
reset_peak_rss()
t, _ = timed(lambda: consolidate(sys.argv[2], sys.argv[3], dtype="fp32", max_shard_size="1TB"))
emit_child_result(wall=t.wall, cpu=t.cpu, baseline_rss_bytes=baseline,
                  out_bytes=os.path.getsize(sys.argv[3]), torch_imported="torch" in sys.modules)
"""


def child_argv(mode: str, ckpt: str, out: str) -> list[str]:
    if mode == "streaming-lean":
        return ["-c", _LEAN_CHILD, os.path.dirname(os.path.abspath(__file__)), ckpt, out]
    return [__file__, "--child", mode, "--ckpt", ckpt, "--out", out]


def child_main(mode: str, ckpt: str, out: str) -> None:
    """Child side, torch imported (this module needs it): both modes share one baseline."""
    import safetensors.torch

    from zshard.convert.consolidate import consolidate

    baseline = rss_bytes()
    reset_peak_rss()  # the peak from here on covers the operation only
    if mode == "streaming":
        t, _ = timed(lambda: consolidate(ckpt, out, dtype="fp32", max_shard_size="1TB"))
    else:
        t, _ = timed(lambda: naive_consolidate(ckpt, out, safetensors.torch.save_file))
    emit_child_result(
        wall=t.wall,
        cpu=t.cpu,
        baseline_rss_bytes=baseline,
        out_bytes=os.path.getsize(out),
        torch_imported=True,
    )


def naive_consolidate(ckpt: str, out: str, save_file: Callable[..., None]) -> None:
    """The baseline: load the whole model into memory, then write it (and fsync, as the store's
    consolidate does)."""
    sd = store_load(ckpt)
    save_file(sd, out, metadata={"format": "pt"})
    fsync_path(out)


@dataclass
class ConsolidateResult:
    t: TimingSamples = field(default_factory=TimingSamples)
    peak: Samples = field(default_factory=Samples)
    baseline: Samples = field(default_factory=Samples)
    out_bytes: int = 0


def run_consolidate(
    state: State, scratch: str, args: argparse.Namespace, cache: PageCache
) -> dict[str, ConsolidateResult]:
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    ckpt = os.path.join(scratch, "consolidate-src")
    store_save(state, ckpt, store_plan(shapes, 1))
    results: dict[str, ConsolidateResult] = {}
    for rep in range(args.repeats):
        quiet(args)
        for mode in CONSOLIDATE_MODES:
            out = os.path.join(scratch, f"{mode}.safetensors")
            cache.evict([ckpt])
            settle(args.settle)
            r = run_child(child_argv(mode, ckpt, out))
            if mode == "streaming-lean" and r["torch_imported"]:
                raise AssertionError("consolidate imported torch; the lean row would be wrong")
            c = results.setdefault(mode, ConsolidateResult())
            c.t.add(Timing(r["wall"], r["cpu"]))
            c.peak.add(r["peak_rss_bytes"])
            c.baseline.add(r["baseline_rss_bytes"])
            c.out_bytes = r["out_bytes"]
            if rep == 0:
                check_safetensors(state, out, mode)
            remove(out)
            progress(f"round {rep + 1}/{args.repeats} consolidate {mode}: {r['wall']:.2f}s")
    remove(ckpt)
    return results


def check_safetensors(state: State, path: str, mode: str) -> None:
    import safetensors.torch

    check_equal(state, safetensors.torch.load_file(path), f"consolidate {mode}")


# ---------------------------------------------------------------------------------------------
# Files per rank, and S3


@dataclass
class FileCount:
    label: str
    groups: int
    per_rank: dict[int, int]
    total: int  # every file of the step directory (rank 0's metadata and the manifest too)


def count_files(state: State, scratch: str) -> list[FileCount]:
    """One untimed save per layout: how many files each rank writes."""
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    out = []
    for label, plan in (
        (WS1, store_plan(shapes, 1)),
        (WS2, store_plan(shapes, 2)),
        (STAGE3, store_plan(shapes, 1, stage3=True)),
        ("zshard store, stage 3 layout, world size 2", store_plan(shapes, 2, stage3=True)),
    ):
        path = os.path.join(scratch, "count")
        store_save(state, path, plan)
        step = CheckpointReader.open(path).url
        total = sum(len(names) for _, _, names in os.walk(step))
        out.append(FileCount(label, len(plan.layout.groups), files_per_rank(path), total))
        remove(path)
    return out


def files_table(counts: list[FileCount]) -> str:
    rows = [
        [
            c.label,
            c.groups,
            ", ".join(f"{r}: {n}" for r, n in sorted(c.per_rank.items())),
            c.total,
        ]
        for c in counts
    ]
    head = ["layout", "flat groups", "files per rank (rank: files)", "files in the step dir"]
    return markdown_table(head, rows)


@contextlib.contextmanager
def moto_process() -> Iterator[str]:
    """A moto S3 server in its own process on 127.0.0.1; yields the endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def s3_setup(endpoint: str) -> str:
    """Point fsspec at ``endpoint`` (dummy keys, nothing outside 127.0.0.1); a new bucket."""
    import boto3
    import fsspec.config
    import s3fs

    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        FSSPEC_S3_ENDPOINT_URL=endpoint,
    )
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket="bench-store"
    )
    return "s3://bench-store"


def s3fs_save(fs: object, local: str, url: str) -> None:
    fs.put_file(local, url)  # type: ignore[attr-defined]


def s3fs_load(fs: object, url: str, shapes: dict[str, tuple[int, ...]]) -> State:
    """One object, s3fs's ``cat_file`` (concurrent ranged GETs above its 50 MiB block size),
    then every tensor as a view of the bytes."""
    data = fs.cat_file(url)  # type: ignore[attr-defined]
    out, pos = {}, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only views of the bytes: no copy, a floor
        for name, shape in shapes.items():
            n = math.prod(shape)
            a = np.frombuffer(data, dtype=np.float32, count=n, offset=pos)
            out[name] = torch.from_numpy(a).view(shape)
            pos += 4 * n
    return out


S3_RAW = "s3fs put_file / cat_file, one object"
S3_STORE = "zshard store, world size 1, S3"
S3_STAGE3 = "zshard store, stage 3 layout, world size 1, S3"


def run_s3_rounds(
    state: State, scratch: str, args: argparse.Namespace
) -> tuple[dict[str, Row], dict[str, Row]]:
    """The store against s3fs on one object, on a moto server in its own process."""
    import s3fs

    shapes = {n: tuple(t.shape) for n, t in state.items()}
    plan1, plan3 = store_plan(shapes, 1), store_plan(shapes, 1, stage3=True)
    local = os.path.join(scratch, "s3-raw.bin")
    raw_save_pieces(state, local)  # the bytes s3fs uploads, in the page cache (not timed)
    nbytes = state_bytes(state)
    saves = {
        k: Row(Phase(k, "raw" if k == S3_RAW else "target")) for k in (S3_RAW, S3_STORE, S3_STAGE3)
    }
    loads = {
        k: Row(Phase(k, "raw" if k == S3_RAW else "target")) for k in (S3_RAW, S3_STORE, S3_STAGE3)
    }
    with moto_process() as endpoint:
        bucket = s3_setup(endpoint)
        fs = s3fs.S3FileSystem()
        jobs: dict[str, tuple[Callable[[str], None], Callable[[str], State]]] = {
            S3_RAW: (lambda u: s3fs_save(fs, local, u), lambda u: s3fs_load(fs, u, shapes)),
            S3_STORE: (lambda u: store_save(state, u, plan1), store_load),
            S3_STAGE3: (lambda u: store_save(state, u, plan3), store_load),
        }
        for label, (save, load) in jobs.items():  # warm-up: connections, code paths
            url = f"{bucket}/warmup-{len(label)}"
            save(url)
            check_equal(state, load(url), f"S3 warm-up {label}")
            fs.rm(url, recursive=True)
        for rep in range(args.repeats):
            quiet(args)
            for i, label in enumerate(random.Random(100 + rep).sample(list(jobs), len(jobs))):
                save, load = jobs[label]
                url = f"{bucket}/r{rep}-{i}"
                settle(args.settle)
                t_save, _ = timed(lambda save=save, url=url: save(url))
                settle(args.settle)
                t_load, loaded = timed(lambda load=load, url=url: load(url))
                check_equal(state, loaded, f"S3 {label}")
                del loaded
                saves[label].t.add(t_save)
                loads[label].t.add(t_load)
                saves[label].disk_bytes = loads[label].disk_bytes = nbytes
                fs.rm(url, recursive=True)
                progress(
                    f"S3 round {rep + 1}/{args.repeats} {label}: save {t_save.wall:.2f}s, "
                    f"load {t_load.wall:.2f}s"
                )
    remove(local)
    return saves, loads


# ---------------------------------------------------------------------------------------------
# Report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def io_table(
    kind: str, rows: dict[str, Row], nbytes: int, target: float, size_label: str = "MiB on disk"
) -> str:
    # "raw" is the faster raw baseline: the store must come close to the best plain I/O.
    raw_wall = min(r.t.wall.median for r in rows.values() if r.phase.role == "raw")
    out = []
    for label, row in rows.items():
        wall = row.t.wall.median
        ratio = raw_wall / wall  # throughput relative to raw; the target is a minimum
        judged = {
            "target": f">= {target:.2f}x raw: {verdict(ratio >= target)}",
            "diagnostic": "diagnostic",
            "raw": "baseline (raw)",
            "baseline": "baseline",
        }[row.phase.role]
        out.append(
            [
                label,
                f"{row.disk_bytes / MIB:.1f}",
                row.t.wall.spread(),
                f"{row.t.cpu.median:.2f}",
                f"{gib_per_s(nbytes, wall):.2f}",
                f"{ratio:.2f}x",
                judged,
            ]
        )
    head = [kind, size_label, "wall s, median (min-max)", "CPU s", "GiB/s", "vs raw", "target"]
    return markdown_table(head, out)


def targets_table(
    saves: dict[str, Row],
    loads: dict[str, Row],
    counts: list[FileCount],
    s3: tuple[dict[str, Row], dict[str, Row]] | None,
) -> str:
    def ratio(rows: dict[str, Row], label: str) -> float:
        raw = min(r.t.wall.median for r in rows.values() if r.phase.role == "raw")
        return raw / rows[label].t.wall.median

    out = []
    for label in (WS1, WS2):
        r = ratio(saves, label)
        out.append(
            [
                f"store save >= {SAVE_TARGET}x raw, {label[14:]}",
                f"{verdict(r >= SAVE_TARGET)}: {r:.2f}x",
            ]
        )
    for label in (WS1, WS2):
        r = ratio(loads, label)
        out.append(
            [
                f"store load >= {LOAD_TARGET}x raw, {label[14:]}",
                f"{verdict(r >= LOAD_TARGET)}: {r:.2f}x",
            ]
        )
    t1, t3 = saves[WS1].t.wall.median, saves[STAGE3].t.wall.median
    out.append(
        [
            f"stage-3 layout save <= {STAGE3_TARGET}x stage-1 save (world size 1)",
            f"{verdict(t3 <= STAGE3_TARGET * t1)}: {t3 / t1:.2f}x ({t3:.2f} s vs {t1:.2f} s)",
        ]
    )
    by = {c.label: c for c in counts}
    one = by[WS1].per_rank[0]
    three = by[STAGE3].per_rank[0]
    out.append(
        [
            "files per rank independent of the number of modules",
            f"{verdict(one == three)}: {one} with {by[WS1].groups} group, {three} with "
            f"{by[STAGE3].groups} groups",
        ]
    )
    if s3 is not None:
        for kind, rows in zip(("save", "load"), s3):
            for label in (S3_STORE, S3_STAGE3):
                r = ratio(rows, label)
                out.append(
                    [
                        f"S3 {kind} >= {S3_TARGET}x s3fs one object, {label[13:-4]}",
                        f"{verdict(r >= S3_TARGET)}: {r:.2f}x",
                    ]
                )
    return markdown_table(["target", "result on this run"], out)


def consolidate_table(results: dict[str, ConsolidateResult], nbytes: int, largest: int) -> str:
    bound = largest + RSS_SLACK
    rows = []
    for mode, c in results.items():
        peak, base = c.peak.median, c.baseline.median
        if mode == "naive":
            judged = "baseline"
        else:
            judged = (
                f"absolute {verdict(peak <= bound)}; above imports {verdict(peak - base <= bound)}"
            )
        rows.append(
            [
                CONSOLIDATE_MODES[mode],
                f"{c.out_bytes / MIB:.1f}",
                c.t.wall.spread(),
                f"{c.t.cpu.median:.2f}",
                f"{gib_per_s(nbytes, c.t.wall.median):.2f}",
                f"{peak / MIB:.0f}",
                f"{base / MIB:.0f}",
                f"{(peak - base) / MIB:.0f}",
                judged,
            ]
        )
    head = [
        "consolidate (fresh child)",
        "MiB out",
        "wall s, median (min-max)",
        "CPU s",
        "GiB/s",
        "peak RSS MiB",
        "RSS after imports MiB",
        "peak - imports MiB",
        f"peak <= {bound / MIB:.0f} MiB",
    ]
    return markdown_table(head, rows)


@dataclass
class RunInfo:
    cache: PageCache
    load_before: str
    numpy_thp_off: bool
    load_after: str = ""


def report(
    state: State,
    scratch: str,
    args: argparse.Namespace,
    run: RunInfo,
    saves: dict[str, Row],
    loads: dict[str, Row],
    cons: dict[str, ConsolidateResult],
    counts: list[FileCount],
    s3: tuple[dict[str, Row], dict[str, Row]] | None,
    s3_state: State | None,
) -> str:
    nbytes = state_bytes(state)
    largest_name, largest = max(
        ((n, t.numel() * t.element_size()) for n, t in state.items()), key=lambda x: x[1]
    )
    info = machine_info(scratch)
    lines = [
        f"Command: `{' '.join(['python', 'tools/bench_store.py', *sys.argv[1:]])}`",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- zshard: {git_revision(os.path.dirname(os.path.abspath(__file__)), *STORE_CODE)}",
        f"- load average (1/5/15 min) before: {run.load_before}; after: {run.load_after}",
        f"- state: {len(state)} fp32 tensors, {nbytes / MIB:.1f} MiB ({nbytes} bytes); "
        f"largest {largest_name} {largest / MIB:.1f} MiB",
        f"- page cache: evicted before every load with {run.cache.how}; "
        f"{args.settle:g} s pause before every timed phase; median of {args.repeats} rounds "
        f"in shuffled order ({args.loads_per_save} local loads per save)",
        *(
            [f"- each round waited for a 1-minute load average below {args.max_load:g}"]
            if args.max_load
            else []
        ),
        "- numpy transparent huge pages: "
        + ("off (4 KiB pages, as torch)" if run.numpy_thp_off else "could not be turned off"),
        "",
        io_table("save", saves, nbytes, SAVE_TARGET),
        "",
        io_table("load", loads, nbytes, LOAD_TARGET),
        "",
        consolidate_table(cons, nbytes, largest),
        "",
        files_table(counts),
    ]
    if s3 is not None and s3_state is not None:
        n3 = state_bytes(s3_state)
        lines += [
            "",
            f"S3 (moto in its own process on 127.0.0.1), {len(s3_state)} tensors, "
            f'{n3 / MIB:.1f} MiB; "vs raw" is relative to s3fs on one object:',
            "",
            io_table("S3 save", s3[0], n3, S3_TARGET, "MiB sent"),
            "",
            io_table("S3 load", s3[1], n3, S3_TARGET, "MiB sent"),
        ]
    lines += ["", targets_table(saves, loads, counts, s3)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="state size in GiB (default 1)")
    ap.add_argument("--quick", action="store_true", help="64 MiB smoke run (overrides --size-gb)")
    ap.add_argument("--dir", default=None, help="scratch parent directory (default: system temp)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; tables report the median")
    ap.add_argument(
        "--loads-per-save",
        type=int,
        default=3,
        help="local loads timed after each save, each from a cold page cache (default 3)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="seconds to pause before each timed phase so deletes and writeback finish",
    )
    ap.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="before each round wait (up to 10 min) for the 1-minute load average to drop "
        "below this; on a shared machine other tenants' CPU use otherwise lands in the timings",
    )
    ap.add_argument("--report", default=None, help="also write the markdown report to this file")
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) rounds")
    ap.add_argument(
        "--s3-size-gb",
        type=float,
        default=0.25,
        help="state size for the S3 rounds in GiB (default 0.25; moto keeps it in memory)",
    )
    # Internal: one consolidate run inside a fresh child process.
    ap.add_argument("--child", choices=("streaming", "naive"), help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for flag in ("repeats", "loads_per_save"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    numpy_thp_off = disable_numpy_hugepages()  # children too, before they allocate anything
    if args.child:
        child_main(args.child, args.ckpt, args.out)
        return
    size = GIB // 16 if args.quick else int(args.size_gb * GIB)
    state = make_state(model_shapes(size))
    run = RunInfo(PageCache(), load_average(), numpy_thp_off)
    progress(f"page cache eviction: {run.cache.how}; load average {run.load_before}")
    with scratch_dir(args.dir, "zshard-bench-store-") as scratch:
        warm_up(scratch)
        saves, loads = run_rounds(state, scratch, args, run.cache)
        cons = run_consolidate(state, scratch, args, run.cache)
        counts = count_files(state, scratch)
        s3 = s3_state = None
        if not args.no_s3:
            s3_size = GIB // 64 if args.quick else int(args.s3_size_gb * GIB)
            s3_state = state if s3_size >= size else make_state(model_shapes(s3_size))
            s3 = run_s3_rounds(s3_state, scratch, args)
        run.load_after = load_average()
        text = report(state, scratch, args, run, saves, loads, cons, counts, s3, s3_state)
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
