"""``zshard estimate``: per-rank memory of ZeRO stages 0-3 before anything runs.

Model states follow the ZeRO paper (Rajbhandari et al., 2020, section 3 and Figure 1). With Ψ
parameters, N ranks, ``p`` bytes per parameter, ``g`` bytes per gradient element and ``K`` bytes of
optimizer state per parameter (fp32 master weights included), each rank holds::

    stage 0   (p + g + K) Ψ           everything replicated
    stage 1   (p + g) Ψ + K Ψ/N       optimizer state partitioned
    stage 2   p Ψ + (g + K) Ψ/N       gradients partitioned too
    stage 3   (p + g + K) Ψ/N         parameters partitioned too

Mixed precision (bf16/fp16) Adam: p = g = 2, K = 12 (fp32 master 4 + exp_avg 4 + exp_avg_sq 4),
i.e. 16Ψ, 4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N. fp32 Adam: p = g = 4 and K = 8 (the fp32 parameters
are the master, no copy). SGD with momentum keeps 4 bytes of state (plus the 4-byte master in
mixed precision). Ψ/N is rounded up, as partitions are; the per-tensor padding of flat groups
(less than one element per rank and group) is ignored.

Buffers come on top, as the engine allocates them (once, at start-up, except the gathered
modules): the optimizer update's scratch window (every stage; twice that when gradients are not
fp32); with more than one rank, ``STAGE2_SLOTS`` gradient-bucket staging slots of
``reduce_bucket_size`` elements at stage 2 (stages 0-1 reduce in place in the gradient), with
native collectives (NCCL) ``GATHER_SLOTS`` all-gather slots of ``allgather_bucket_size`` elements
at stages 1-2 (gloo gathers in place); at stage 3 the gathered modules (the one in use plus
``zero.prefetch`` ahead), with native collectives or qgZ ``STAGE3_SLOTS`` staging slots for
module gradients being reduce-scattered (plus their partitions with native collectives; gloo
all-reduces each gradient in place), and the modules below
``param_persistence_threshold`` that stay whole. Activations, the CUDA context and allocator
fragmentation are not counted.

Offload moves state off the rank: ``offload_optimizer`` the K bytes per parameter (master and
optimizer state), ``offload_param`` (stage 3 only) the parameter partition.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psutil
import torch

from zshard.errors import InvalidArgumentError
from zshard.train.config import (
    Precision,
    ZshardConfig,
    default_nproc,
    load_with_deepspeed,
    stats_of,
)
from zshard.train.models.stats import ModelStats
from zshard.train.zero import (
    GATHER_SLOTS,
    STAGE2_SLOTS,
    STAGE3_SLOTS,
    UPDATE_WINDOW,
    ZeroPPOptions,
    collective_mode,
    zeropp_buffer_bytes,
)
from zshard.units import parse_size

STAGES = (0, 1, 2, 3)
PARAM_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
OptimizerName = Literal["adamw", "adam", "sgd", "lamb"]  # lamb: Adam's state


@dataclass(frozen=True, kw_only=True)
class EstimateInput:
    """Everything an estimate depends on. Sizes count elements, as in ``ZeroConfig``."""

    model: ModelStats
    world_size: int
    precision: Precision = "bf16"
    grad_accum_dtype: Literal["param", "fp32"] = "param"
    optimizer: OptimizerName = "adamw"
    momentum: bool = True  # SGD only: keeps a momentum buffer
    reduce_bucket_size: int = 2_000_000
    allgather_bucket_size: int = 2_000_000
    prefetch: int = 2
    # How collectives are built (zero.Comm): "allreduce" (gloo) or "native" (NCCL).
    collectives: Literal["allreduce", "native"] = field(
        default_factory=lambda: _collectives("auto")
    )
    offload_optimizer: bool = False
    offload_param: bool = False
    # ZeRO++ (stage 3): hpZ's secondary partitions and qwZ/qgZ staging buffers.
    zeropp: ZeroPPOptions | None = None
    memory_per_rank: int | None = None
    memory_source: str = "given"
    stage: int | None = None  # the stage the user plans (or configured): reported, not assumed
    stage_label: str = "planned"
    assumptions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise InvalidArgumentError(f"--world-size must be >= 1, got {self.world_size}")
        if self.model.params < 1:
            raise InvalidArgumentError(f"--params must be >= 1, got {self.model.params}")
        if self.precision not in PARAM_BYTES:
            raise InvalidArgumentError(
                f"--precision must be one of fp32, bf16, fp16, got {self.precision!r}"
            )
        if self.optimizer not in ("adamw", "adam", "sgd", "lamb"):
            raise InvalidArgumentError(
                f"--optimizer must be one of adamw, adam, sgd, got {self.optimizer!r}"
            )
        if self.stage is not None and self.stage not in STAGES:
            raise InvalidArgumentError(f"--stage must be one of 0, 1, 2, 3, got {self.stage}")
        if self.memory_per_rank is not None and self.memory_per_rank <= 0:
            raise InvalidArgumentError(
                f"--memory-per-rank must be positive, got {self.memory_per_rank}"
            )

    @property
    def mixed(self) -> bool:
        return self.precision != "fp32"

    @property
    def param_bytes(self) -> int:
        return PARAM_BYTES[self.precision]

    @property
    def grad_bytes(self) -> int:
        return 4 if self.grad_accum_dtype == "fp32" else self.param_bytes

    @property
    def master_bytes(self) -> int:
        return 4 if self.mixed else 0  # fp32 training updates the parameters themselves

    @property
    def state_bytes(self) -> int:
        if self.optimizer == "sgd":
            return 4 if self.momentum else 0
        return 8  # exp_avg + exp_avg_sq

    @property
    def k(self) -> int:
        """K of the paper: bytes of optimizer state per parameter, fp32 master included."""
        return self.master_bytes + self.state_bytes


@dataclass(frozen=True, kw_only=True)
class StageEstimate:
    """Bytes one rank holds at one stage (after offload)."""

    stage: int
    params: int
    grads: int
    optimizer: int  # fp32 master + optimizer state (K per parameter)
    offloaded: int  # moved off the rank by offload
    buffers: dict[str, int] = field(default_factory=dict)

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def buffer_bytes(self) -> int:
        return sum(self.buffers.values())

    @property
    def total(self) -> int:
        return self.model_states + self.buffer_bytes


@dataclass(frozen=True, kw_only=True)
class Estimate:
    inp: EstimateInput
    stages: tuple[StageEstimate, ...]

    def fits(self, stage: int) -> bool | None:
        mem = self.inp.memory_per_rank
        return None if mem is None else self.stages[stage].total <= mem

    @property
    def recommended_stage(self) -> int | None:
        """The lowest stage that fits: the least communication for the memory."""
        for s in STAGES:
            if self.fits(s):
                return s
        return None

    def min_world_size_stage3(self) -> int | None:
        """Fewest ranks at which stage 3 fits, or None if its buffers alone do not."""
        mem = self.inp.memory_per_rank
        if mem is None:
            return None
        s3 = self.stages[3]
        room = mem - s3.buffer_bytes
        if room <= 0:
            return None
        full = per_rank(self.inp, 3, world_size=1)
        return max(1, math.ceil(full.model_states / room))

    def to_json(self) -> dict[str, Any]:
        inp = self.inp
        return {
            "params": inp.model.params,
            "world_size": inp.world_size,
            "precision": inp.precision,
            "per_rank_bytes": {str(s.stage): s.model_states for s in self.stages},
            "buffer_bytes": {str(s.stage): s.buffer_bytes for s in self.stages},
            "total_bytes": {str(s.stage): s.total for s in self.stages},
            "recommended_stage": self.recommended_stage,
            "trainable_params": inp.model.trainable,
            "optimizer": inp.optimizer,
            "optimizer_bytes_per_param": inp.k,
            "memory_per_rank": inp.memory_per_rank,
            "memory_source": inp.memory_source,
            "stage": inp.stage,
            "fits": {str(s.stage): self.fits(s.stage) for s in self.stages},
            "breakdown": {
                str(s.stage): {
                    "params": s.params,
                    "grads": s.grads,
                    "optimizer": s.optimizer,
                    "offloaded": s.offloaded,
                    "buffers": dict(s.buffers),
                }
                for s in self.stages
            },
            "assumptions": list(inp.assumptions),
        }


def per_rank(inp: EstimateInput, stage: int, world_size: int | None = None) -> StageEstimate:
    """One rank's bytes at ``stage`` (``world_size`` overrides ``inp.world_size``)."""
    n = inp.world_size if world_size is None else world_size
    m = inp.model
    p, g, k = inp.param_bytes, inp.grad_bytes, inp.k
    psi, train = m.params, m.trainable
    params = p * (math.ceil(psi / n) if stage == 3 else psi)
    grads = g * (math.ceil(train / n) if stage >= 2 else train)
    optimizer = k * (math.ceil(train / n) if stage >= 1 else train)
    offloaded = 0
    if inp.offload_optimizer:
        offloaded += optimizer
        optimizer = 0
    if inp.offload_param and stage == 3:
        offloaded += params
        params = 0
    return StageEstimate(
        stage=stage,
        params=params,
        grads=grads,
        optimizer=optimizer,
        offloaded=offloaded,
        buffers=_buffers(inp, stage, n),
    )


def _collectives(backend: str) -> Literal["allreduce", "native"]:
    """The engine's choice (``zero.collective_mode``) for ``dist.backend``; ``auto`` is NCCL
    where CUDA is available, gloo otherwise."""
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    return "native" if collective_mode(backend) == "native" else "allreduce"


def _buffers(inp: EstimateInput, stage: int, n: int) -> dict[str, int]:
    """The buffers the engine allocates at ``stage`` (see the module doc), by name."""
    m = inp.model
    p = inp.param_bytes
    out: dict[str, int] = {}
    # The module in use plus `prefetch` ahead, sized by the largest ones (an upper bound).
    ahead = sorted(m.gathered_modules, reverse=True) or [m.largest_module] * (1 + inp.prefetch)
    # Stage 3's largest flat group; when every module stays whole, at most all of them.
    biggest = ahead[0] or m.persistent
    windowed = inp.optimizer in ("adamw", "adam", "sgd") and not inp.offload_optimizer
    if windowed or inp.grad_bytes != 4:
        # The largest update range: a flat group's padded buffer (stage 0) or partition.
        whole = m.trainable if stage < 3 else biggest
        span = math.ceil(whole / n) * (n if stage == 0 else 1)
        halves = 1 if inp.grad_bytes == 4 else 2  # + the window's fp32 gradient
        out["update_scratch"] = min(UPDATE_WINDOW, span) * 4 * halves
    if n > 1 and stage == 2:
        out["reduce_bucket"] = STAGE2_SLOTS * min(inp.reduce_bucket_size, m.trainable) * p
    if n > 1 and stage in (1, 2) and inp.collectives == "native":
        bucket = min(inp.allgather_bucket_size // n * n or n, math.ceil(m.params / n) * n)
        out["allgather_bucket"] = GATHER_SLOTS * bucket * p
    if stage == 3:
        out["gathered_modules"] = sum(ahead[: 1 + inp.prefetch]) * p
        z = inp.zeropp
        qgz = z is not None and z.quantized_gradients
        if n > 1 and (inp.collectives == "native" or qgz):
            # Slots for module gradients being reduce-scattered (+ NCCL's outputs); gloo
            # all-reduces each gradient where autograd left it.
            part = math.ceil(biggest / n)
            out["module_grad"] = STAGE3_SLOTS * part * (n + (inp.collectives == "native")) * p
        if m.persistent:
            out["persistent_modules"] = m.persistent * p
        if n > 1 and z is not None:
            node = z.hpz_partition_size if z.hpz_partition_size > 1 else n  # else: one node
            if z.hpz_partition_size > 1:  # hpZ: 1/hpz of every gathered module (2Ψ/hpz, bf16)
                out["hpz_secondary"] = math.ceil((m.params - m.persistent) / node) * p
            staging = zeropp_buffer_bytes(
                z,
                world_size=n,
                node=node,
                max_partition=math.ceil(biggest / n),
                prefetch=inp.prefetch,
                slots=STAGE3_SLOTS,
            )
            if staging:
                out["zeropp_staging"] = staging
    return out


def estimate(inp: EstimateInput) -> Estimate:
    return Estimate(inp=inp, stages=tuple(per_rank(inp, s) for s in STAGES))


# -- inputs ---------------------------------------------------------------------------------------

_COUNT = re.compile(r"^\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([kKmMbBtTgG]?)\s*$")
_COUNT_SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str) -> int:
    """``"7.5e9"``, ``"7.5B"``, ``"350M"``, ``"125k"``, ``"1_000_000"`` -> a parameter count."""
    m = _COUNT.match(text.replace("_", "").replace(",", ""))
    if not m:
        raise InvalidArgumentError(f"bad parameter count {text!r}; use e.g. 7.5e9, 7.5B or 350M")
    value = float(m.group(1)) * _COUNT_SCALE[m.group(2).lower()]
    if value < 1:
        raise InvalidArgumentError(f"parameter count must be >= 1, got {text!r}")
    return round(value)


def parse_memory(text: str) -> int:
    """``"16GB"`` -> 16e9 bytes, ``"16GiB"`` -> 16 * 2**30, ``"80G"`` -> 80e9, bare bytes."""
    return parse_size(text, what="memory size", examples="16GB, 16GiB or 80e9", positive=True)


def default_memory_per_rank(world_size: int) -> tuple[int, str]:
    """This machine's memory for one rank: a GPU's memory, else RAM shared by the local ranks."""
    if torch.cuda.is_available():
        total = int(torch.cuda.get_device_properties(0).total_memory)
        return total, f"memory of GPU 0 ({torch.cuda.get_device_name(0)})"
    local = max(1, min(world_size, 2))  # zshard train's default: 2 processes on CPU
    ram = int(psutil.virtual_memory().total)
    return ram // local, f"this host's RAM / {local} local rank(s)"


def _offloaded(block: Any) -> bool:
    # The config turns `device: none` into None: any block present offloads.
    return block is not None


def from_config(
    cfg: ZshardConfig,
    world_size: int,
    *,
    memory_per_rank: int | None = None,
    memory_source: str = "given",
    precision: Precision | None = None,
    offload_optimizer: bool | None = None,
    offload_param: bool | None = None,
) -> EstimateInput:
    """An estimate input for a training configuration; keyword arguments override it."""
    stats = stats_of(cfg)
    z = cfg.zero
    notes = [
        f"model {cfg.model.name!r} counted on the meta device; largest module "
        f"{stats.largest_module:,} parameters, {stats.persistent:,} in modules below "
        f"zero.param_persistence_threshold={z.param_persistence_threshold:,}"
    ]
    return EstimateInput(
        model=stats,
        world_size=world_size,
        precision=precision or cfg.precision.dtype,
        grad_accum_dtype=cfg.precision.grad_accum_dtype,
        optimizer=cfg.optimizer.name,
        momentum=cfg.optimizer.momentum > 0,
        reduce_bucket_size=z.reduce_bucket_size,
        allgather_bucket_size=z.allgather_bucket_size,
        prefetch=z.prefetch,
        collectives=_collectives(cfg.dist.backend),
        offload_optimizer=(
            _offloaded(z.offload_optimizer) if offload_optimizer is None else offload_optimizer
        ),
        offload_param=_offloaded(z.offload_param) if offload_param is None else offload_param,
        zeropp=ZeroPPOptions.from_config(z),
        memory_per_rank=memory_per_rank,
        memory_source=memory_source,
        stage=z.stage,
        stage_label="configured",
        assumptions=tuple(notes),
    )


def assumptions_for_params(stats: ModelStats, layers: int | None) -> tuple[str, ...]:
    how = f"--layers {layers}" if layers else "Ψ ≈ 12·L·d² with d ≈ 128·L"
    return (
        f"only Ψ given: the largest module is taken to be one of "
        f"{math.ceil(stats.params / stats.largest_module)} transformer layers "
        f"({stats.largest_module:,} parameters; {how}); no persistent small modules",
    )


# -- text output ----------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """Decimal units, as the ZeRO paper's figures: 1.9 GB = 1.9e9 bytes."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def render(est: Estimate) -> list[str]:
    """The human-readable report: inputs, one row per stage, the recommendation."""
    inp = est.inp
    m = inp.model
    prec = "fp32" if not inp.mixed else f"{inp.precision} mixed precision"
    frozen = f" ({m.trainable:,} trainable)" if m.trainable != m.params else ""
    lines = [
        f"model: {m.params:,} parameters{frozen}, {prec}, {inp.optimizer} "
        f"(K = {inp.k} bytes/param), {inp.world_size} rank(s)",
    ]
    offload = [
        name
        for name, on in (
            ("optimizer", inp.offload_optimizer),
            ("param (stage 3 only)", inp.offload_param),
        )
        if on
    ]
    if offload:
        lines.append(f"offload: {', '.join(offload)} (moved off the rank, not counted)")
    if inp.memory_per_rank is not None:
        lines.append(
            f"memory per rank: {human_bytes(inp.memory_per_rank)} "
            f"({inp.memory_per_rank:,} bytes; {inp.memory_source})"
        )
    header = ("stage", "params", "grads", "optimizer", "model states", "buffers", "total", "fits")
    rows = [header]
    for s in est.stages:
        fits = est.fits(s.stage)
        mark = "-" if fits is None else ("yes" if fits else "no")
        label = f"{s.stage}{' *' if s.stage == inp.stage else ''}"
        rows.append(
            (
                label,
                human_bytes(s.params),
                human_bytes(s.grads),
                human_bytes(s.optimizer),
                human_bytes(s.model_states),
                human_bytes(s.buffer_bytes),
                human_bytes(s.total),
                mark,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines.append("")
    for r in rows:
        cells = [
            c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    if inp.stage is not None:
        fits = est.fits(inp.stage)
        verdict = "" if fits is None else (": fits" if fits else ": does not fit")
        lines.append(f"* stage {inp.stage} ({inp.stage_label}){verdict}")
    rec = est.recommended_stage
    if inp.memory_per_rank is None:
        pass
    elif rec is not None:
        lines.append(
            f"recommended: stage {rec} (the lowest stage that fits in "
            f"{human_bytes(inp.memory_per_rank)} per rank: least communication)"
        )
    else:
        need = est.min_world_size_stage3()
        more = f"; stage 3 fits from {need} ranks" if need else ""
        hint = "" if inp.offload_optimizer else "; try --offload-optimizer"
        lines.append(
            f"recommended: none: no stage fits in {human_bytes(inp.memory_per_rank)} per rank"
            f"{more}{hint}"
        )
    lines.append(
        f"buffers: update scratch; reduce bucket slots (stage 2), all-gather bucket slots (1-2, "
        f"{inp.collectives} collectives: "
        f"{'in place' if inp.collectives == 'allreduce' else 'staged'}), gathered modules, "
        "module gradient slots (native or qgZ) and persistent modules (3); activations are not "
        "counted"
    )
    if inp.zeropp is not None:
        lines.append(f"{inp.zeropp.describe()} (stage 3): hpz_secondary and zeropp_staging buffers")
    lines.extend(f"assumption: {a}" for a in inp.assumptions)
    return lines


def build_input(
    *,
    config: str | None,
    params: str | None,
    world_size: int | None,
    stage: int | None,
    precision: str | None,
    optimizer: str | None,
    offload_optimizer: bool,
    offload_param: bool,
    memory_per_rank: str | None,
    layers: int | None,
    overrides: Sequence[str] = (),
) -> EstimateInput:
    """The CLI's arguments -> an :class:`EstimateInput` (exactly one of config and params)."""
    if (config is None) == (params is None):
        raise InvalidArgumentError("give a CONFIG.yaml or --params N (exactly one of them)")
    if precision is not None and precision not in PARAM_BYTES:
        raise InvalidArgumentError(f"--precision must be fp32, bf16 or fp16, got {precision!r}")
    if world_size is not None and world_size < 1:
        raise InvalidArgumentError(f"--world-size must be >= 1, got {world_size}")
    if layers is not None and layers < 1:
        raise InvalidArgumentError(f"--layers must be >= 1, got {layers}")
    if config is None and world_size is None:
        raise InvalidArgumentError("--world-size is required with --params")
    if config is not None and (layers is not None or optimizer is not None):
        raise InvalidArgumentError(
            "--layers and --optimizer apply to --params only; a CONFIG gives its own model "
            "and optimizer (override them with --set)"
        )
    if config is None and overrides:
        raise InvalidArgumentError("--set applies to a CONFIG only")
    if world_size is None:
        world_size = default_nproc()
    mem: int | None
    if memory_per_rank is not None:
        mem, source = parse_memory(memory_per_rank), "given"
    else:
        mem, source = default_memory_per_rank(world_size)
    prec: Any = precision
    if config is not None:
        # A `deepspeed:` key in the YAML is honoured as `zshard train` honours it.
        cfg, ignored = load_with_deepspeed(config, overrides, None, world_size)
        inp = from_config(
            cfg,
            world_size,
            memory_per_rank=mem,
            memory_source=source,
            precision=prec,
            offload_optimizer=offload_optimizer or None,
            offload_param=offload_param or None,
        )
        if stage is not None:
            inp = _replace(inp, stage=stage, stage_label="planned")
        if ignored:
            note = "DeepSpeed settings not applied: " + "; ".join(ignored)
            inp = _replace(inp, assumptions=(*inp.assumptions, note))
        return inp
    assert params is not None
    stats = ModelStats.assumed(parse_count(params), layers)
    return EstimateInput(
        model=stats,
        world_size=world_size,
        precision=prec or "bf16",
        optimizer=_optimizer_name(optimizer or "adamw"),
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        memory_per_rank=mem,
        memory_source=source,
        stage=stage,
        assumptions=assumptions_for_params(stats, layers),
    )


def _optimizer_name(name: str) -> OptimizerName:
    low = name.lower()
    if low == "adamw":
        return "adamw"
    if low == "adam":
        return "adam"
    if low == "sgd":
        return "sgd"
    raise InvalidArgumentError(f"--optimizer must be adamw, adam or sgd, got {name!r}")


def _replace(inp: EstimateInput, **changes: Any) -> EstimateInput:
    return dataclasses.replace(inp, **changes)
