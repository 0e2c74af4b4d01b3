"""``Engine.gathered_parameters``: the full parameters in the module, for inspection or editing,
and the edits written back to the partitions and to the fp32 master on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from zshard.train.offload import Offload
from zshard.train.zero import Comm, FlatParamGroup, Stage3


@contextlib.contextmanager
def gathered_module(
    module: nn.Module,
    groups: list[FlatParamGroup],
    comm: Comm,
    *,
    stage: int,
    stage3: Stage3 | None,
    offload: Offload | None,
    device: torch.device,
    modifier_rank: int | None,
) -> Iterator[nn.Module]:
    """``module`` with full parameters (stage 3 gathers them and holds them to the end; other
    stages hold them already); on a clean exit, the edits of ``modifier_rank`` (every rank's own
    if None) are written back. Call it with nothing in flight (``Engine.synchronize``)."""
    if stage3 is not None:
        stage3.hold_all = True
        for g in groups:
            stage3.gather(g)
    before = {}
    if stage < 3:
        for g in groups:
            if g.trainable and not g.master_is_param:
                lo, hi = g.update_range
                before[g.name] = g.flat[lo:hi].clone()  # type: ignore[index]
    ok = False
    try:
        yield module
        ok = True
    finally:
        if ok:
            _write_back_edits(groups, comm, stage, offload, device, before, modifier_rank)
        if stage3 is not None:
            stage3.hold_all = False
            stage3.release_all()


def _write_back_edits(
    groups: list[FlatParamGroup],
    comm: Comm,
    stage: int,
    off: Offload | None,
    device: torch.device,
    before: dict[str, torch.Tensor],
    modifier_rank: int | None,
) -> None:
    for g in groups:
        assert g.flat is not None
        if modifier_rank is not None:
            comm.broadcast(g.flat, modifier_rank)
        if stage == 3:
            lo, hi = g.partition_range
            new = g.flat[lo:hi]
            if off is not None and off.holds(g, "param"):
                old = off.read_full(g, "param").to(device)
                off.fill(g, "param", _slicer(new))
            else:
                assert g.param_part is not None
                old = g.param_part.clone()
                g.param_part.copy_(new)
        elif g.name in before:
            lo, hi = g.update_range
            old, new = before[g.name], g.flat[lo:hi]
        else:
            continue
        if g.trainable and not g.master_is_param:
            # Only edited elements replace the master: the rest keep their fp32 bits.
            changed = new != old
            if off is not None and off.holds(g, "master"):
                off.modify(g, "master", _edits(new, changed))
            else:
                assert g.master is not None
                g.master[changed] = new[changed].float()


def _slicer(src: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
    return lambda a, b: src[a:b]


def _edits(new: torch.Tensor, changed: torch.Tensor) -> Callable[[torch.Tensor, int, int], None]:
    """Apply the edited elements of ``new`` (where ``changed``) to a window [a, b) of a master."""

    def edit(window: torch.Tensor, a: int, b: int) -> None:
        mask = changed[a:b].to(window.device)
        window[mask] = new[a:b].to(window.device)[mask].float()

    return edit
