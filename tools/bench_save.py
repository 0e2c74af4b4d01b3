"""Benchmark async checkpoint saves: how long a save stalls training, against a synchronous save.

Run from the repository root (tables go to stdout as markdown; progress to stderr)::

    python tools/bench_save.py                 # 57M GPT, stages 1 and 3, 2 ranks, 5 rounds
    python tools/bench_save.py --quick         # tiny GPT, 2 rounds: a smoke run of a minute
    python tools/bench_save.py --stages 3 --rounds 9 --json out.json

Each stage runs in a fresh pair of processes (gloo on 127.0.0.1, one intra-op thread each, the
built-in GPT of tools/bench_train.py with fp32 AdamW, the same config). After warm-up steps, each
round does, on both ranks:

* a **synchronous save** (``checkpointer.save(async_save=False)``): barrier, save, barrier; the
  time is rank 0's wall time between the barriers (what training waits for: every shard written,
  fsynced and committed);
* an **async save** (``async_save=True``), timed the same way: the **stall** is the time the
  save blocked the training thread (``Checkpointer.last_stall_s``, the larger of the two ranks),
  of which the **snapshot** (host copies of the partitions) is part; then one training step runs
  while the save is in flight (its time against the median step without a save), and the save
  is waited for (its total time from the call to the commit).

Every save goes to a fresh checkpoint root on the local disk (``--dir``), removed after the
round. Target: stall <= 10% of the synchronous save, at every stage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from _bench_util import (
    RESULT_MARKER,
    load_average,
    machine_info,
    markdown_table,
    run_workers,
    scratch_dir,
)

WORLD = 2
SEED = 1234
LR, WEIGHT_DECAY = 1e-4, 0.01
STALL_TARGET = 0.10  # an async save may stall training at most this fraction of a sync save
# (vocab, seq_len, n_layer, n_head, d_model), as tools/bench_train.py
SIZES = {"tiny": (256, 32, 2, 2, 64), "57m": (256, 128, 8, 12, 768)}


def progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Spec:
    size: str
    stage: int
    rounds: int
    warmup: int
    micro_batch: int
    root: str


def _engine(spec: Spec) -> Any:
    import zshard.train as zt
    from zshard.train.models.gpt import GPTConfig, build_model

    v, t, n_layer, n_head, d = SIZES[spec.size]
    gpt = GPTConfig(vocab_size=v, seq_len=t, n_layer=n_layer, n_head=n_head, d_model=d)
    cfg = {
        "zero": {"stage": spec.stage},
        "precision": {"dtype": "fp32"},
        "optimizer": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
        "train": {
            "micro_batch_size": spec.micro_batch,
            "global_batch_size": spec.micro_batch * WORLD,
            "seed": SEED,
        },
        "dist": {"backend": "gloo", "device": "cpu"},
    }
    return zt.initialize(config=cfg, model_factory=lambda: build_model(gpt)), gpt


def worker(spec: Spec) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    engine, gpt = _engine(spec)

    def step(i: int) -> float:
        g = torch.Generator().manual_seed(10_000 * i + rank)
        xy = torch.randint(0, gpt.vocab_size, (spec.micro_batch, gpt.seq_len + 1), generator=g)
        t = time.perf_counter()
        engine.backward(engine(xy[:, :-1].contiguous(), xy[:, 1:].contiguous()))
        engine.step()
        return time.perf_counter() - t

    def timed_save(root: str, async_save: bool) -> float:
        engine.synchronize()
        dist.barrier()
        t = time.perf_counter()
        engine.checkpointer.save(root, async_save=async_save)
        dist.barrier()
        return time.perf_counter() - t

    i = 0
    plain = []
    for _ in range(spec.warmup):
        plain.append(step(i))
        i += 1
    nbytes = sum(t.numel() * t.element_size() for t in engine.state_tensors().values())
    rounds = []
    for r in range(spec.rounds):
        sync_root, async_root = f"{spec.root}/sync-{r}", f"{spec.root}/async-{r}"
        sync_s = timed_save(sync_root, False)
        plain.append(step(i))
        i += 1
        call_s = timed_save(async_root, True)
        last = dict(engine.checkpointer.last_save)
        t = time.perf_counter()
        overlapped = step(i)  # training while the save is in flight
        i += 1
        in_flight = engine.checkpointer._saver.busy
        engine.wait_for_save()
        total_s = time.perf_counter() - t + call_s
        dist.barrier()
        if rank == 0:
            shutil.rmtree(sync_root, ignore_errors=True)
            shutil.rmtree(async_root, ignore_errors=True)
        rounds.append(
            {
                "sync_s": sync_s,
                "async_call_s": call_s,
                "stall_s": last["stall_s"],
                "snapshot_s": last["snapshot_s"],
                "step_with_save_s": overlapped,
                "still_writing_after_step": in_flight,
                "async_total_s": total_s,
            }
        )
        plain.append(step(i))
        i += 1
    engine.close()
    dist.barrier()
    return {"rank": rank, "rounds": rounds, "plain_step_s": plain, "state_bytes": nbytes}


# ---------------------------------------------------------------------------------------------
# Launcher and report


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    v = [x * scale for x in values]
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def summarize(stage: int, results: list[dict[str, Any]]) -> dict[str, Any]:
    r0 = results[0]["rounds"]
    n = len(r0)

    def worst(key: str) -> list[float]:  # the slower rank: training waits for both
        return [max(res["rounds"][i][key] for res in results) for i in range(n)]

    sync = [x["sync_s"] for x in r0]
    stall = worst("stall_s")
    return {
        "stage": stage,
        "state_bytes_per_rank": [res["state_bytes"] for res in results],
        "sync_s": sync,
        "stall_s": stall,
        "snapshot_s": worst("snapshot_s"),
        "async_call_s": [x["async_call_s"] for x in r0],
        "async_total_s": [x["async_total_s"] for x in r0],
        "step_with_save_s": worst("step_with_save_s"),
        "plain_step_s": [max(v) for v in zip(*(res["plain_step_s"] for res in results))],
        "ratio": [s / y for s, y in zip(stall, sync)],
        "overlapped_rounds": sum(bool(x["still_writing_after_step"]) for x in r0),
    }


def render(summaries: list[dict[str, Any]], args: argparse.Namespace) -> str:
    rows = []
    targets = []
    for s in summaries:
        mib = sum(s["state_bytes_per_rank"]) / (1 << 20)
        ratio = statistics.median(s["ratio"])
        ok = ratio <= STALL_TARGET
        rows.append(
            [
                f"stage {s['stage']}",
                f"{mib:.0f}",
                spread(s["sync_s"]),
                spread(s["stall_s"], 1000, "{:.1f}"),
                spread(s["snapshot_s"], 1000, "{:.1f}"),
                f"{ratio:.3f}",
                spread(s["async_total_s"]),
                f"{statistics.median(s['plain_step_s']):.3f}",
                spread(s["step_with_save_s"]),
                f"{s['overlapped_rounds']}/{len(s['sync_s'])}",
            ]
        )
        targets.append(
            [
                f"async stall <= {STALL_TARGET:.0%} of a sync save, stage {s['stage']}",
                f"{'PASS' if ok else 'FAIL'}: {ratio:.1%}",
            ]
        )
    head = [
        "stage",
        "MiB saved (both ranks)",
        "sync save s",
        "async stall ms",
        "of which snapshot ms",
        "stall / sync",
        "async save s, call to commit",
        "step s, no save",
        "step s, save in flight",
        "rounds the save outlived the step",
    ]
    info = machine_info(args.dir or "/tmp")
    lines = [
        f"Command: `{' '.join(['python', 'tools/bench_save.py', *sys.argv[1:]])}`",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- model: {args.size} GPT, fp32 AdamW, {WORLD} ranks (gloo), 1 thread each; "
        f"{args.rounds} rounds, medians (min-max)",
        f"- load average before: {args.load_before}; after: {load_average()}",
        "",
        markdown_table(head, rows),
        "",
        markdown_table(["target", "result on this run"], targets),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny GPT, 2 rounds, 1 warm-up step")
    ap.add_argument("--size", choices=sorted(SIZES), default="57m")
    ap.add_argument("--stages", default="1,3", help="comma-separated ZeRO stages (default 1,3)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--dir", default=None, help="scratch parent directory (default: system temp)")
    ap.add_argument("--json", default=None, help="also write every measurement to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.rounds, args.warmup = "tiny", 2, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        result = worker(Spec(**json.loads(args.worker)))
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return
    args.load_before = load_average()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    summaries = []
    with scratch_dir(args.dir, "zshard-bench-save-") as scratch:
        for stage in (int(s) for s in args.stages.split(",")):
            spec = Spec(args.size, stage, args.rounds, args.warmup, args.micro_batch, scratch)
            progress(f"stage {stage}: {args.size} GPT, {args.rounds} rounds")
            argv = [os.path.abspath(__file__), "--worker", json.dumps(spec.__dict__)]
            results = run_workers(argv, WORLD, timeout=3600, env=env, label=f"stage {stage}")
            summaries.append(summarize(stage, results))
    text = render(summaries, args)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summaries, f, indent=1)


if __name__ == "__main__":
    main()
