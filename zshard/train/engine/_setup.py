"""The phases of ``Engine.__init__`` that build its training state from the model: swap spaces
(offload), flat groups, optimizer state and gradient buffers, and what moves gradients and
parameters between the module and the flat groups (the gradient sink, the stage 1-2 gather)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from zshard.train.config import ZeroConfig, ZshardConfig
from zshard.train.engine._host_alloc import release_free_heap
from zshard.train.offload import Offload, offload_bytes
from zshard.train.zero import (
    Comm,
    FlatParamGroup,
    GradReducer,
    GradSink,
    ParamGather,
    Stage3,
    ZeroPPOptions,
    build_partitioned,
    build_replicated,
    seeded,
)

log = logging.getLogger("zshard.train")


def start_offload(
    cfg: ZshardConfig,
    comm: Comm,
    param_names: list[tuple[str, nn.Parameter]],
    state_keys: tuple[str, ...],
    *,
    dtype: torch.dtype,
    device: torch.device,
    mixed: bool,
) -> Offload:
    """Swap spaces checked and created on every rank, before any group is built."""
    numel = sum(p.numel() for _, p in param_names)
    trainable = sum(p.numel() for _, p in param_names if p.requires_grad)
    need = offload_bytes(
        cfg.zero,
        numel=numel,
        trainable=trainable,
        world_size=comm.world_size,
        mixed=mixed,
        state_keys=state_keys,
        param_itemsize=torch.empty((), dtype=dtype).element_size(),
        async_save=cfg.checkpoint.async_save,
    )
    return Offload.create(
        cfg.zero, comm=comm, device=device, state_keys=state_keys, need_bytes=need
    )


def build_groups(
    model: nn.Module,
    cfg: ZshardConfig,
    comm: Comm,
    param_names: list[tuple[str, nn.Parameter]],
    offload: Offload | None,
    *,
    dtype: torch.dtype,
    device: torch.device,
    mixed: bool,
) -> list[FlatParamGroup]:
    """Flat groups: one per module at stage 3 (materialised one at a time, partitioned),
    else replicated groups of all parameters; offloaded state adopted as each is built."""
    on_built = offload.adopt if offload is not None else None
    if cfg.zero.stage == 3:
        with seeded(cfg.train.seed, device):
            return build_partitioned(
                model,
                comm=comm,
                dtype=dtype,
                device=device,
                mixed=mixed,
                persistence_threshold=cfg.zero.param_persistence_threshold,
                on_built=on_built,
            )
    return build_replicated(
        param_names,
        stage=cfg.zero.stage,
        comm=comm,
        dtype=dtype,
        device=device,
        mixed=mixed,
        on_built=on_built,
    )


def allocate_state(
    groups: list[FlatParamGroup],
    state_keys: tuple[str, ...],
    offload: Offload | None,
    *,
    stage: int,
    grad_dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Each trainable group's optimizer state (zeros; not what offload holds) and gradient."""
    for g in groups:
        if not g.trainable:
            continue
        lo, hi = g.update_range
        for key in state_keys:
            if offload is None or not offload.holds(g, key):
                g.state[key] = torch.zeros(hi - lo, dtype=torch.float32, device=device)
        # Stages 0-1 accumulate whole gradients over the window; 2-3 only the partition.
        n = g.padded_numel if stage < 2 else g.partition_numel
        g.grad = torch.zeros(n, dtype=grad_dtype, device=device)


def gradient_sink(
    model: nn.Module,
    groups: list[FlatParamGroup],
    comm: Comm,
    zero: ZeroConfig,
    offload: Offload | None,
    *,
    device: torch.device,
) -> GradSink:
    """Where gradients go as backward produces them: stage 3 reduce-scatters per module
    (a :class:`Stage3`, which gathers parameters too), stage 2 reduces buckets, stages 0-1 at
    the window's end. Installed on the model."""
    if zero.stage == 3:
        s3 = Stage3(
            model,
            groups,
            comm,
            device,
            zero.prefetch,
            offload,
            overlap=zero.overlap_comm,
            zeropp=ZeroPPOptions.from_config(zero),
            release_memory=release_free_heap if device.type == "cpu" else None,
        )
        if s3.zeropp is not None and comm.rank == 0:
            log.info("%s; %s", s3.zeropp.opts.describe(), s3.zeropp.info())
        s3.install()
        return s3
    return GradReducer(
        groups,
        comm,
        stage=zero.stage,
        bucket_numel=zero.reduce_bucket_size,
        overlap=zero.overlap_comm,
        device=device,
    )


def param_gather(
    model: nn.Module,
    groups: list[FlatParamGroup],
    comm: Comm,
    zero: ZeroConfig,
    device: torch.device,
) -> ParamGather | None:
    """Stages 1-2 (distributed): the all-gather of updated partitions after each step, waited
    for module by module in the next forward. Installed on the model."""
    if zero.stage not in (1, 2) or not comm.distributed:
        return None
    gather = ParamGather(
        model,
        groups,
        comm,
        bucket_numel=zero.allgather_bucket_size,
        overlap=zero.overlap_comm,
        device=device,
    )
    gather.install()
    return gather
