"""Benchmark the zshard store: save, load and consolidate, against raw I/O, torch.save and DCP.

Run from the repository root (results go to stdout as markdown tables)::

    python tools/bench_store.py                 # 1 GiB of fp32 state, about 5 minutes
    python tools/bench_store.py --quick         # 64 MiB smoke run, under a minute
    python tools/bench_store.py --size-gb 2 --dir /mnt/scratch --repeats 3 --report out.md

One run builds one transformer-like fp32 state dict (GPT-2-style names and shapes: two large
embeddings, many medium matrices, small norms and biases) and, on those same bytes, measures:

* save and load through ``CheckpointWriter``/``CheckpointReader`` for world size 1, and world
  size 2 simulated in this one process (rank 0's shard, then rank 1's: one process owns each
  shard), the store's own fsync included;
* raw sequential I/O (``tofile`` into one file + fsync; ``np.fromfile``), ``torch.save`` (+ fsync)
  / ``torch.load(weights_only=True)``, and ``torch.distributed.checkpoint`` without a process
  group (its FileSystemWriter fsyncs every file by default);
* ``consolidate(..., dtype="fp32")`` versus "read everything, then ``safetensors`` save_file",
  each in a fresh child process that reports its own peak RSS and its RSS after imports.

Every written file is evicted from the page cache before it is read (``drop_caches`` when
permitted, else ``posix_fadvise(DONTNEED)``), methods are interleaved round by round, and each
number is the median of ``--repeats`` runs, so slow drift of the machine hits every method alike.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from collections.abc import Callable
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
    emit_child_result,
    fsync_path,
    gib_per_s,
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
)

from zshard.store import ArrayEntry, CheckpointReader, CheckpointWriter, Layout, TensorEntry, pack
from zshard.store.dtypes import dtype as store_dtype
from zshard.store.layout import Fragment
from zshard.store.shard import read_shard_range, shard_key

State = dict[str, torch.Tensor]
GROUP, KIND = "g0000", "param"
SAVE_TARGET = LOAD_TARGET = 0.9  # store throughput as a fraction of raw I/O
RSS_SLACK = 256 * MIB  # consolidate peak RSS target: largest tensor + this
RAW_SAVE, RAW_LOAD = "raw tofile + fsync", "raw np.fromfile"


def progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


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
    if list(got) != list(want) and sorted(got) != sorted(want):
        raise AssertionError(f"{what}: loaded names differ from the saved ones")
    for name, t in want.items():
        if got[name].shape != t.shape or not torch.equal(got[name], t):
            raise AssertionError(f"{what}: tensor {name} differs after the round trip")


# ---------------------------------------------------------------------------------------------
# Baselines


def raw_save(state: State, path: str) -> None:
    with open(path, "wb") as f:
        for t in state.values():
            t.numpy().tofile(f)
        f.flush()
        os.fsync(f.fileno())


def raw_load(path: str, shapes: dict[str, tuple[int, ...]]) -> State:
    flat = np.fromfile(path, dtype=np.float32)
    out, pos = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = torch.from_numpy(flat[pos : pos + n]).view(shape)
        pos += n
    return out


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
    """Computed once per job, like an engine's layout: one flat fp32 group, state kind param."""

    layout: Layout
    arrays: tuple[ArrayEntry, ...]
    tensors: tuple[TensorEntry, ...]
    frags: dict[str, list[Fragment]]


def store_plan(shapes: dict[str, tuple[int, ...]], world_size: int) -> StorePlan:
    group, frags = pack(GROUP, [(n, math.prod(s)) for n, s in shapes.items()], world_size)
    tensors = tuple(TensorEntry(n, KIND, s, "float32", tuple(frags[n])) for n, s in shapes.items())
    layout = Layout(world_size, 1, (group,))
    return StorePlan(layout, (ArrayEntry(GROUP, KIND, "float32"),), tensors, frags)


def store_save(state: State, root: str, plan: StorePlan) -> None:
    writer = CheckpointWriter(root, 1, plan.layout, plan.arrays, plan.tensors)
    writer.prepare()
    # In a job each rank writes its own shard concurrently; here one process writes them in
    # turn, so the time is comparable to one process doing raw I/O on the same bytes.
    for rank in range(plan.layout.world_size):
        write_rank_shard(writer, state, plan, rank)
    writer.commit()


def write_rank_shard(writer: CheckpointWriter, state: State, plan: StorePlan, rank: int) -> None:
    """Stream this rank's fragments straight from the tensors (no flat copy)."""
    w = writer.shard_writer(GROUP, KIND, rank)
    try:
        for name, t in state.items():
            flat = t.reshape(-1).numpy()
            for f in plan.frags[name]:
                if f.rank == rank:
                    w.write(flat[f.start : f.start + f.length])
        w.close()
    except BaseException:
        w.abort()
        raise


def store_load(root: str) -> State:
    """What a loader does with the public reader: every tensor, whole, into new memory."""
    r = CheckpointReader.open(root)
    return {t.name: torch.from_numpy(r.read_tensor(t.name, t.kind)) for t in r.iter_tensors()}


def store_load_partitions(root: str) -> State:
    """Diagnostic: each shard read whole into one flat buffer (verified), tensors as views.

    Uses the store's internal ``read_shard_range``; shows what a loader could get when it reads
    by shard instead of by tensor.
    """
    r = CheckpointReader.open(root)
    m = r.manifest
    g = m.layout.group(GROUP)
    a = m.array(GROUP, KIND)
    dt = store_dtype(a.dtype)
    p = g.partition_numel
    flat = np.empty(p * m.layout.world_size, dtype=dt.numpy)
    for rank in range(m.layout.world_size):
        key = shard_key(a.path, rank)
        read_shard_range(r.dir, key, g, dt, 0, flat[rank * p : (rank + 1) * p], where=key)
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
    role: str  # "target" (judged), "baseline" or "diagnostic"


@dataclass(frozen=True)
class Method:
    key: str  # file or directory name in the scratch dir
    save_phase: Phase
    save: Callable[[State, str], None]
    loads: tuple[tuple[Phase, Callable[[str], State]], ...]


@dataclass
class Row:
    phase: Phase
    disk_bytes: int = 0
    t: TimingSamples = field(default_factory=TimingSamples)


def methods(shapes: dict[str, tuple[int, ...]]) -> list[Method]:
    plan1, plan2 = store_plan(shapes, 1), store_plan(shapes, 2)
    ws1, ws2 = "zshard store, world size 1", "zshard store, world size 2 (1 process)"
    return [
        Method(
            "raw.bin",
            Phase(RAW_SAVE, "baseline"),
            raw_save,
            ((Phase(RAW_LOAD, "baseline"), lambda p: raw_load(p, shapes)),),
        ),
        Method(
            "store-ws1",
            Phase(ws1, "target"),
            lambda s, p: store_save(s, p, plan1),
            (
                (Phase(ws1, "target"), store_load),
                (Phase("zshard store, ws 1, whole shards", "diagnostic"), store_load_partitions),
            ),
        ),
        Method(
            "store-ws2",
            Phase(ws2, "target"),
            lambda s, p: store_save(s, p, plan2),
            ((Phase(ws2, "target"), store_load),),
        ),
        Method(
            "model.pt",
            Phase("torch.save + fsync", "baseline"),
            torch_save,
            ((Phase("torch.load(weights_only=True)", "baseline"), torch_load),),
        ),
        Method(
            "dcp",
            Phase("DCP save (its own fsync)", "baseline"),
            dcp_save,
            ((Phase("DCP load", "baseline"), lambda p: dcp_load(p, shapes)),),
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
        for phase, load in m.loads:
            check_equal(state, load(path), f"warm-up {phase.label}")
        remove(path)


def run_rounds(
    state: State, scratch: str, args: argparse.Namespace, cache: PageCache
) -> tuple[dict[str, Row], dict[str, Row]]:
    """Save/load rounds. Within a round every method runs once, so drift over the run (other
    tenants, the VM host) lands on all methods alike; the tables report medians over rounds."""
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    saves: dict[str, Row] = {}
    loads: dict[str, Row] = {}
    for rep in range(args.repeats):
        for m in methods(shapes):
            path = os.path.join(scratch, m.key)
            settle(args.settle)
            t, _ = timed(lambda m=m, path=path: m.save(state, path))
            row = saves.setdefault(m.save_phase.label, Row(m.save_phase))
            row.t.add(t)
            row.disk_bytes = dir_bytes(path)
            for phase, load in m.loads:
                cache.evict([path])  # a load must read the disk, not what the save cached
                settle(args.settle)
                t, loaded = timed(lambda load=load, path=path: load(path))
                lrow = loads.setdefault(phase.label, Row(phase, row.disk_bytes))
                lrow.t.add(t)
                check_equal(state, loaded, phase.label)
                del loaded
            remove(path)
            progress(f"round {rep + 1}/{args.repeats} {m.key}: save {t.wall:.2f}s")
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
from _bench_util import emit_child_result, reset_peak_rss, rss_bytes, timed
from zshard.convert.consolidate import consolidate
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
# Report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def io_table(kind: str, rows: dict[str, Row], nbytes: int, raw: str, target: float) -> str:
    raw_wall = rows[raw].t.wall.median
    out = []
    for label, row in rows.items():
        wall = row.t.wall.median
        ratio = raw_wall / wall  # throughput relative to raw; the target is a minimum
        judged = {
            "target": f">= {target:.2f}x raw: {verdict(ratio >= target)}",
            "diagnostic": "diagnostic",
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
    head = [kind, "MiB on disk", "wall s, median (min-max)", "CPU s", "GiB/s", "vs raw", "target"]
    return markdown_table(head, out)


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
    load_after: str = ""


def report(
    state: State,
    scratch: str,
    args: argparse.Namespace,
    run: RunInfo,
    saves: dict[str, Row],
    loads: dict[str, Row],
    cons: dict[str, ConsolidateResult],
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
        f"- load average (1/5/15 min) before: {run.load_before}; after: {run.load_after}",
        f"- state: {len(state)} fp32 tensors, {nbytes / MIB:.1f} MiB ({nbytes} bytes); "
        f"largest {largest_name} {largest / MIB:.1f} MiB",
        f"- page cache: evicted before every load with {run.cache.how}; "
        f"{args.settle:g} s pause before every timed phase; median of {args.repeats} rounds",
        "",
        io_table("save", saves, nbytes, RAW_SAVE, SAVE_TARGET),
        "",
        io_table("load", loads, nbytes, RAW_LOAD, LOAD_TARGET),
        "",
        consolidate_table(cons, nbytes, largest),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="state size in GiB (default 1)")
    ap.add_argument("--quick", action="store_true", help="64 MiB smoke run (overrides --size-gb)")
    ap.add_argument("--dir", default=None, help="scratch parent directory (default: system temp)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; tables report the median")
    ap.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds to pause before each timed phase so deletes and writeback finish",
    )
    ap.add_argument("--report", default=None, help="also write the markdown report to this file")
    # Internal: one consolidate run inside a fresh child process.
    ap.add_argument("--child", choices=("streaming", "naive"), help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.ckpt, args.out)
        return
    size = GIB // 16 if args.quick else int(args.size_gb * GIB)
    state = make_state(model_shapes(size))
    run = RunInfo(PageCache(), load_average())
    progress(f"page cache eviction: {run.cache.how}; load average {run.load_before}")
    with scratch_dir(args.dir, "zshard-bench-store-") as scratch:
        warm_up(scratch)
        saves, loads = run_rounds(state, scratch, args, run.cache)
        cons = run_consolidate(state, scratch, args, run.cache)
        run.load_after = load_average()
        text = report(state, scratch, args, run, saves, loads, cons)
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
