"""Benchmark zshard's ZeRO 0-3 engine against DDP, ZeroRedundancyOptimizer, FSDP2 and DeepSpeed.

Run from the repository root (tables go to stdout as markdown; progress to stderr)::

    python tools/bench_train.py                    # 57M GPT, default methods x 3 rounds
    python tools/bench_train.py --quick            # tiny model, 2 steps, 1 round: ~1-2 min
    python tools/bench_train.py --methods zshard-2,zshard-2-sync,ddp --json out.json
    python tools/bench_train.py --profile zshard-3 # torch.profiler + cProfile of one step, rank 0

Every method trains the same model (the built-in GPT, ``--params`` picks its size) on the same
random token batches (seeded by step and rank) with AdamW (lr 1e-4, weight decay 0.01) in fp32,
on 2 CPU processes joined by gloo on 127.0.0.1, one intra-op thread each. Methods:

* ``zshard-0`` ... ``zshard-3``: ``zshard.train.initialize`` (stage 3 builds the model on
  ``meta`` through ``model_factory``, as documented), default config (``overlap_comm`` on,
  default bucket sizes); ``zshard-1-sync`` ... ``zshard-3-sync`` (not run by default): the
  same with ``overlap_comm: false``, every collective blocking;
* ``ddp``: ``DistributedDataParallel`` + ``torch.optim.AdamW``;
* ``zero-opt``: DDP + ``torch.distributed.optim.ZeroRedundancyOptimizer`` (ZeRO-1);
* ``fsdp2-rs`` / ``fsdp2-nors``: ``fully_shard`` on every block and the root of the seeded
  model, with ``reshard_after_forward`` True (ZeRO-3) / False (ZeRO-2-like);
* ``ds-0`` ... ``ds-3``: ``deepspeed.initialize`` with ``torch.optim.AdamW`` passed in
  (``zero_allow_untested_optimizer``; DeepSpeed's own CPU Adam needs a native build).

Each run of a method is a fresh pair of processes (this script with ``--worker``). A worker
imports what its method needs, joins the process group and records its RSS (the *baseline*),
builds the model, runs ``--warmup`` + ``--steps`` steps with a barrier before and after each
(the timed step is rank 0's wall time between the barriers; its process CPU time, all threads,
is kept too: on a shared machine it is the steadier number), then reads its peak RSS (``VmHWM``
of its own address space; ``ru_maxrss`` is also kept in the JSON, but Linux carries it across
fork+exec from the launcher) and finally saves the training state once into a local temporary
directory: ``engine.save`` (fsyncs every shard and the manifest), ``torch.distributed.checkpoint``
``save`` of ``get_state_dict(model, optimizer)`` (its ``FileSystemWriter`` fsyncs by default),
DeepSpeed ``save_checkpoint`` (``torch.save``, no fsync). Methods run in rounds (A B C ... A B C
...) so drift of a shared machine hits all alike; tables report medians over the rounds of each
run's median step time. ``--json`` keeps every step, phase (forward/backward/optimizer) and loss.

Each round also runs the *activation* probe once: a plain one-process forward + backward of the
same model on the same micro batch (no engine, no process group; gradients already allocated by a
warm-up step, peak reset with ``clear_refs``; the host allocator policy a zshard engine sets on the
CPU): its peak RSS growth is the activation peak of that micro batch, measured in the same run.

Communication: zshard records ``engine.stats()["comm"]`` every timed step: the bytes this rank
handed to torch.distributed per kind of collective (counted in ``Comm`` at the call). The
"volume" column converts them to the ZeRO paper's unit (Ψ elements per rank; an all-reduce moves
twice its buffer: a reduce-scatter plus an all-gather) next to the paper's 2Ψ (stages 0-2) and
3Ψ (stage 3). On gloo, zshard builds reduce-scatter and all-gather on all-reduce, which is faster
there but moves twice the paper's volume.

Targets (printed PASS/FAIL): zshard stages 1-2 step time <= 1.05x DDP; zshard stage 3 <= FSDP2
with ``reshard_after_forward=True``; every zshard stage's per-rank peak RSS minus its baseline
<= 1.10x (ZeRO formula + activation peak) and below DeepSpeed's at the same stage. The formula
(docs/design.md, fp32, Adam: no separate master) is params 4Ψ, grads 4Ψ, Adam 8Ψ: stage 0 16Ψ,
1 8Ψ+8Ψ/N, 2 4Ψ+12Ψ/N, 3 16Ψ/N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from _bench_util import (
    MIB,
    RESULT_MARKER,
    load_average,
    machine_info,
    markdown_table,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_workers,
)

WORLD = 2
LR, WEIGHT_DECAY = 1e-4, 0.01
SEED = 0
STEP_TARGET = 1.05  # zshard stages 1-2 vs DDP
RSS_TARGET = 1.10  # zshard peak RSS - baseline vs formula + activation peak
PAPER_VOLUME = {0: 2, 1: 2, 2: 2, 3: 3}  # ZeRO paper: elements moved per rank, in units of Ψ
ACTIVATION = "activation"  # the one-process probe's name in the results

# name -> GPTConfig(vocab_size, seq_len, n_layer, n_head, d_model) arguments
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (256, 32, 2, 2, 64),
    "57m": (256, 128, 8, 12, 768),
    "85m": (256, 128, 12, 12, 768),
    "151m": (256, 128, 12, 16, 1024),
}

ZSHARD = [f"zshard-{s}" for s in range(4)]
ZSHARD_SYNC = [f"zshard-{s}-sync" for s in range(1, 4)]  # overlap_comm: false
DEEPSPEED = [f"ds-{s}" for s in range(4)]
DEFAULT_METHODS = [*ZSHARD, "ddp", "zero-opt", "fsdp2-rs", "fsdp2-nors", *DEEPSPEED]
METHODS = [*DEFAULT_METHODS, *ZSHARD_SYNC]
# The ZeRO stage each method's memory should follow.
EQUIVALENT_STAGE = {
    **{f"zshard-{s}": s for s in range(4)},
    **{f"zshard-{s}-sync": s for s in range(1, 4)},
    **{f"ds-{s}": s for s in range(4)},
    "ddp": 0,
    "zero-opt": 1,
    "fsdp2-rs": 3,
    "fsdp2-nors": 3,  # keeps params gathered between forward and backward: more than 16Ψ/N
}


def progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def formula_bytes(stage: int, numel: int, world: int) -> int:
    """ZeRO per-rank model-state bytes for fp32 AdamW (docs/design.md with 4-byte params/grads and
    K = 8 for Adam's two states; fp32 needs no separate master copy)."""
    p = numel
    return {
        0: 16 * p,
        1: 8 * p + 8 * p // world,
        2: 4 * p + 12 * p // world,
        3: 16 * p // world,
    }[stage]


# =============================================================================================
# Worker: one rank of one method


@dataclass(frozen=True)
class Spec:
    method: str
    size: str
    micro_batch: int
    warmup: int
    steps: int
    save_dir: str | None  # None: do not save
    profile: bool = False


def _batch(step: int, rank: int, spec: Spec, vocab: int, seq: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(10_000 * step + rank)
    xy = torch.randint(0, vocab, (spec.micro_batch, seq + 1), generator=g)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


class Runner:
    """What each method provides: build, one training step, save.

    ``step`` runs forward, backward and the optimizer step; it notes the wall time of each phase
    in ``phases`` (no barriers inside: they would break the overlap of communication).
    """

    numel = 0
    memory_report: dict[str, int] | None = None
    comm: dict[str, dict[str, int]] | None = None  # zshard: the last step's collectives
    phases: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def forward(self, x: Any, y: Any) -> Any:
        raise NotImplementedError

    def backward(self, loss: Any) -> None:
        raise NotImplementedError

    def update(self) -> None:
        raise NotImplementedError

    def step(self, x: Any, y: Any) -> float:
        t0 = time.perf_counter()
        loss = self.forward(x, y)
        t1 = time.perf_counter()
        self.backward(loss)
        t2 = time.perf_counter()
        self.update()
        t3 = time.perf_counter()
        self.phases = (t1 - t0, t2 - t1, t3 - t2)
        return float(loss.detach())

    def save(self, path: str) -> None:
        raise NotImplementedError


def _gpt_config(spec: Spec) -> Any:
    from zshard.train.models.gpt import GPTConfig

    v, t, n_layer, n_head, d = SIZES[spec.size]
    return GPTConfig(vocab_size=v, seq_len=t, n_layer=n_layer, n_head=n_head, d_model=d)


def _seeded_model(spec: Spec) -> Any:
    import torch

    from zshard.train.models.gpt import build_model

    torch.manual_seed(SEED)
    return build_model(_gpt_config(spec))


def _adamw(params: Any) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


class ZshardRunner(Runner):
    def __init__(self, spec: Spec, stage: int, *, overlap: bool = True) -> None:
        import zshard.train as zt
        from zshard.train.models.gpt import build_model, num_params

        cfg = {
            "zero": {"stage": stage, "overlap_comm": overlap},
            "precision": {"dtype": "fp32"},
            "optimizer": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
            "train": {
                "micro_batch_size": spec.micro_batch,
                "global_batch_size": spec.micro_batch * WORLD,
                "seed": SEED,
            },
            "dist": {"backend": "gloo", "device": "cpu"},
        }
        gpt_cfg = _gpt_config(spec)
        if stage == 3:  # the documented stage-3 path: never materialise the whole model
            self.engine = zt.initialize(config=cfg, model_factory=lambda: build_model(gpt_cfg))
        else:
            self.engine = zt.initialize(_seeded_model(spec), cfg)
        self.numel = num_params(_gpt_meta(spec))

    def forward(self, x: Any, y: Any) -> Any:
        return self.engine(x, y)

    def backward(self, loss: Any) -> None:
        self.engine.backward(loss)

    def update(self) -> None:
        self.engine.step()
        self.memory_report = self.engine.memory_report()
        self.comm = self.engine.stats()["comm"]

    def save(self, path: str) -> None:
        self.engine.save(path)


class TorchRunner(Runner):
    """DDP, DDP + ZeroRedundancyOptimizer, FSDP2."""

    def __init__(self, spec: Spec) -> None:
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        from zshard.train.models.gpt import num_params

        m = spec.method
        if m.startswith("fsdp2"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # Built whole (seeded like every other method, so the values are the same), then
            # sharded in place: fully_shard frees the full tensors. Building on meta and calling
            # init_weights() on the shards would draw different values.
            model = _seeded_model(spec)
            mesh = init_device_mesh("cpu", (WORLD,))
            reshard = m == "fsdp2-rs"
            for block in model.blocks:
                fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
            fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
            self.model = model
            self.opt = _adamw(model.parameters())
        else:
            model = _seeded_model(spec)
            self.numel = num_params(model)
            self.model = DDP(model)
            if m == "zero-opt":
                from torch.distributed.optim import ZeroRedundancyOptimizer

                self.opt = ZeroRedundancyOptimizer(
                    self.model.parameters(),
                    optimizer_class=torch.optim.AdamW,
                    lr=LR,
                    weight_decay=WEIGHT_DECAY,
                )
            else:
                self.opt = _adamw(self.model.parameters())
        self.numel = num_params(_gpt_meta(spec))

    def forward(self, x: Any, y: Any) -> Any:
        return self.model(x, y)

    def backward(self, loss: Any) -> None:
        loss.backward()

    def update(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def save(self, path: str) -> None:
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.opt.__class__.__name__ == "ZeroRedundancyOptimizer":
            # Its state_dict() exists only consolidated on one rank (DCP cannot take it): the
            # documented recipe, then torch.save on rank 0, fsynced like the others.
            self.opt.consolidate_state_dict(to=0)
            if dist.get_rank() == 0:
                os.makedirs(path, exist_ok=True)
                file = os.path.join(path, "state.pt")
                state = {"model": self.model.module.state_dict(), "optim": self.opt.state_dict()}
                with open(file, "wb") as f:
                    torch.save(state, f)
                    f.flush()
                    os.fsync(f.fileno())
            return
        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)


def _gpt_meta(spec: Spec) -> Any:
    import torch

    from zshard.train.models.gpt import build_model

    with torch.device("meta"):
        return build_model(_gpt_config(spec))


class DeepSpeedRunner(Runner):
    def __init__(self, spec: Spec, stage: int) -> None:
        import deepspeed

        from zshard.train.models.gpt import num_params

        model = _seeded_model(spec)
        self.numel = num_params(model)
        config = {
            "train_micro_batch_size_per_gpu": spec.micro_batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
        }
        self.engine, self.opt, _, _ = deepspeed.initialize(
            model=model, optimizer=_adamw(model.parameters()), config=config
        )

    def forward(self, x: Any, y: Any) -> Any:
        return self.engine(x, y)

    def backward(self, loss: Any) -> None:
        self.engine.backward(loss)

    def update(self) -> None:
        self.engine.step()

    def save(self, path: str) -> None:
        self.engine.save_checkpoint(path)


def _make_runner(spec: Spec) -> Runner:
    m = spec.method
    if m.startswith("zshard-"):
        return ZshardRunner(spec, int(m.split("-")[1]), overlap=not m.endswith("-sync"))
    if m.startswith("ds-"):
        return DeepSpeedRunner(spec, int(m[-1]))
    return TorchRunner(spec)


def _profile_step(runner: Runner, x: Any, y: Any, rank: int) -> str:
    """Rank 0's view of one step: torch.profiler's top operators (self CPU time; waiting for a
    blocking collective counts as the caller's self time), then cProfile's Python functions by
    cumulative time on a second step."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step(x, y)
    cp = cProfile.Profile()
    cp.enable()
    runner.step(x, y)
    cp.disable()
    if rank != 0:
        return ""
    text = io.StringIO()
    pstats.Stats(cp, stream=text).sort_stats("cumulative").print_stats(40)
    table: str = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return f"{table}\n\ncProfile, cumulative:\n{text.getvalue()}"


def worker(spec: Spec) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    if spec.method.startswith("ds-"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    else:
        dist.init_process_group("gloo")
    import torch._dynamo  # see below

    import zshard.train  # noqa: F401  (every method imports the model from zshard)

    # torch imports torch._dynamo (and sympy: ~70 MiB) lazily, on the first meta-device build,
    # DDP or FSDP2; imported here, it is in every method's baseline alike.
    baseline = rss_bytes()
    t0 = time.perf_counter()
    runner = _make_runner(spec)
    build_s = time.perf_counter() - t0
    cfg = _gpt_config(spec)
    times, cpu, losses, phases, comm = [], [], [], [], []
    for i in range(spec.warmup + spec.steps):
        x, y = _batch(i, rank, spec, cfg.vocab_size, cfg.seq_len)
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        losses.append(runner.step(x, y))
        c = time.process_time() - c
        dist.barrier()
        times.append(time.perf_counter() - t)
        cpu.append(c)
        phases.append(runner.phases)
        comm.append(runner.comm)
    out: dict[str, Any] = {
        "method": spec.method,
        "rank": rank,
        "numel": runner.numel,
        "build_s": build_s,
        "step_s": times[spec.warmup :],
        # CPU seconds of this process (all its threads, gloo's included) during the step: the
        # work done, less sensitive than wall time to other jobs sharing the cores.
        "cpu_s": cpu[spec.warmup :],
        "phases_s": phases[spec.warmup :],  # (forward, backward, optimizer step)
        "warmup_s": times[: spec.warmup],
        "losses": losses,
        "baseline_rss": baseline,
        "peak_rss": peak_rss_bytes(),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_steps": rss_bytes(),
        "memory_report": runner.memory_report,
        "comm": comm[spec.warmup :],  # zshard: per timed step, kind -> calls/bytes/cross-node
    }
    if spec.profile:
        x, y = _batch(0, rank, spec, cfg.vocab_size, cfg.seq_len)
        out["profile"] = _profile_step(runner, x, y, rank)
    if spec.save_dir:
        dist.barrier()
        t = time.perf_counter()
        runner.save(spec.save_dir)
        dist.barrier()
        out["save_s"] = time.perf_counter() - t
        out["peak_rss_after_save"] = peak_rss_bytes()
    dist.barrier()
    return out


def activation_probe(spec: Spec) -> dict[str, Any]:
    """One process, no engine and no process group: the peak RSS growth of a forward + backward
    of the model on rank 0's micro batch, with gradients already allocated by a warm-up step."""

    import torch

    torch.set_num_threads(1)
    import torch._dynamo  # as in the workers

    from zshard.train.engine import apply_host_alloc_policy, release_free_heap

    # The allocator policy a zshard engine sets on the CPU (engine/_host_alloc.py), so that the
    # bound it is held to counts activations under the same allocator, not under a heap that
    # keeps freed memory.
    apply_host_alloc_policy()
    cfg = _gpt_config(spec)
    model = _seeded_model(spec)
    x, y = _batch(0, 0, spec, cfg.vocab_size, cfg.seq_len)
    model(x, y).backward()  # allocates .grad and autograd's lasting buffers
    release_free_heap()
    before = rss_bytes()
    reset = reset_peak_rss()
    loss = model(x, y)
    loss.backward()
    return {
        "method": ACTIVATION,
        "activation_peak": peak_rss_bytes() - before,
        "peak_reset": reset,
        "rss_before": before,
    }


# =============================================================================================
# Launcher


def run_method(spec: Spec, timeout: float) -> list[dict[str, Any]]:
    """Both ranks of one method in fresh processes; their result dicts, rank order."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
    )
    argv = [os.path.abspath(__file__), "--worker", json.dumps(spec.__dict__)]
    results = run_workers(argv, WORLD, timeout=timeout, env=env, label=spec.method)
    for r, result in enumerate(results):
        if result["exit_code"] != 0:  # measured fine, then failed to shut down: keep, but say so
            progress(f"{spec.method} rank {r} exited {result['exit_code']} after its result")
    return results


def _deepspeed_available() -> bool:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", "import deepspeed"], env=env, capture_output=True, check=False
    )
    return proc.returncode == 0


# =============================================================================================
# Summary


def _fmt_mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MIB:.0f}"


def _spread(values: list[float], fmt: str = ".3f") -> str:
    """``median (min-max)``, or just the value for one sample."""
    med = statistics.median(values)
    if len(values) < 2:
        return f"{med:{fmt}}"
    return f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


# An all-reduce moves twice its buffer per rank (a reduce-scatter, then an all-gather); the other
# collectives once: the ZeRO paper's accounting.
_VOLUME_FACTOR = {
    "all_reduce": 2,
    "reduce_scatter": 1,
    "all_gather": 1,
    "reduce": 1,
    "broadcast": 1,
}


def comm_summary(steps: list[dict[str, dict[str, int]] | None]) -> dict[str, Any] | None:
    """Median over timed steps of the bytes per kind, their sum and the paper-unit volume."""
    steps = [c for c in steps if c]
    if not steps:
        return None
    kinds = sorted({k for c in steps for k, v in c.items() if v["calls"]})
    per_kind = {k: statistics.median(c[k]["bytes"] for c in steps) for k in kinds}
    calls = {k: statistics.median(c[k]["calls"] for c in steps) for k in kinds}
    volume = statistics.median(
        sum(_VOLUME_FACTOR.get(k, 1) * v["bytes"] for k, v in c.items()) for c in steps
    )
    cross = statistics.median(sum(v["cross_node_bytes"] for v in c.values()) for c in steps)
    return {
        "bytes": per_kind,
        "calls": calls,
        "total_bytes": sum(per_kind.values()),
        "volume_bytes": volume,
        "cross_node_bytes": cross,
    }


def summarize(
    methods: list[str],
    runs: dict[str, list[list[dict[str, Any]]]],
    activations: list[dict[str, Any]],
) -> dict[str, Any]:
    """Per method: medians over rounds of rank 0's median step time (and its CPU time), the
    max-over-ranks memory, the communication counters."""
    out: dict[str, Any] = {}
    act = [a["activation_peak"] for a in activations]
    activation = statistics.median(act) if act else None
    out[ACTIVATION] = {"activation_peak": activation, "rounds": act}
    for m in methods:
        rounds = runs.get(m, [])
        if not rounds:
            continue
        step_medians = [statistics.median(r[0]["step_s"]) for r in rounds]
        cpu_medians = [statistics.median(r[0]["cpu_s"]) for r in rounds]
        peaks = [max(x["peak_rss"] for x in r) for r in rounds]
        above = [max(x["peak_rss"] - x["baseline_rss"] for x in r) for r in rounds]
        worst = max(range(len(rounds)), key=lambda i: peaks[i])
        ranks = rounds[worst]
        saves = [r[0]["save_s"] for r in rounds if "save_s" in r[0]]
        numel = rounds[0][0]["numel"]
        stage = EQUIVALENT_STAGE[m]
        reports = [x["memory_report"] for x in ranks if x.get("memory_report")]
        phase_medians = [
            [statistics.median(p[k] for p in r[0]["phases_s"]) for k in range(3)] for r in rounds
        ]
        formula = formula_bytes(stage, numel, WORLD)
        comm = comm_summary([c for r in rounds for c in r[0].get("comm", [])])
        out[m] = {
            "step_s": statistics.median(step_medians),
            "step_s_rounds": step_medians,
            "cpu_s": statistics.median(cpu_medians),
            "cpu_s_rounds": cpu_medians,
            "phases_s": [statistics.median(p[k] for p in phase_medians) for k in range(3)],
            "peak_rss": statistics.median(peaks),
            "peak_rss_rounds": peaks,
            "baseline_rss": ranks[0]["baseline_rss"],
            "rss_minus_baseline": statistics.median(above),
            "rss_minus_baseline_rounds": above,
            "formula_bytes": formula,
            "formula_stage": stage,
            "rss_bound": None if activation is None else RSS_TARGET * (formula + activation),
            "tensor_bytes": max(rep["total"] for rep in reports) if reports else None,
            "buffer_bytes": (
                max(rep.get("comm_buffers", 0) + rep.get("update_scratch", 0) for rep in reports)
                if reports
                else None
            ),
            "comm": comm,
            "paper_volume_psi": PAPER_VOLUME[stage],
            "save_s": statistics.median(saves) if saves else None,
            "save_s_rounds": saves,
            "numel": numel,
            "final_loss": rounds[-1][0]["losses"][-1],
        }
    return out


def targets(summary: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, passed); passed None when a comparison method was not run."""
    out: list[tuple[str, str, bool | None]] = []
    ddp = summary.get("ddp")
    for s in (1, 2):
        z = summary.get(f"zshard-{s}")
        if z and ddp:
            ratio = z["step_s"] / ddp["step_s"]
            cpu = z["cpu_s"] / ddp["cpu_s"]
            out.append(
                (
                    f"zshard-{s} step <= {STEP_TARGET}x DDP",
                    f"{ratio:.3f}x wall ({cpu:.3f}x CPU)",
                    ratio <= STEP_TARGET,
                )
            )
    z3, f3 = summary.get("zshard-3"), summary.get("fsdp2-rs")
    if z3 and f3:
        ratio = z3["step_s"] / f3["step_s"]
        cpu = z3["cpu_s"] / f3["cpu_s"]
        out.append(
            (
                "zshard-3 step <= FSDP2 (reshard_after_forward=True)",
                f"{ratio:.3f}x wall ({cpu:.3f}x CPU)",
                ratio <= 1,
            )
        )
    activation = summary.get(ACTIVATION, {}).get("activation_peak")
    for s in range(4):
        z = summary.get(f"zshard-{s}")
        if not z:
            continue
        if activation is not None:
            bound = z["rss_bound"]
            ratio = z["rss_minus_baseline"] / (z["formula_bytes"] + activation)
            out.append(
                (
                    f"zshard-{s} peak RSS - baseline <= {RSS_TARGET}x (formula + activation peak)",
                    f"{_fmt_mib(z['rss_minus_baseline'])} vs {_fmt_mib(bound)} MiB "
                    f"({ratio:.3f}x of {_fmt_mib(z['formula_bytes'])} + {_fmt_mib(activation)})",
                    ratio <= RSS_TARGET,
                )
            )
        d = summary.get(f"ds-{s}")
        if d:
            out.append(
                (
                    f"zshard-{s} peak RSS < DeepSpeed stage {s}",
                    f"{_fmt_mib(z['peak_rss'])} vs {_fmt_mib(d['peak_rss'])} MiB",
                    z["peak_rss"] < d["peak_rss"],
                )
            )
    return out


def render(summary: dict[str, Any], methods: list[str]) -> str:
    ddp = summary.get("ddp")
    rows = []
    for m in methods:
        s = summary.get(m)
        if s is None:
            continue
        ratio = f"{s['step_s'] / ddp['step_s']:.2f}x" if ddp else "-"
        cpu_ratio = f"{s['cpu_s'] / ddp['cpu_s']:.2f}x" if ddp else "-"
        rows.append(
            [
                m,
                _spread(s["step_s_rounds"]),
                ratio,
                _spread(s["cpu_s_rounds"]),
                cpu_ratio,
                _fmt_mib(s["peak_rss"]),
                _spread([v / MIB for v in s["rss_minus_baseline_rounds"]], ".0f"),
                f"{_fmt_mib(s['formula_bytes'])} (st {s['formula_stage']})",
                _fmt_mib(s["rss_bound"]),
                _fmt_mib(s["tensor_bytes"]),
                _fmt_mib(s["buffer_bytes"]),
                "-" if s["save_s"] is None else f"{s['save_s']:.2f}",
            ]
        )
    headers = [
        "method",
        "step s (min-max)",
        "vs DDP",
        "CPU s/step (min-max)",
        "CPU vs DDP",
        "peak RSS MiB",
        "peak - baseline MiB",
        "formula MiB",
        f"{RSS_TARGET}x (formula + act.) MiB",
        "engine tensors MiB",
        "engine buffers MiB",
        "save s",
    ]
    act = summary.get(ACTIVATION, {})
    lines = [markdown_table(headers, rows), ""]
    if act.get("rounds"):
        lines += [
            "Activation peak (one-process forward + backward of the same micro batch): "
            + _spread([v / MIB for v in act["rounds"]], ".0f")
            + " MiB",
            "",
        ]
    phase_rows = [
        [m, *(f"{t:.3f}" for t in summary[m]["phases_s"])] for m in methods if m in summary
    ]
    lines += [
        "Where the step goes (rank 0, medians; no barriers between phases, so a phase may also "
        "wait for the other rank):",
        "",
        markdown_table(["method", "forward s", "backward s", "optimizer step s"], phase_rows),
        "",
    ]
    comm_rows = []
    for m in methods:
        s = summary.get(m)
        if not s or not s.get("comm"):
            continue
        c, psi_bytes = s["comm"], 4 * s["numel"]
        kinds = ", ".join(
            f"{k} {v / MIB:.1f} ({c['calls'][k]:.0f})" for k, v in sorted(c["bytes"].items())
        )
        comm_rows.append(
            [
                m,
                kinds,
                f"{c['total_bytes'] / MIB:.1f}",
                f"{c['volume_bytes'] / psi_bytes:.2f}Ψ",
                f"{s['paper_volume_psi']}Ψ",
                f"{c['cross_node_bytes'] / MIB:.1f}",
            ]
        )
    if comm_rows:
        lines += [
            "Communication per step and rank (zshard's counters, medians over timed steps; MiB "
            "handed to torch.distributed per kind, calls in parentheses; volume in the ZeRO "
            "paper's unit, an all-reduce counting twice its buffer):",
            "",
            markdown_table(
                [
                    "method",
                    "MiB by kind (calls)",
                    "MiB total",
                    "volume",
                    "paper volume",
                    "cross-node MiB",
                ],
                comm_rows,
            ),
            "",
        ]
    for name, measured, ok in targets(summary):
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"- {verdict}: {name}: {measured}")
    return "\n".join(lines)


# =============================================================================================
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--activation-worker", help=argparse.SUPPRESS)
    p.add_argument(
        "--quick", action="store_true", help="tiny model, 1 warm-up + 2 steps, 1 round, no save"
    )
    p.add_argument("--params", choices=sorted(SIZES), default="57m", help="model size")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    p.add_argument("--rounds", type=int, default=3, help="runs of every method, interleaved")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)}",
    )
    p.add_argument("--no-save", action="store_true", help="skip the checkpoint save")
    p.add_argument("--dir", default=None, help="scratch parent for checkpoints (default: tmp)")
    p.add_argument("--json", default=None, help="write all raw results and the summary here")
    p.add_argument("--profile", default=None, help="profile one step of this method, print")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run of a method")
    args = p.parse_args(argv)
    if args.quick:
        args.params, args.steps, args.warmup, args.rounds = "tiny", 2, 1, 1
        args.no_save = True
    return args


def run_activation(spec: Spec, timeout: float) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    argv = [os.path.abspath(__file__), "--activation-worker", json.dumps(spec.__dict__)]
    proc = subprocess.run(
        [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"activation probe failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_MARKER) :])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(Spec(**json.loads(args.worker)))
        print(RESULT_MARKER + json.dumps(result), flush=True)
        import torch.distributed as dist

        # An undestroyed gloo group can abort the interpreter at exit ("terminate called
        # without an active exception"); tear it down while both ranks are still here.
        dist.destroy_process_group()
        return 0
    if args.activation_worker:
        result = activation_probe(Spec(**json.loads(args.activation_worker)))
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if args.profile and args.profile not in METHODS:
        unknown.append(args.profile)
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if args.profile:
        return profile_main(args)
    if any(m.startswith("ds-") for m in methods) and not _deepspeed_available():
        progress("deepspeed does not import: its methods are skipped")
        methods = [m for m in methods if not m.startswith("ds-")]
    runs: dict[str, list[list[dict[str, Any]]]] = {m: [] for m in methods}
    activations: list[dict[str, Any]] = []
    failures: dict[str, str] = {}
    started = time.perf_counter()
    load_before = load_average()
    scratch = tempfile.mkdtemp(prefix="bench_train_", dir=args.dir)
    try:
        for rnd in range(args.rounds):
            probe = Spec(ACTIVATION, args.params, args.micro_batch, 0, 0, None)
            try:
                activations.append(run_activation(probe, args.timeout))
                progress(
                    f"round {rnd + 1}/{args.rounds} activation peak "
                    f"{activations[-1]['activation_peak'] / MIB:.0f} MiB"
                )
            except (RuntimeError, subprocess.SubprocessError) as e:
                failures[ACTIVATION] = str(e)
                progress(f"round {rnd + 1}: activation probe FAILED: {str(e)[-600:]}")
            for m in methods:
                if m in failures:
                    continue
                save_dir = None if args.no_save else os.path.join(scratch, f"{m}-r{rnd}")
                spec = Spec(m, args.params, args.micro_batch, args.warmup, args.steps, save_dir)
                t = time.perf_counter()
                try:
                    ranks = run_method(spec, args.timeout)
                except (RuntimeError, subprocess.SubprocessError) as e:
                    failures[m] = str(e)
                    progress(f"round {rnd + 1}: {m} FAILED: {str(e)[-600:]}")
                    continue
                finally:
                    if save_dir:
                        shutil.rmtree(save_dir, ignore_errors=True)
                runs[m].append(ranks)
                r0 = ranks[0]
                progress(
                    f"round {rnd + 1}/{args.rounds} {m}: step "
                    f"{statistics.median(r0['step_s']):.3f} s, CPU "
                    f"{statistics.median(r0['cpu_s']):.3f} s, peak RSS "
                    f"{max(x['peak_rss'] for x in ranks) / MIB:.0f} MiB, save "
                    f"{r0.get('save_s', float('nan')):.2f} s ({time.perf_counter() - t:.0f} s)"
                )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = summarize(methods, runs, activations)
    numel = next((s["numel"] for k, s in summary.items() if k != ACTIVATION), 0)
    print(
        f"\n## {numel / 1e6:.1f}M-parameter GPT ({args.params}), {WORLD} ranks, fp32 AdamW, "
        f"micro batch {args.micro_batch} x seq {SIZES[args.params][1]} per rank, "
        f"{args.warmup} warm-up + {args.steps} timed steps x {args.rounds} round(s)\n"
    )
    print(render(summary, methods))
    for m, e in failures.items():
        print(f"- {m} failed: {e.strip().splitlines()[-1] if e.strip() else e}")
    info = machine_info(scratch)
    info["deepspeed"] = _version("deepspeed")
    print()
    for k, v in info.items():
        print(f"- {k}: {v}")
    print(
        f"- load average before / after: {load_before} / {load_average()}; "
        f"wall {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "machine": info,
                    "summary": summary,
                    "runs": runs,
                    "activations": activations,
                    "failures": failures,
                    "targets": targets(summary),
                },
                f,
                indent=1,
            )
    return 0


def profile_main(args: argparse.Namespace) -> int:
    m = args.profile
    spec = Spec(m, args.params, args.micro_batch, args.warmup, 1, None, profile=True)
    ranks = run_method(spec, args.timeout)
    print(f"## torch.profiler, one step of {m} after {args.warmup} warm-up steps (rank 0)\n")
    print(ranks[0]["profile"])
    return 0


def _version(mod: str) -> str:
    try:
        out = subprocess.run(
            [sys.executable, "-c", f"import {mod}; print({mod}.__version__)"],
            env=dict(os.environ, DS_ACCELERATOR="cpu"),
            capture_output=True,
            text=True,
            check=True,
        )
    except subprocess.CalledProcessError:
        return "not importable"
    return out.stdout.strip().splitlines()[-1]


if __name__ == "__main__":
    sys.exit(main())
