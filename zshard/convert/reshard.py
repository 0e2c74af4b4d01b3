"""``zshard reshard``: rewrite a checkpoint's layout for another world size, bitwise.

Every state kind is carried by key (params, master weights, any optimizer's state, buffers), so
this works for Adam, SGD or anything else (docs/design.md, invariant 5). Each tensor keeps its
flat group; groups are repacked end to end for the new world size, and every new shard is
streamed from ranged reads of the old one in bounded windows: peak memory is one window, whatever
the model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from zshard.errors import InvalidArgumentError
from zshard.store import dtypes
from zshard.store.layout import FlatGroup, Fragment, Layout, pack
from zshard.store.manifest import ArrayEntry, Manifest, TensorEntry
from zshard.store.reader import CheckpointReader
from zshard.store.root import CheckpointRef, resharded_dir_name, step_dir_name
from zshard.store.writer import CheckpointWriter

WINDOW_BYTES = 16 << 20


def plan_layout(m: Manifest, world_size: int, stage: int) -> tuple[Layout, list[TensorEntry]]:
    """The same tensors, in the same flat groups and order, cut for ``world_size`` ranks.

    A name's kinds share one placement: its param, master and optimizer states line up, as the
    engine expects. A name stored with different sizes across kinds (Adam's per-parameter
    ``step`` scalar next to its ``exp_avg``) gets a group of its own for each size: one
    placement cannot cover both sizes.
    """
    sizes: dict[str, set[int]] = defaultdict(set)
    # (name, numel) -> (group, offset of its first element)
    home: dict[tuple[str, int], tuple[str, int]] = {}
    for t in m.tensors:
        sizes[t.name].add(t.numel)
        if t.fragments:
            first = min(t.fragments, key=lambda f: f.start)
            home.setdefault((t.name, t.numel), (first.group, first.offset))
    order: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for (name, numel), (group, offset) in home.items():
        key = group if len(sizes[name]) == 1 else f"{group}:{name}:{numel}"
        order[key].append((offset, name, numel))
    groups: list[FlatGroup] = []
    placement: dict[tuple[str, int], list[Fragment]] = {}
    for i, key in enumerate(sorted(order, key=lambda k: (k.split(":")[0], k))):
        members = sorted(order[key])
        g, frags = pack(f"g{i:04d}", [(n, numel) for _, n, numel in members], world_size)
        groups.append(g)
        placement.update({(n, numel): frags[n] for _, n, numel in members})
    tensors = [
        TensorEntry(t.name, t.kind, t.shape, t.dtype, tuple(placement.get((t.name, t.numel), [])))
        for t in m.tensors
    ]
    return Layout(world_size, stage, tuple(groups)), tensors


def reshard(
    ckpt: str,
    to: int,
    *,
    out: str | None = None,
    stage: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> CheckpointRef:
    """Write ``ckpt`` laid out for ``to`` ranks as a new committed checkpoint; returns it.

    Without ``out`` the result goes next to the source as ``step-NNNNNNNN-w<to>``; with ``out``
    it goes under that root as ``step-NNNNNNNN``. The source is never modified.
    """
    if to < 1:
        raise InvalidArgumentError(f"--to must be a positive world size, got {to}")
    if stage is not None and not 0 <= stage <= 3:
        raise InvalidArgumentError(f"--stage must be 0, 1, 2 or 3, got {stage}")
    reader = CheckpointReader.open(ckpt)
    m = reader.manifest
    layout, tensors = plan_layout(m, to, m.layout.stage if stage is None else stage)
    kinds_in_group: dict[str, dict[str, str]] = defaultdict(dict)
    for t in tensors:
        for f in t.fragments:
            kinds_in_group[f.group][t.kind] = t.dtype
    arrays = [
        ArrayEntry(g.name, kind, dt)
        for g in layout.groups
        for kind, dt in sorted(kinds_in_group[g.name].items())
    ]
    root = out if out is not None else reader.ref.root_url
    name = step_dir_name(m.step) if out is not None else resharded_dir_name(m.step, to)
    if out is None and name == reader.ref.name:
        raise InvalidArgumentError(f"{reader.url} is already laid out for {to} ranks")
    writer = CheckpointWriter(
        root, m.step, layout, arrays, tensors, ties=m.ties, overwrite=overwrite, name=name
    )
    if writer.dir.url == reader.dir.url:
        # prepare() would un-commit and delete the very checkpoint this reads from.
        raise InvalidArgumentError(
            f"{reader.url}: the output would replace the source checkpoint; pass another --out"
        )
    writer.prepare()
    by_key = {(a.group, a.kind): a for a in arrays}
    try:
        # Rank by rank, each stored array's groups in their order: one shard open at a time.
        for rank in range(to):
            for s in writer.stored:
                for group, _ in s.segments:
                    _write_shard(reader, writer, by_key[(group, s.kind)], rank, progress)
        for r in range(to if m.rank_state else 0):
            # Per-rank state (RNG) follows its rank where it exists; new ranks start empty.
            writer.write_rank_state(reader.read_rank_state(r) if r < m.rank_state else {}, r)
        state = dict(m.state)
        state["resharded_from"] = {"world_size": m.layout.world_size, "stage": m.layout.stage}
        writer.commit(state, rank_state=bool(m.rank_state))
    except BaseException:
        writer.abort()  # remove the partial output and release the root lock taken by prepare()
        raise
    return CheckpointRef(root, name)


def _write_shard(
    reader: CheckpointReader,
    writer: CheckpointWriter,
    a: ArrayEntry,
    rank: int,
    progress: Callable[[int], None] | None,
) -> None:
    g = writer.manifest.layout.group(a.group)
    dt = dtypes.dtype(a.dtype)
    window = max(1, WINDOW_BYTES // dt.itemsize)
    pieces = sorted(
        (
            (f, t)
            for t in writer.manifest.tensors
            if t.kind == a.kind
            for f in t.fragments
            if f.group == a.group and f.rank == rank
        ),
        key=lambda p: p[0].offset,
    )
    w = writer.shard_writer(a.group, a.kind, rank)
    try:
        pos = rank * g.partition_numel
        for f, t in pieces:
            if f.offset > pos:  # a name without this kind (e.g. a frozen param's exp_avg)
                w.write(np.zeros(f.offset - pos, dtype=dt.numpy))
            source = reader.tensor(t.name, t.kind)
            for lo in range(f.start, f.start + f.length, window):
                hi = min(lo + window, f.start + f.length)
                w.write(reader.read(source.name, source.kind, lo, hi))
                if progress:
                    progress((hi - lo) * dt.itemsize)
            pos = f.offset + f.length
        w.close()
    except BaseException:
        w.abort()
        raise
