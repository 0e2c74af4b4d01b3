"""``zshard import``: foreign weights or training state -> a committed checkpoint for N ranks.

Accepts one ``.safetensors`` file or a directory of Hugging Face-style shards with
``model.safetensors.index.json``, and (through :mod:`zshard.convert.sources`) DeepSpeed ZeRO
and torch.distributed.checkpoint directories with their optimizer state. Every header is
validated before anything is written; data is streamed shard by shard in bounded windows, so
memory stays flat whatever the model size.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from zshard.convert.safetensors_io import SafetensorsSource
from zshard.convert.sources import open_source
from zshard.convert.tensor_source import SourceTensor, TensorSource
from zshard.errors import InvalidArgumentError
from zshard.store import dtypes
from zshard.store.layout import FlatGroup, Fragment, Layout, pack
from zshard.store.manifest import ArrayEntry, TensorEntry
from zshard.store.root import CheckpointRef, step_dir_name
from zshard.store.writer import CheckpointWriter

WINDOW_BYTES = 16 << 20


def import_safetensors(
    src: str,
    root: str,
    world_size: int,
    stage: int = 1,
    *,
    step: int = 0,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> CheckpointRef:
    """Import a .safetensors file or Hugging Face directory (state kind ``param``)."""
    _check_args(world_size, stage)
    source = SafetensorsSource(src)
    return import_source(
        source, root, world_size, stage, step=step, overwrite=overwrite, progress=progress
    )


def import_checkpoint(
    src: str,
    root: str,
    world_size: int,
    stage: int | None = None,
    *,
    tag: str | None = None,
    trust_pickle: bool = False,
    step: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> CheckpointRef:
    """Import any format :func:`zshard.convert.sources.detect` knows (safetensors, DeepSpeed,
    DCP). ``stage`` defaults to the source's ZeRO stage (DeepSpeed) or 1; ``step`` to the
    source's step."""
    _check_args(world_size, 1 if stage is None else stage)
    source = open_source(src, tag=tag, trust_pickle=trust_pickle)
    if stage is None:
        stage = int(getattr(source, "zero_stage", 1))
    return import_source(
        source, root, world_size, stage, step=step, overwrite=overwrite, progress=progress
    )


def _check_args(world_size: int, stage: int) -> None:
    if world_size < 1:
        raise InvalidArgumentError(f"--world-size must be >= 1, got {world_size}")
    if not 0 <= stage <= 3:
        raise InvalidArgumentError(f"--stage must be 0, 1, 2 or 3, got {stage}")


def import_source(
    source: TensorSource,
    root: str,
    world_size: int,
    stage: int = 1,
    *,
    step: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> CheckpointRef:
    """Write every logical tensor of ``source`` as a checkpoint laid out for ``world_size``.

    A logical tensor's state kinds share one placement, as in the engine's own checkpoints:
    names are grouped into flat groups by their kinds and dtypes (and module, at stage 3), and
    each (group, kind) becomes one array.
    """
    _check_args(world_size, stage)
    step = source.step if step is None else step
    by_name: dict[str, dict[str, SourceTensor]] = {}
    for t in source.tensors:
        by_name.setdefault(t.name, {})[t.kind] = t
    by_group: dict[tuple[str, tuple[tuple[str, str], ...]], list[str]] = defaultdict(list)
    for name, kinds in by_name.items():
        shapes = {k: t.shape for k, t in kinds.items()}
        if len(set(shapes.values())) > 1:
            raise InvalidArgumentError(
                f"{source.url}: the state kinds of tensor {name!r} differ in shape ({shapes}); "
                "the checkpoint is inconsistent"
            )
        sig = tuple(sorted((k, t.dtype) for k, t in kinds.items()))
        module = name.rpartition(".")[0] if stage == 3 else ""
        by_group[(module, sig)].append(name)
    groups: list[FlatGroup] = []
    arrays: list[ArrayEntry] = []
    tensors: list[TensorEntry] = []
    plan: list[tuple[FlatGroup, str, list[tuple[SourceTensor, list[Fragment]]]]] = []
    for i, ((_, sig), names) in enumerate(by_group.items()):
        gname = f"g{i:04d}"
        kind0 = sig[0][0]  # every kind of a name has the same numel
        g, frags = pack(gname, [(n, by_name[n][kind0].numel) for n in names], world_size)
        groups.append(g)
        for kind, dtype in _kind_order(sig):
            arrays.append(ArrayEntry(gname, kind, dtype))
            members = [(by_name[n][kind], frags[n]) for n in names]
            plan.append((g, kind, members))
            for t, f in members:
                tensors.append(TensorEntry(t.name, kind, t.shape, dtype, tuple(f)))
    layout = Layout(world_size, stage, tuple(groups))
    writer = CheckpointWriter(
        root,
        step,
        layout,
        arrays,
        tensors,
        ties=source.ties,
        overwrite=overwrite,
        name=step_dir_name(step),
    )
    writer.prepare()
    by_key = {(g.name, kind): (g, members) for g, kind, members in plan}
    try:
        # Rank by rank, each stored array's groups in their order: one shard open at a time.
        for rank in range(world_size):
            for s in writer.stored:
                for gname, _ in s.segments:
                    g, members = by_key[(gname, s.kind)]
                    _write_import_shard(writer, source, g, s.kind, rank, members, progress)
        writer.commit(source.state)
    except BaseException:
        # Nothing was committed; remove the partial step directory so it leaves no trace, and
        # release the root lock taken by prepare().
        writer.abort()
        raise
    return CheckpointRef(root, writer.name)


def _kind_order(sig: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """``param``, ``master``, ``buffer`` first, then optimizer state kinds by name."""
    first = {"param": 0, "master": 1, "buffer": 2}
    return sorted(sig, key=lambda kd: (first.get(kd[0], 3), kd[0]))


def _write_import_shard(
    writer: CheckpointWriter,
    source: TensorSource,
    g: FlatGroup,
    kind: str,
    rank: int,
    members: list[tuple[SourceTensor, list[Fragment]]],
    progress: Callable[[int], None] | None,
) -> None:
    dt = dtypes.dtype(writer.manifest.array(g.name, kind).dtype)
    window = max(1, WINDOW_BYTES // dt.itemsize)
    w = writer.shard_writer(g.name, kind, rank)
    try:
        pos = rank * g.partition_numel  # next group offset the shard expects
        for t, frags in members:
            for f in frags:
                if f.rank != rank:
                    continue
                assert f.offset == pos, "pack() lays members end to end"
                for a in range(f.start, f.start + f.length, window):
                    b = min(a + window, f.start + f.length)
                    w.write(source.read(t, a, b))
                    if progress:
                        progress((b - a) * dt.itemsize)
                pos += f.length
        w.close()
    except BaseException:
        w.abort()
        raise
