"""``zshard import``: safetensors weights -> a committed checkpoint laid out for N ranks.

Accepts one ``.safetensors`` file or a directory of Hugging Face-style shards with
``model.safetensors.index.json``. Every header is validated before anything is written; data is
streamed shard by shard in bounded windows, so memory stays flat whatever the model size.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from zshard.convert.safetensors_io import SafetensorsEntry, read_header, read_tensor
from zshard.errors import InvalidArgumentError, NotACheckpointError, ZshardError
from zshard.store import dtypes
from zshard.store.layout import FlatGroup, Fragment, Layout, pack
from zshard.store.manifest import ArrayEntry, TensorEntry
from zshard.store.root import CheckpointRef, step_dir_name
from zshard.store.storage import Storage, open_storage
from zshard.store.writer import CheckpointWriter

INDEX_NAME = "model.safetensors.index.json"
TIES_METADATA_KEY = "zshard.ties"
WINDOW_BYTES = 16 << 20


@dataclass(frozen=True)
class Source:
    storage: Storage  # the directory (or the file's parent)
    key: str  # file name within it
    entry: SafetensorsEntry


def find_sources(src: str) -> tuple[list[Source], dict[str, str]]:
    """Every tensor of a safetensors file or HF-style directory, and the ties it records."""
    storage = open_storage(src)
    if storage.isdir(""):
        if storage.exists(INDEX_NAME):
            try:
                index = json.loads(storage.read(INDEX_NAME))
                files = list(dict.fromkeys(index["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise InvalidArgumentError(
                    f"{src}/{INDEX_NAME}: not a valid index (needs a 'weight_map' object)"
                ) from None
        elif storage.exists("model.safetensors"):
            files = ["model.safetensors"]
        else:
            raise NotACheckpointError(
                f"{src}: no {INDEX_NAME} or model.safetensors here; pass a .safetensors file or "
                "a Hugging Face model directory"
            )
        if not all(isinstance(f, str) and "/" not in f and f not in ("", ".", "..") for f in files):
            raise InvalidArgumentError(f"{src}/{INDEX_NAME}: weight_map names files outside it")
    else:
        if not storage.exists(""):
            raise InvalidArgumentError(f"{src}: no such file or directory")
        parent, _, name = src.rstrip("/").rpartition("/")
        storage, files = open_storage(parent or "."), [name]
    sources: list[Source] = []
    ties: dict[str, str] = {}
    seen: set[str] = set()
    for f in files:
        header = read_header(storage, f)
        raw_ties = header.metadata.get(TIES_METADATA_KEY)
        if raw_ties:
            try:
                ties.update({str(k): str(v) for k, v in json.loads(raw_ties).items()})
            except (ValueError, AttributeError):
                raise InvalidArgumentError(f"{f}: malformed {TIES_METADATA_KEY} metadata") from None
        for e in header.entries:
            if e.name in seen:
                raise InvalidArgumentError(f"{src}: tensor {e.name!r} appears in two files")
            seen.add(e.name)
            sources.append(Source(storage, f, e))
    if not sources:
        raise InvalidArgumentError(f"{src}: no tensors found")
    ties = {a: t for a, t in ties.items() if a not in seen and t in seen}
    return sources, ties


def group_key(name: str, dtype: str, stage: int) -> tuple[str, str]:
    """Flat group policy: one per dtype (stages 0-2), one per module and dtype (stage 3)."""
    module = name.rpartition(".")[0] if stage == 3 else ""
    return module, dtype


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
    if world_size < 1:
        raise InvalidArgumentError(f"--world-size must be >= 1, got {world_size}")
    if not 0 <= stage <= 3:
        raise InvalidArgumentError(f"--stage must be 0, 1, 2 or 3, got {stage}")
    sources, ties = find_sources(src)
    by_group: dict[tuple[str, str], list[Source]] = defaultdict(list)
    for s in sources:
        by_group[group_key(s.entry.name, s.entry.dtype, stage)].append(s)
    groups: list[FlatGroup] = []
    arrays: list[ArrayEntry] = []
    tensors: list[TensorEntry] = []
    members: dict[str, list[tuple[Source, list[Fragment]]]] = {}
    for i, (key, group_sources) in enumerate(by_group.items()):
        name = f"g{i:04d}"
        g, frags = pack(name, [(s.entry.name, s.entry.numel) for s in group_sources], world_size)
        groups.append(g)
        arrays.append(ArrayEntry(name, "param", key[1]))
        members[name] = [(s, frags[s.entry.name]) for s in group_sources]
        for s in group_sources:
            e = s.entry
            tensors.append(TensorEntry(e.name, "param", e.shape, e.dtype, tuple(frags[e.name])))
    layout = Layout(world_size, stage, tuple(groups))
    writer = CheckpointWriter(
        root,
        step,
        layout,
        arrays,
        tensors,
        ties=ties,
        overwrite=overwrite,
        name=step_dir_name(step),
    )
    writer.prepare()
    try:
        for g in groups:
            for rank in range(world_size):
                _write_import_shard(writer, g, rank, members[g.name], progress)
        writer.commit({"source": {"format": "safetensors", "path": src}})
    except BaseException:
        # Nothing was committed; remove the partial step directory so it leaves no trace.
        with contextlib.suppress(ZshardError):
            writer.dir.remove_tree("")
        raise
    return CheckpointRef(root, writer.name)


def _write_import_shard(
    writer: CheckpointWriter,
    g: FlatGroup,
    rank: int,
    members: list[tuple[Source, list[Fragment]]],
    progress: Callable[[int], None] | None,
) -> None:
    dt = dtypes.dtype(writer.manifest.array(g.name, "param").dtype)
    window = max(1, WINDOW_BYTES // dt.itemsize)
    w = writer.shard_writer(g.name, "param", rank)
    try:
        pos = rank * g.partition_numel  # next group offset the shard expects
        for s, frags in members:
            for f in frags:
                if f.rank != rank:
                    continue
                assert f.offset == pos, "pack() lays members end to end"
                for a in range(f.start, f.start + f.length, window):
                    b = min(a + window, f.start + f.length)
                    w.write(read_tensor(s.storage, s.key, s.entry, a, b))
                    if progress:
                        progress((b - a) * dt.itemsize)
                pos += f.length
        w.close()
    except BaseException:
        w.abort()
        raise
