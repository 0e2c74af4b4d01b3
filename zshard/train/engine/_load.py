"""Loading an engine checkpoint: each flat group's logical-tensor ranges this rank's layout
needs, so a checkpoint saved at any world size and stage loads at any other."""

from __future__ import annotations

import logging
from typing import Any

import torch

from zshard.store import (
    CheckpointReader,
)
from zshard.train.engine._state import Checkpointable, _set_rng_state, check_model_matches
from zshard.train.zero import FlatParamGroup

log = logging.getLogger("zshard.train")


# -- loading ------------------------------------------------------------------------------------


def _has(reader: CheckpointReader, name: str, kind: str) -> bool:
    return reader.has(name, kind) or reader.has(reader.manifest.ties.get(name, ""), kind)


def _fill_range(
    reader: CheckpointReader, g: FlatParamGroup, kinds: tuple[str, ...], dest: torch.Tensor, lo: int
) -> None:
    """``dest`` covers flat elements [lo, lo + numel): fill each member's overlap from the first
    of ``kinds`` the checkpoint has for it."""
    hi = lo + dest.numel()
    for m in g.members:
        a, b = max(lo, m.offset), min(hi, m.offset + m.numel)
        if a >= b:
            continue
        kind = next(k for k in kinds if _has(reader, m.name, k))
        src = reader.read_torch(m.name, kind, a - m.offset, b - m.offset)
        dest[a - lo : b - lo].copy_(src)


def _fill_kind(
    engine: Checkpointable,
    reader: CheckpointReader,
    g: FlatParamGroup,
    kind: str,
    sources: tuple[str, ...],
    resident: torch.Tensor | None,
    lo: int,
) -> None:
    """Fill ``g``'s ``kind`` (flat elements from ``lo``) from the first of ``sources`` the
    checkpoint has, or with zeros if ``sources`` is empty: in place when resident, else as a
    new version of the offloaded array, streamed window by window."""
    off = engine.offload
    if off is not None and off.holds(g, kind):
        dtype = g.dtype if kind == "param" else torch.float32

        def produce(a: int, b: int) -> torch.Tensor:
            buf = torch.zeros(b - a, dtype=dtype)
            if sources:
                _fill_range(reader, g, sources, buf, lo + a)
            return buf

        off.fill(g, kind, produce)
        return
    assert resident is not None, (g.name, kind)
    if sources:
        _fill_range(reader, g, sources, resident, lo)
    else:
        resident.zero_()


def _load(engine: Checkpointable, url: str) -> dict[str, Any]:
    """Load a checkpoint (a step directory, or a root's newest) into ``engine``.

    Returns the ``extra`` mapping given to save (e.g. the data position).
    """
    reader = CheckpointReader.open(url)
    shapes = {m.name: tuple(m.shape) for g in engine.groups for m in g.members}
    check_model_matches(reader.url, reader.manifest, shapes, engine.ties)
    keys = engine.optimizer.state_keys
    with_optimizer = all(
        _has(reader, m.name, k)
        for g in engine.groups
        if g.trainable
        for m in g.members
        for k in keys
    )
    if not with_optimizer and keys:
        log.info(
            "checkpoint %s has no %s state: starting the optimizer fresh",
            reader.url,
            "/".join(keys),
        )
    # The master (fp32) is the better source of parameter values when both exist. Kind by kind,
    # group by group: each stored array is then read front to back (one shard per kind holds
    # every group since format 2), which on object stores is a few large read-ahead requests.
    value_kinds = ("master", "param")
    for g in engine.groups:
        if engine.stage < 3:
            assert g.flat is not None
            _fill_range(reader, g, value_kinds, g.flat, 0)
        else:
            _fill_kind(engine, reader, g, "param", value_kinds, g.param_part, g.partition_range[0])
            if g.persistent and g.flat is not None:
                assert g.param_part is not None
                engine.comm.all_gather(g.flat, g.param_part)
    trainable = [g for g in engine.groups if g.trainable]
    for g in trainable:
        if not g.master_is_param:
            _fill_kind(engine, reader, g, "master", value_kinds, g.master, g.update_range[0])
    for key in engine.optimizer.state_keys:
        sources = (key,) if with_optimizer else ()
        for g in trainable:
            _fill_kind(engine, reader, g, key, sources, g.state.get(key), g.update_range[0])
    for bg in engine.buffer_groups:
        for name, t in bg.tensors():
            if _has(reader, name, "buffer"):
                t.copy_(reader.read_torch(name, "buffer").view(t.shape))
            else:
                log.warning(
                    "checkpoint %s has no buffer %r: keeping its current value", reader.url, name
                )
    if engine.offload is not None:
        engine.offload.broken = None  # every offloaded array was just rewritten whole
    state = reader.manifest.state
    engine.load_train_state(state.get("train", {}), with_optimizer=with_optimizer)
    engine.zero_grad()
    if reader.manifest.layout.world_size == engine.world_size:
        # Same world size: each rank continues its own random stream (dropout masks...).
        _set_rng_state(reader.read_rank_state(engine.rank).get("rng", {}))
    log.info("loaded checkpoint %s (step %d)", reader.url, engine.global_step)
    extra = state.get("extra", {})
    return dict(extra) if isinstance(extra, dict) else {}
