"""Building flat groups from a model: replicated (stages 0-2) or partitioned module by module
(stage 3, materialising a ``meta`` model one module at a time).

Every flat group is filled from full-precision values that rank 0 broadcasts (as DDP does), so
all ranks start identical even if their models were initialised differently; the fp32 master is
taken from those values before they are cast to the module dtype.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from zshard.errors import InvalidArgumentError
from zshard.train.models import on_meta
from zshard.train.zero._comm import Comm
from zshard.train.zero._flat import FlatBufferGroup, FlatParamGroup

NamedParams = list[tuple[str, nn.Parameter]]


def canonical_parameters(model: nn.Module) -> tuple[NamedParams, dict[str, str]]:
    """Each Parameter once under its first name, and ties: alias name -> that first name."""
    first: dict[int, str] = {}
    params: NamedParams = []
    ties: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties[name] = first[id(p)]
        else:
            first[id(p)] = name
            params.append((name, p))
    return params, ties


def target_dtype(p: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if p.is_floating_point() else p.dtype


def _source_dtype(dtype: torch.dtype) -> torch.dtype:
    # Full-precision staging for floating groups, so the master keeps every bit the model had.
    return torch.float32 if dtype.is_floating_point else dtype


def _split(params: NamedParams, dtype: torch.dtype) -> dict[tuple[torch.dtype, bool], NamedParams]:
    keyed: dict[tuple[torch.dtype, bool], NamedParams] = defaultdict(list)
    for name, p in params:
        keyed[(target_dtype(p, dtype), p.requires_grad)].append((name, p))
    return keyed


def _group_name(
    base: str, key: tuple[torch.dtype, bool], keys: Sequence[tuple[torch.dtype, bool]]
) -> str:
    """``base``, suffixed only as far as needed to tell the keys apart: ``params.bfloat16``,
    ``blocks.0.ln.frozen``."""
    dtype, trainable = key
    name = base
    if len({k[0] for k in keys}) > 1:
        name += "." + str(dtype).removeprefix("torch.")
    if not trainable:
        name += ".frozen"
    return name


def _fill(g: FlatParamGroup, src: torch.Tensor, *, mixed: bool, stage: int) -> None:
    """Set ``g``'s partition and master from ``src`` (N*P,) full-precision values."""
    lo, hi = g.partition_range
    if stage < 3:
        flat = src if src.dtype == g.dtype else src.to(g.dtype)
        g.attach(flat)
        g.param_part = flat[lo:hi]
    else:
        g.param_part = src[lo:hi].to(g.dtype, copy=True)
    if not g.trainable:
        return
    ulo, uhi = g.update_range
    if mixed and g.dtype != torch.float32:
        # Stage 0 keeps the whole fp32 buffer as master; otherwise only the partition.
        g.master = src if stage == 0 else src[ulo:uhi].clone()
    else:
        g.master = g.flat[ulo:uhi] if stage < 3 else g.param_part  # type: ignore[index]
        g.master_is_param = True


def build_replicated(
    params: NamedParams,
    *,
    stage: int,
    comm: Comm,
    dtype: torch.dtype,
    device: torch.device,
    mixed: bool,
    on_built: Callable[[FlatParamGroup], None] | None = None,
) -> list[FlatParamGroup]:
    """Stages 0-2: one flat group per (dtype, trainable) — normally just ``params``.

    ``on_built(g)`` runs as soon as each group is filled (offload moves its state away)."""
    keyed = _split(params, dtype)
    groups = []
    for key, members in keyed.items():
        name = _group_name("params", key, list(keyed))
        g = FlatParamGroup(
            name,
            members,
            world_size=comm.world_size,
            rank=comm.rank,
            stage=stage,
            dtype=key[0],
            trainable=key[1],
        )
        src = comm.broadcast(g.gather_source(_source_dtype(g.dtype), device), 0)
        _fill(g, src, mixed=mixed, stage=stage)
        del src
        if on_built is not None:
            on_built(g)
        groups.append(g)
    return groups


def _aliases(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    out: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                out[id(p)].append((module, attr))
    return out


def _materialize(
    model: nn.Module,
    path: str,
    module: nn.Module,
    aliases: dict[int, list[tuple[nn.Module, str]]],
    names: dict[int, str],
    device: torch.device,
) -> None:
    """Give ``module``'s own meta tensors storage on ``device`` and initialise them.

    A new Parameter replaces the meta one under every alias (ties survive; ``to_empty`` would
    untie them). Values come from the model's ``init_weights()`` — called while only this module
    holds storage, so it draws random numbers for this module alone, in module order, exactly as
    one call on a materialised model would — or else the module's ``reset_parameters()``.
    """
    touched = False
    for attr, p in list(module._parameters.items()):
        if p is None or not p.is_meta:
            continue
        new = nn.Parameter(
            torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad
        )
        for owner, owner_attr in aliases.pop(id(p), [(module, attr)]):
            owner._parameters[owner_attr] = new
        aliases[id(new)] = [(module, attr)]
        names[id(new)] = names.pop(id(p))
        touched = True
    for attr, b in list(module._buffers.items()):
        if b is not None and b.is_meta:
            module._buffers[attr] = torch.empty(b.shape, dtype=b.dtype, device=device)
            touched = True
    if not touched:
        return
    with torch.no_grad():
        init_weights = getattr(model, "init_weights", None)
        reset = getattr(module, "reset_parameters", None)
        if callable(init_weights):
            init_weights()
        elif callable(reset):
            reset()
        else:
            raise InvalidArgumentError(
                f"module {path or '<root>'!r} ({type(module).__name__}) was built on the meta "
                "device but has no reset_parameters() to initialise it; give the model an "
                "init_weights() method, or pass a materialised model instead of a model_factory"
            )


def build_partitioned(
    model: nn.Module,
    *,
    comm: Comm,
    dtype: torch.dtype,
    device: torch.device,
    mixed: bool,
    persistence_threshold: int,
    on_built: Callable[[FlatParamGroup], None] | None = None,
) -> list[FlatParamGroup]:
    """Stage 3: one flat group per module that directly owns parameters, in module order.

    Each module is materialised (if on meta), flattened, broadcast, cut to this rank's partition
    and released before the next one, so the whole model never exists on one rank. A group with
    fewer than ``persistence_threshold`` elements stays whole (``persistent``); those are gathered
    at the end, so ``init_weights()`` above never sees a materialised neighbour.
    """
    params, _ = canonical_parameters(model)
    names = {id(p): n for n, p in params}
    aliases = _aliases(model)
    seen: set[str] = set()
    groups: list[FlatParamGroup] = []
    for path, module in model.named_modules():
        _materialize(model, path, module, aliases, names, device)
        own: NamedParams = []
        for p in module._parameters.values():
            if p is not None and names[id(p)] not in seen:
                seen.add(names[id(p)])
                own.append((names[id(p)], p))
        if not own:
            continue
        keyed = _split(own, dtype)
        for key, members in keyed.items():
            name = _group_name(path or "_root", key, list(keyed))
            g = FlatParamGroup(
                name,
                members,
                world_size=comm.world_size,
                rank=comm.rank,
                stage=3,
                dtype=key[0],
                trainable=key[1],
            )
            src = comm.broadcast(g.gather_source(_source_dtype(g.dtype), device), 0)
            _fill(g, src, mixed=mixed, stage=3)
            del src
            g.detach()
            g.persistent = g.numel < persistence_threshold
            if on_built is not None:
                on_built(g)  # offload: this module's partitions leave before the next is built
            groups.append(g)
    for g in groups:
        if g.persistent:
            assert g.param_part is not None
            flat = torch.empty(g.padded_numel, dtype=g.dtype, device=device)
            comm.all_gather(flat, g.param_part)
            g.attach(flat)
    return groups


def prepare_buffers(
    model: nn.Module, *, comm: Comm, dtype: torch.dtype, device: torch.device, mixed: bool
) -> None:
    """Move buffers to ``device``, cast floating ones to the module dtype, take rank 0's values."""
    for module in model.modules():
        for attr, b in list(module._buffers.items()):
            if b is None:
                continue
            want = dtype if (mixed and b.is_floating_point()) else b.dtype
            b = b.to(device=device, dtype=want)
            module._buffers[attr] = comm.broadcast(b.contiguous(), 0)


def buffer_groups(model: nn.Module, comm: Comm) -> list[FlatBufferGroup]:
    """Persistent buffers (those in ``state_dict``), one flat group per dtype."""
    seen: set[int] = set()
    by_dtype: dict[torch.dtype, list[tuple[str, nn.Module, str]]] = defaultdict(list)
    for path, module in model.named_modules():
        for attr, b in module._buffers.items():
            if b is None or attr in module._non_persistent_buffers_set or id(b) in seen:
                continue
            seen.add(id(b))
            by_dtype[b.dtype].append((f"{path}.{attr}" if path else attr, module, attr))
    out = []
    for dt, entries in by_dtype.items():
        name = "buffers" if len(by_dtype) == 1 else "buffers." + str(dt).removeprefix("torch.")
        out.append(FlatBufferGroup(name, entries, comm.world_size, comm.rank))
    return out


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """A forked RNG seeded with ``seed``: every rank draws the same initial values, and the
    caller's RNG stream is left as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def build_model(
    factory: Callable[[], nn.Module], *, seed: int, device: torch.device, meta: bool
) -> nn.Module:
    """Call ``factory``: on ``meta`` for stage 3 (values come at materialisation), else seeded."""
    if meta:
        with on_meta():
            return factory()
    with seeded(seed, device):
        return factory()
