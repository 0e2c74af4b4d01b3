"""Benchmark zshard's offload: step time and per-rank memory with and without it, and swap I/O
throughput against raw sequential file I/O on the same directory.

Run from the repository root (tables go to stdout as markdown; progress to stderr)::

    python tools/bench_offload.py                  # 189M-parameter GPT, 2 ranks, ~10 minutes
    python tools/bench_offload.py --quick          # tiny model, 1 round: ~1 minute
    python tools/bench_offload.py --rounds 3 --stages 2,3 --dir /nvme/tmp --json out.json

Part 1, training. The built-in GPT (``--size``; the default has 189M parameters, so bf16 AdamW
keeps 12 bytes x Ψ/2 = 1.1 GB of fp32 master + exp_avg + exp_avg_sq per rank) trains on 2 CPU
processes joined by gloo, one intra-op thread each, on random tokens seeded by step and rank.
``none`` keeps the optimizer state in memory; ``nvme`` streams it through swap files under
``--dir`` (``sub_group_size`` 2^20, ``buffer_count`` 4); at stage 3 ``nvme`` also offloads the
parameter partitions. Each run is a fresh pair of processes (this script with ``--worker``):
build, ``--warmup`` steps, then ``malloc_trim`` and a reset of the peak RSS (``clear_refs``), then
``--steps`` timed steps with a barrier before and after each (rank 0's wall time between them).
Peak RSS is ``VmHWM`` over the timed steps only: start-up (building and broadcasting the
model) peaks alike with or without offload and is not what offload changes. Configurations run
in alternating rounds (none, nvme, none, nvme, ...) because the machine is shared; tables report
medians over rounds of each run's median step.

Part 2, I/O. One process writes and reads ``--io-gib`` of fp32, alternating rounds (which of raw
and swap goes first alternates; each round starts with an untimed 1 GiB write). raw:
``ndarray.tofile`` + fsync into a new file and into the same file again, ``np.fromfile``, and
``readinto`` a preallocated array. swap: a ``SwapArray`` (a store shard, crc32c per chunk)
written in sub-groups through the engine's writer + one fsync, as a first version and as the
next version (overwritten in place: what every optimizer step does), then read sub-group by
sub-group with ``read_shard_range`` into one reused buffer (crc32c verified). Before every read
the file is fsynced and evicted from the page cache (``posix_fadvise(DONTNEED)``), so reads come
from the device.

Targets (printed PASS/FAIL): offload step time <= 1.5x in-memory at the same stage; per-rank peak
RSS down by >= 90% of the offloaded bytes; swap write (overwrite and first version, each against
raw ``tofile`` + fsync of the same kind) and read (against ``np.fromfile``) >= 0.8x raw.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from _bench_util import (
    GIB,
    MIB,
    RESULT_MARKER,
    disable_numpy_hugepages,
    fsync_path,
    gib_per_s,
    load_average,
    machine_info,
    markdown_table,
    peak_rss_bytes,
    remove,
    reset_peak_rss,
    rss_bytes,
    run_workers,
    scratch_dir,
    settle,
)

WORLD = 2
STEP_TARGET, RSS_TARGET, IO_TARGET = 1.5, 0.9, 0.8
SUB_GROUP, BUFFERS = 1 << 20, 4
# name -> GPTConfig(vocab_size, seq_len, n_layer, n_head, d_model)
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (256, 64, 2, 2, 128),
    "189m": (256, 128, 15, 16, 1024),
}


def progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


# =============================================================================================
# Part 1: training workers


@dataclass(frozen=True)
class Spec:
    offload: str  # none | nvme
    stage: int
    size: str
    micro_batch: int
    warmup: int
    steps: int
    swap_dir: str


def _config(spec: Spec) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": spec.stage}
    if spec.offload == "nvme":
        block = {"device": "nvme", "path": spec.swap_dir, "buffer_count": BUFFERS}
        zero["offload_optimizer"] = {**block, "sub_group_size": SUB_GROUP}
        if spec.stage == 3:
            zero["offload_param"] = block
    return {
        "zero": zero,
        "precision": "bf16",
        "optimizer": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.01},
        "train": {
            "micro_batch_size": spec.micro_batch,
            "global_batch_size": spec.micro_batch * WORLD,
        },
        "dist": {"backend": "gloo", "device": "cpu"},
    }


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _malloc_trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def worker(spec: Spec) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import zshard.train as zt
    from zshard.train.models.gpt import GPTConfig, build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    v, t, n_layer, n_head, d = SIZES[spec.size]
    gcfg = GPTConfig(vocab_size=v, seq_len=t, n_layer=n_layer, n_head=n_head, d_model=d)
    t0 = time.perf_counter()
    engine = zt.initialize(config=_config(spec), model_factory=lambda: build_model(gcfg))
    build_s = time.perf_counter() - t0
    times: list[float] = []
    phases: list[tuple[float, float, float, float]] = []
    for i in range(spec.warmup + spec.steps):
        if i == spec.warmup:
            _malloc_trim()
            reset_peak_rss()
            rss_start = rss_bytes()
        g = torch.Generator().manual_seed(10_000 * i + rank)
        xy = torch.randint(0, v, (spec.micro_batch, t + 1), generator=g)
        dist.barrier()
        t1, c1 = time.perf_counter(), _cpu_s()
        engine.backward(engine(xy[:, :-1], xy[:, 1:]))
        t2, c2 = time.perf_counter(), _cpu_s()
        engine.step()
        t3, c3 = time.perf_counter(), _cpu_s()
        dist.barrier()
        times.append(time.perf_counter() - t1)
        phases.append((t2 - t1, t3 - t2, c2 - c1, c3 - c2))
    out = {
        "rank": rank,
        "params": sum(g.numel for g in engine.groups),
        "build_s": build_s,
        "step_s": times[spec.warmup :],
        # (forward+backward wall, optimizer step wall, and the CPU seconds of each)
        "phases": phases[spec.warmup :],
        "peak_rss": peak_rss_bytes(),
        "rss_start": rss_start,
        "memory_report": engine.memory_report(),
    }
    engine.close()
    dist.barrier()
    dist.destroy_process_group()
    return out


def run_pair(spec: Spec, timeout: float) -> list[dict[str, Any]]:
    """Both ranks in fresh processes; their results in rank order."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argv = [os.path.abspath(__file__), "--worker", json.dumps(spec.__dict__)]
    return run_workers(argv, WORLD, timeout=timeout, env=env, label=str(spec))


# =============================================================================================
# Part 2: swap I/O versus raw file I/O


def _evict(path: str) -> None:
    """fsync, then drop the file's pages from the page cache (this file only: the machine is
    shared, so no global drop_caches)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def io_round(directory: str, nbytes: int, swap_first: bool) -> dict[str, float]:
    """Seconds for each way of writing then reading ``nbytes`` of fp32 (one round).

    raw: ``tofile`` + fsync into a new file (create) and into the same file again (overwrite),
    then ``np.fromfile`` (a new array, as the task states) and ``readinto`` a preallocated array
    (no page faults: the stricter baseline). swap: a ``SwapArray`` written in sub-groups
    (crc32c per chunk) + fsync, first version (create) and next version (overwrite in place, what
    every optimizer step does), then read back sub-group by sub-group with ``read_shard_range``
    (crc32c verified) into one buffer, the way the step reads it. Reads start from evicted files.
    """
    import numpy as np

    from zshard.store.dtypes import dtype
    from zshard.store.layout import FlatGroup, plan_partition
    from zshard.train.offload._swap import ScratchStorage, SwapArray

    numel = nbytes // 4
    data = np.random.default_rng(0).standard_normal(numel, dtype=np.float32)
    into = np.empty_like(data)
    into.fill(0)  # fault the pages in now, not during the timed read
    out: dict[str, float] = {}

    def raw() -> None:
        path = os.path.join(directory, "raw.bin")
        for op, mode in (("raw_create", "wb"), ("raw_overwrite", "r+b")):
            os.sync()
            t = time.perf_counter()
            with open(path, mode) as f:
                data.tofile(f)
                f.flush()
                os.fsync(f.fileno())
            out[op] = time.perf_counter() - t
        _evict(path)
        t = time.perf_counter()
        back = np.fromfile(path, dtype=np.float32)
        out["raw_read_fromfile"] = time.perf_counter() - t
        assert back.size == numel
        del back
        _evict(path)
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            f.readinto(memoryview(into).cast("B"))
        out["raw_read_into"] = time.perf_counter() - t
        remove(path)  # and sync: freeing the blocks is not billed to the next write

    def swap() -> None:
        partition, chunk = plan_partition(numel, 1)
        group = FlatGroup("bench", partition, chunk)
        storage = ScratchStorage(os.path.join(directory, "swap"))
        arr = SwapArray(storage, "bench/exp_avg", group, dtype("float32"), "exp_avg")
        sub = max(chunk, SUB_GROUP // chunk * chunk)
        path = os.path.join(directory, "swap", "bench", "exp_avg")
        # The first version creates the file; every step after overwrites it in place.
        for op in ("swap_create", "swap_overwrite"):
            os.sync()
            t = time.perf_counter()
            w = arr.writer()
            for a in range(0, numel, sub):
                w.write(data[a : a + sub])
            w.close()
            fsync_path(path)
            out[op] = time.perf_counter() - t
        _evict(path)
        buf = np.empty(sub, dtype=np.float32)
        t = time.perf_counter()
        for a in range(0, numel, sub):
            n = min(sub, numel - a)
            arr.read(a, buf[:n])
        out["swap_read"] = time.perf_counter() - t
        assert np.array_equal(buf[:n], data[numel - n :])
        remove(os.path.join(directory, "swap"))

    # Untimed: the first write of a round pays for page-cache pages the VM has just handed
    # back to the host (they fault in again); whichever method came first was slower.
    warm = os.path.join(directory, "warm.bin")
    with open(warm, "wb") as f:
        data.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    _evict(warm)
    remove(warm)
    for fn in (swap, raw) if swap_first else (raw, swap):
        fn()
        settle(0.5)
    return out


# =============================================================================================
# Reporting


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _train_rows(
    args: argparse.Namespace, runs: dict[tuple[int, str], list[list[dict[str, Any]]]]
) -> tuple[list[list[str]], list[tuple[str, bool]], dict[str, Any]]:
    rows, verdicts, summary = [], [], {}
    for stage in args.stages:
        med: dict[str, dict[str, Any]] = {}
        for mode in ("none", "nvme"):
            rounds = runs[(stage, mode)]
            per_round = [_median(r[0]["step_s"]) for r in rounds]
            cpu = [_median([p[2] + p[3] for p in r[0]["phases"]]) for r in rounds]
            opt_cpu = [_median([p[3] for p in r[0]["phases"]]) for r in rounds]
            med[mode] = {
                "step": _median(per_round),
                "step_rounds": per_round,
                "cpu": _median(cpu),
                "opt_cpu": _median(opt_cpu),
                "peaks": [_median([r[k]["peak_rss"] for r in rounds]) for k in range(WORLD)],
                "offloaded": _median([r[0]["memory_report"]["offloaded"] for r in rounds]),
                "slots": _median([r[0]["memory_report"]["offload_buffers"] for r in rounds]),
            }
            m = med[mode]
            rows.append(
                [
                    f"{stage}",
                    mode,
                    f"{m['step']:.2f} ({min(per_round):.2f}-{max(per_round):.2f})",
                    f"{m['cpu']:.2f} ({m['opt_cpu']:.2f})",
                    " / ".join(f"{p / GIB:.2f}" for p in m["peaks"]),
                    f"{m['offloaded'] / GIB:.2f}",
                    f"{m['slots'] / MIB:.0f}",
                ]
            )
        ratio = med["nvme"]["step"] / med["none"]["step"]
        cpu_ratio = med["nvme"]["cpu"] / med["none"]["cpu"]
        drop = min(med["none"]["peaks"][k] - med["nvme"]["peaks"][k] for k in range(WORLD))
        frac = drop / med["nvme"]["offloaded"]
        verdicts.append(
            (
                f"stage {stage}: offload step time {ratio:.2f}x in-memory, wall clock (CPU "
                f"seconds per step: {cpu_ratio:.2f}x); target <= {STEP_TARGET}x",
                ratio <= STEP_TARGET,
            )
        )
        verdicts.append(
            (
                f"stage {stage}: peak RSS down {drop / GIB:.2f} GiB per rank = {frac:.0%} of the "
                f"{med['nvme']['offloaded'] / GIB:.2f} GiB offloaded; target >= {RSS_TARGET:.0%}",
                frac >= RSS_TARGET,
            )
        )
        summary[stage] = {"ratio": ratio, "cpu_ratio": cpu_ratio, "rss_drop": frac, **med}
    return rows, verdicts, summary


def report(
    args: argparse.Namespace,
    runs: dict[tuple[int, str], list[list[dict[str, Any]]]],
    io: list[dict[str, float]],
    scratch: str,
) -> tuple[str, dict[str, Any]]:
    info = machine_info(scratch)
    lines = ["Machine: " + "; ".join(f"{k} {v}" for k, v in info.items())]
    lines.append(f"Load average at the end: {load_average()} (2 cores, shared with other work)")
    _, seq, n_layer, _, d = SIZES[args.size]
    params = runs[(args.stages[0], "none")][0][0]["params"]
    rows, verdicts, train = _train_rows(args, runs)
    lines += [
        "",
        f"Training: GPT {params / 1e6:.0f}M parameters (n_layer {n_layer}, d_model {d}, seq "
        f"{seq}), bf16 with fp32 AdamW, {WORLD} ranks on CPU/gloo (1 thread each), micro batch "
        f"{args.micro_batch}, {args.steps} timed steps after {args.warmup} warm-up, "
        f"{args.rounds} alternating rounds; offload nvme = swap files under {scratch} "
        f"(sub_group_size {SUB_GROUP}, buffer_count {BUFFERS}; stage 3 also offloads params).",
        "",
        markdown_table(
            [
                "stage",
                "offload",
                "step s, median (rounds' range)",
                "CPU s/step (optimizer)",
                "peak RSS GiB, rank 0 / 1",
                "offloaded GiB/rank",
                "slots MiB",
            ],
            rows,
        ),
    ]
    gib = args.io_gib * GIB
    io_med = {k: _median([r[k] for r in io]) for k in io[0]}
    speed = {k: gib_per_s(int(gib), v) for k, v in io_med.items()}
    pairs = [
        ("write, new file", "tofile + fsync", "raw_create", "swap_create"),
        ("write, existing file", "tofile + fsync", "raw_overwrite", "swap_overwrite"),
        ("read", "fromfile", "raw_read_fromfile", "swap_read"),
        ("read", "readinto (preallocated)", "raw_read_into", "swap_read"),
    ]
    io_rows = []
    for op, method, raw_key, swap_key in pairs:
        r = speed[swap_key] / speed[raw_key]
        io_rows.append([op, method, f"{speed[raw_key]:.2f}", f"{speed[swap_key]:.2f}", f"{r:.2f}x"])
    # The targets: what a step does (overwrite in place, read) against the task's baselines.
    for text, raw_key, swap_key in (
        ("write (overwrite, as every step)", "raw_overwrite", "swap_overwrite"),
        ("write (first version)", "raw_create", "swap_create"),
        ("read", "raw_read_fromfile", "swap_read"),
    ):
        r = speed[swap_key] / speed[raw_key]
        verdicts.append(
            (
                f"swap {text} {speed[swap_key]:.2f} GiB/s = {r:.2f}x raw; target >= {IO_TARGET}x",
                r >= IO_TARGET,
            )
        )
    lines += [
        "",
        f"I/O: {args.io_gib:g} GiB of fp32 on the same directory, {args.io_rounds} rounds, "
        "medians; every file fsynced and evicted with posix_fadvise(DONTNEED) before it is "
        "read; raw and swap alternate which goes first.",
        "",
        markdown_table(["op", "raw method", "raw GiB/s", "swap GiB/s", "swap / raw"], io_rows),
        "",
        *[f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in verdicts],
    ]
    summary = {
        "machine": info,
        "train": train,
        "io_gib_s": speed,
        "verdicts": [{"text": t, "pass": ok} for t, ok in verdicts],
    }
    return "\n".join(lines), summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="189m", choices=sorted(SIZES))
    ap.add_argument("--stages", default="2", help="comma-separated ZeRO stages (1-3)")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--io-gib", type=float, default=1.0)
    ap.add_argument("--io-rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch parent directory (default: system temp)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny model, one round")
    args = ap.parse_args()
    disable_numpy_hugepages()
    if args.worker:
        spec = Spec(**json.loads(args.worker))
        print(RESULT_MARKER + json.dumps(worker(spec)), flush=True)
        return
    if args.quick:
        args.size, args.rounds, args.steps, args.io_gib, args.io_rounds = "tiny", 1, 2, 0.25, 1
    args.stages = [int(s) for s in str(args.stages).split(",")]
    with scratch_dir(args.dir, "zshard-bench-offload-") as scratch:
        runs: dict[tuple[int, str], list[list[dict]]] = {}
        for rnd in range(args.rounds):
            for stage in args.stages:
                for mode in ("none", "nvme"):
                    spec = Spec(
                        mode,
                        stage,
                        args.size,
                        args.micro_batch,
                        args.warmup,
                        args.steps,
                        os.path.join(scratch, "swap"),
                    )
                    res = run_pair(spec, timeout=3600)
                    runs.setdefault((stage, mode), []).append(res)
                    peaks = [round(r["peak_rss"] / GIB, 2) for r in res]
                    step = _median(res[0]["step_s"])
                    progress(
                        f"round {rnd + 1}: stage {stage} {mode}: {step:.2f} s/step, {peaks} GiB"
                    )
        io = []
        for rnd in range(args.io_rounds):
            r = io_round(scratch, int(args.io_gib * GIB), swap_first=rnd % 2 == 1)
            io.append(r)
            progress(f"io round {rnd + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in r.items()))
        text, summary = report(args, runs, io, scratch)
    print(f"Command: python tools/bench_offload.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "summary": summary,
                    "runs": {f"{s}-{m}": v for (s, m), v in runs.items()},
                    "io": io,
                },
                f,
                indent=1,
                default=str,
            )


if __name__ == "__main__":
    main()
