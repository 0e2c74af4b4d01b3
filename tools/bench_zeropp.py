"""Benchmark ZeRO++ (qwZ, hpZ, qgZ) against plain ZeRO stage 3: bytes inside and across nodes.

Run from the repository root (a markdown table on stdout, progress on stderr)::

    python tools/bench_zeropp.py                   # GPT 4x256 (3.3M parameters), 20 steps
    python tools/bench_zeropp.py --quick           # tiny GPT, 1 warm-up + 2 steps: a smoke run
    python tools/bench_zeropp.py --variants plain,all --steps 50 --json out.json

Every variant trains the built-in GPT on the built-in text, bf16 mixed precision with fp32
master weights and AdamW, ZeRO stage 3 with every module gathered (``param_persistence_threshold``
0), on 4 CPU processes joined by gloo on 127.0.0.1 and arranged as **2 nodes of 2 ranks**
(``LOCAL_WORLD_SIZE=2``: what ``Comm`` and ZeRO++ take a node to be). Variants:

* ``plain``: stage 3;
* ``qwz``: ``zero.quantized_weights`` (int8 all-gathers, one fp32 scale per 2048 elements);
* ``hpz``: ``zero.hpz_partition_size: 2`` (backward all-gathers inside the node);
* ``qgz``: ``zero.quantized_gradients`` (int4 by default, ``--grad-bits``);
* ``all``: the three together.

Each variant is a fresh group of processes (this script with ``--worker``). Collectives are the
native ones (``ZSHARD_COLLECTIVES=native``: gloo's own all-gather and reduce-scatter), so each
kind is counted as itself. Bytes are ``Comm``'s exact counters (``engine.stats()``), read around
each forward, backward and optimizer step: ``bytes`` is what the rank handed to
torch.distributed (an all-gather's or reduce-scatter's whole N-chunk buffer; an all-to-all's send
buffer), ``across`` the part exchanged with ranks of the other node, ``inside`` the rest (its own
chunk included). Phases: forward all-gathers, backward all-gathers, gradient reduction
(reduce-scatter or qgZ's all-to-alls, wherever they start), and the rest (the gradient norm's
all-reduce). Per step and per rank, averaged over the timed steps; counters are the same on every
rank, rank 0's are shown. Step time is rank 0's wall time between barriers; CPU s/step its own
process CPU time (all threads); peak RSS the largest of the 4 ranks' ``VmHWM``; loss the mean over
ranks of the last step's loss.

Goals (printed PASS/FAIL, measured on bytes, so independent of the machine): across-node bytes
with all three <= 0.25x plain; qwZ forward all-gather bytes ~0.5x plain (bf16); hpZ backward
all-gather across nodes 0; qgZ gradient bytes across nodes <= 0.25x plain (int4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from _bench_util import (
    emit_child_result,
    load_average,
    markdown_table,
    peak_rss_bytes,
    run_workers,
)

WORLD, NODE = 4, 2
SIZES = {"tiny": (2, 2, 64, 32), "default": (4, 4, 256, 128)}  # n_layer, n_head, d_model, seq
VARIANTS = ["plain", "qwz", "hpz", "qgz", "all"]
PHASES = ("fwd_gather", "bwd_gather", "grad", "other")


def zero_section(variant: str, grad_bits: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": 3, "param_persistence_threshold": 0}
    if variant in ("qwz", "all"):
        zero["quantized_weights"] = True
    if variant in ("hpz", "all"):
        zero["hpz_partition_size"] = NODE
    if variant in ("qgz", "all"):
        zero["quantized_gradients"] = True
        zero["quantized_gradients_bits"] = grad_bits
    return zero


# -- worker -------------------------------------------------------------------------------------


def _phase_delta(now: dict[str, Any], before: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {k: {f: now[k][f] - before[k][f] for f in ("bytes", "cross_node_bytes")} for k in now}


def _add(acc: dict[str, list[int]], phase: str, nbytes: int, cross: int) -> None:
    acc[phase][0] += nbytes
    acc[phase][1] += cross


def worker(args: argparse.Namespace) -> None:
    rank = int(os.environ["RANK"])
    os.environ["LOCAL_WORLD_SIZE"] = str(NODE)  # two nodes of two ranks
    os.environ["LOCAL_RANK"] = str(rank % NODE)
    os.environ["ZSHARD_COLLECTIVES"] = "native"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import zshard.train as zt
    from zshard.train.config import load_config
    from zshard.train.data import GlobalBatchSampler, collate
    from zshard.train.run._loop import build

    n_layer, n_head, d_model, seq = SIZES[args.size]
    cfg = load_config(
        {
            "model": {
                "name": "gpt",
                "args": {"n_layer": n_layer, "n_head": n_head, "d_model": d_model},
            },
            "data": {"name": "builtin", "seq_len": seq},
            "train": {
                "steps": args.warmup + args.steps,
                "micro_batch_size": args.micro_batch,
                "global_batch_size": args.micro_batch * WORLD,
                "seed": 0,
            },
            "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.01},
            "precision": "bf16",
            "zero": zero_section(args.worker, args.grad_bits),
        }
    )
    factory, dataset, _ = build(cfg)
    engine = zt.initialize(None, cfg, model_factory=factory)
    micro, accum, global_batch = cfg.train.resolve_batch(WORLD)
    sampler = GlobalBatchSampler(len(dataset), global_batch, cfg.train.seed)
    acc = {p: [0, 0] for p in PHASES}
    walls, cpus, loss_value = [], [], float("nan")
    for step in range(args.warmup + args.steps):
        timed = step >= args.warmup
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        total = 0.0
        for a in range(accum):
            x, y = collate(dataset, sampler.micro_batch(step, rank, WORLD, micro, a))
            c = engine.comm.counters()
            loss = engine(x, y)
            f = engine.comm.counters()
            engine.backward(loss)
            b = engine.comm.counters()
            total += float(loss.detach().float())
            if timed:
                fwd, bwd = _phase_delta(f, c), _phase_delta(b, f)
                _add(
                    acc,
                    "fwd_gather",
                    fwd["all_gather"]["bytes"],
                    fwd["all_gather"]["cross_node_bytes"],
                )
                _add(
                    acc,
                    "bwd_gather",
                    bwd["all_gather"]["bytes"],
                    bwd["all_gather"]["cross_node_bytes"],
                )
                for kind in ("reduce_scatter", "all_to_all"):
                    _add(acc, "grad", bwd[kind]["bytes"], bwd[kind]["cross_node_bytes"])
                for kind in ("all_reduce", "reduce", "broadcast"):
                    _add(
                        acc,
                        "other",
                        fwd[kind]["bytes"] + bwd[kind]["bytes"],
                        fwd[kind]["cross_node_bytes"] + bwd[kind]["cross_node_bytes"],
                    )
        s0 = engine.comm.counters()
        engine.step()
        s1 = engine.comm.counters()
        dist.barrier()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        t = torch.tensor([total / accum], dtype=torch.float64)
        dist.all_reduce(t)
        loss_value = float(t.item()) / WORLD
        if timed:
            walls.append(wall)
            cpus.append(cpu)
            st = _phase_delta(s1, s0)
            for kind in ("reduce_scatter", "all_to_all"):  # qgZ's second hops start here
                _add(acc, "grad", st[kind]["bytes"], st[kind]["cross_node_bytes"])
            for kind in ("all_reduce", "all_gather", "reduce", "broadcast"):
                _add(acc, "other", st[kind]["bytes"], st[kind]["cross_node_bytes"])
    per_step = {p: [v / args.steps for v in acc[p]] for p in PHASES}
    memory = engine.memory_report()
    params = sum(g.numel for g in engine.groups)
    engine.close()
    emit_child_result(
        rank=rank,
        variant=args.worker,
        params=params,
        bytes=per_step,
        step_s=sorted(walls)[len(walls) // 2] if walls else 0.0,
        cpu_s=sum(cpus) / max(1, len(cpus)),
        loss=loss_value,
        hpz_secondary=memory["hpz_secondary"],
        comm_buffers=memory["comm_buffers"],
        worker_peak_rss=peak_rss_bytes(),
    )
    dist.destroy_process_group()


# -- driver -------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}"


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [
        os.path.abspath(__file__),
        "--worker",
        variant,
        "--size",
        args.size,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--micro-batch",
        str(args.micro_batch),
        "--grad-bits",
        str(args.grad_bits),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = run_workers(argv, WORLD, timeout=args.timeout, env=env, label=variant)
    r0 = dict(res[0])
    r0["peak_rss"] = max(r["peak_rss_bytes"] for r in res)
    return r0


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> tuple[str, list[str]]:
    rows = []
    for v, r in results.items():
        b = r["bytes"]
        total = sum(x[0] for x in b.values())
        across = sum(x[1] for x in b.values())
        rows.append(
            [
                v,
                _mb(total - across),
                _mb(across),
                *(f"{_mb(b[p][0] - b[p][1])} / {_mb(b[p][1])}" for p in PHASES[:3]),
                f"{r['step_s']:.3f}",
                f"{r['cpu_s']:.3f}",
                f"{r['peak_rss'] / 2**20:.0f}",
                f"{r['loss']:.4f}",
            ]
        )
    headers = [
        "variant",
        "inside MB/step",
        "across MB/step",
        "fwd gather in/across",
        "bwd gather in/across",
        "grad in/across",
        "step s",
        "CPU s/step",
        "peak RSS MiB",
        f"loss @ {args.warmup + args.steps}",
    ]
    goals: list[str] = []
    plain = results.get("plain")

    def across(v: str, *phases: str) -> float:
        return sum(results[v]["bytes"][p][1] for p in phases or PHASES)

    def check(label: str, value: float, ok: bool) -> None:
        goals.append(f"{'PASS' if ok else 'FAIL'}: {label}: {value:.3f}")

    if plain is not None:
        if "all" in results:
            r = across("all") / across("plain")
            check("across-node bytes, all three / plain (goal <= 0.25)", r, r <= 0.25)
        if "qwz" in results:
            r = results["qwz"]["bytes"]["fwd_gather"][0] / plain["bytes"]["fwd_gather"][0]
            check("qwZ forward all-gather bytes / plain bf16 (goal ~0.5)", r, r <= 0.51)
        if "qgz" in results:
            r = across("qgz", "grad") / across("plain", "grad")
            check(
                f"qgZ int{args.grad_bits} gradient bytes across nodes / plain bf16 (goal <= 0.25)",
                r,
                r <= 0.25,
            )
            r = results["qgz"]["bytes"]["grad"][0] / plain["bytes"]["grad"][0]
            goals.append(f"info: qgZ gradient bytes inside + across / plain: {r:.3f}")
    if "hpz" in results:
        v = across("hpz", "bwd_gather")
        check("hpZ backward all-gather bytes across nodes (goal 0)", v, v == 0)
    return markdown_table(headers, rows), goals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="tiny GPT, 1 warm-up + 2 steps")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--grad-bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", help="write every variant's result here")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.warmup = "tiny", 2, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        print(f"unknown variants {unknown}; choose from {VARIANTS}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any]] = {}
    for v in variants:
        print(f"[bench_zeropp] {v} ... (load {load_average()})", file=sys.stderr, flush=True)
        results[v] = run_variant(v, args)
    table, goals = report(results, args)
    first = next(iter(results.values()))
    print(
        f"ZeRO++ on {WORLD} CPU processes as 2 nodes of {NODE}, gloo, bf16, GPT {args.size} "
        f"({first['params']:,} parameters), {args.warmup} warm-up + {args.steps} timed steps; "
        f"qgZ int{args.grad_bits}; load average {load_average()}\n"
    )
    print(table)
    print()
    for line in goals:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "goals": goals}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
