"""``zshard consolidate``: a checkpoint -> safetensors weights, streaming in bounded memory.

The checkpoint is a zshard checkpoint, or a DeepSpeed ZeRO or torch.distributed.checkpoint
directory (auto-detected, read through :mod:`zshard.convert.sources`).

Takes each tensor's fp32 ``master`` weights where the checkpoint has them and ``param``
otherwise, casts floating tensors to the requested dtype window by window, and writes either one
``.safetensors`` file or a Hugging Face-style directory of shards with an index. Peak memory is
one window plus a cast copy — not the largest tensor, not the model (docs/design.md, invariant
4). The output appears under its final name only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from zshard.convert.safetensors_io import INDEX_NAME, TIES_METADATA_KEY, SafetensorsWriter
from zshard.convert.sources import detect, open_source
from zshard.convert.tensor_source import SourceTensor, TensorSource
from zshard.errors import InvalidArgumentError, OutputExistsError, ZshardError
from zshard.store import dtypes
from zshard.store.reader import CheckpointReader, cast
from zshard.store.root import parent_url
from zshard.store.storage import LocalStorage, Storage, open_storage
from zshard.units import parse_size

WINDOW_BYTES = 16 << 20
DTYPE_CHOICES = ("fp32", "fp16", "bf16", "keep")


class ZshardSource:
    """A committed zshard checkpoint seen as a :class:`TensorSource`."""

    format = "zshard"

    def __init__(self, reader: CheckpointReader) -> None:
        m = reader.manifest
        self.reader = reader
        self.url = reader.url
        self.tensors = [SourceTensor(t.name, t.kind, t.shape, t.dtype) for t in m.tensors]
        self.ties = dict(m.ties)
        self.step = m.step
        self.state: dict[str, Any] = dict(m.state)

    def read(self, t: SourceTensor, start: int, stop: int) -> np.ndarray:
        return self.reader.read(t.name, t.kind, start, stop)


def open_checkpoint(
    ckpt: str, *, tag: str | None = None, trust_pickle: bool = False
) -> TensorSource:
    """A zshard checkpoint (root or step directory), or a DeepSpeed or DCP directory."""
    fmt = None
    with contextlib.suppress(ZshardError):
        fmt = detect(ckpt)
    if fmt in ("deepspeed", "dcp"):
        return open_source(ckpt, tag=tag, trust_pickle=trust_pickle)
    if tag is not None:
        raise InvalidArgumentError(f"{ckpt}: --tag applies to DeepSpeed checkpoints only")
    return ZshardSource(CheckpointReader.open(ckpt))


@dataclass(frozen=True)
class OutputTensor:
    name: str  # name in the output file
    source: SourceTensor
    dtype: str  # output logical dtype

    @property
    def nbytes(self) -> int:
        return self.source.numel * dtypes.dtype(self.dtype).itemsize


def select(source: TensorSource, dtype: str, include_optimizer: bool) -> list[OutputTensor]:
    """The tensors to write: master over param, buffers, optionally optimizer state."""
    if dtype not in DTYPE_CHOICES:
        raise InvalidArgumentError(
            f"unknown --dtype {dtype!r}; expected one of {', '.join(DTYPE_CHOICES)}"
        )
    target = None if dtype == "keep" else dtypes.dtype(dtype).name
    by_name: dict[str, dict[str, SourceTensor]] = {}
    for t in source.tensors:
        by_name.setdefault(t.name, {})[t.kind] = t
    out: list[OutputTensor] = []
    for name, kinds in by_name.items():
        src = kinds.get("master") or kinds.get("param") or kinds.get("buffer")
        if src is None:
            continue
        out.append(OutputTensor(name, src, _cast_to(src.dtype, target)))
    if include_optimizer:
        for name, kinds in by_name.items():
            for kind, t in sorted(kinds.items()):
                if kind not in ("param", "master", "buffer"):
                    out.append(OutputTensor(f"optimizer.{kind}.{name}", t, t.dtype))
    return out


def _cast_to(stored: str, target: str | None) -> str:
    if target is None or not dtypes.dtype(stored).is_float:
        return stored
    return target


def split_shards(tensors: list[OutputTensor], max_bytes: int) -> list[list[OutputTensor]]:
    """Greedy HF-style sharding in manifest order; a tensor larger than the limit stands alone."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def consolidate(
    ckpt: str,
    out: str,
    *,
    dtype: str = "fp32",
    max_shard_size: str = "5GB",
    include_optimizer: bool = False,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    tag: str | None = None,
    trust_pickle: bool = False,
    source: TensorSource | None = None,
) -> list[str]:
    """Write consolidated weights to ``out``; returns the files written.

    ``source`` is ``ckpt`` already opened by :func:`open_checkpoint` (the CLI opens it once to
    size the progress bar).
    """
    max_bytes = parse_size(max_shard_size)
    reader = source or open_checkpoint(ckpt, tag=tag, trust_pickle=trust_pickle)
    tensors = select(reader, dtype, include_optimizer)
    parent, name = parent_url(out)
    dest_parent = open_storage(parent)
    if dest_parent.exists(name) and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    metadata = safetensors_metadata(reader.ties)
    stream = streamer(reader, progress)
    if out.endswith(".safetensors"):
        total = sum(t.nbytes for t in tensors)
        if total > max_bytes:
            raise InvalidArgumentError(
                f"{out}: {total} bytes exceed --max-shard-size {max_shard_size}; give a directory "
                "instead of a .safetensors file to write shards, or raise --max-shard-size"
            )
        write_safetensors(dest_parent, name, tensors, metadata, stream)
        return [out]
    files = write_shard_dir(
        dest_parent,
        name,
        split_shards(tensors, max_bytes),
        metadata,
        lambda stage, key, shard: write_safetensors(stage, key, shard, metadata, stream),
    )
    return [f"{dest_parent.url.rstrip('/')}/{name}/{f}" for f in files]


def safetensors_metadata(ties: Mapping[str, str]) -> dict[str, str]:
    """The metadata of every file written: the format, and the ties (alias -> stored name)."""
    metadata = {"format": "pt"}
    if ties:
        metadata[TIES_METADATA_KEY] = json.dumps(ties, sort_keys=True)
    return metadata


# Writes one tensor's bytes, whole, into a file being written.
WriteTensor = Callable[[SafetensorsWriter, OutputTensor], None]


def write_safetensors(
    storage: Storage,
    key: str,
    tensors: list[OutputTensor],
    metadata: dict[str, str],
    write_tensor: WriteTensor,
) -> None:
    """One safetensors file of ``tensors``, each written by ``write_tensor``; none on failure."""
    w = SafetensorsWriter(
        storage, key, [(t.name, t.dtype, t.source.shape) for t in tensors], metadata
    )
    try:
        for t in tensors:
            write_tensor(w, t)
        w.close()
    except BaseException:
        w.abort()
        raise


def streamer(reader: TensorSource, progress: Callable[[int], None] | None = None) -> WriteTensor:
    """Writes a tensor read from ``reader`` window by window, cast to its output dtype."""

    def write(w: SafetensorsWriter, t: OutputTensor) -> None:
        src = dtypes.dtype(t.source.dtype)
        window = max(1, WINDOW_BYTES // max(src.itemsize, dtypes.dtype(t.dtype).itemsize))
        for lo in range(0, t.source.numel, window):
            hi = min(lo + window, t.source.numel)
            data = cast(reader.read(t.source, lo, hi), t.source.dtype, t.dtype)
            w.write(data)
            if progress:
                progress(data.nbytes)

    return write


def write_shard_dir(
    parent: Storage,
    name: str,
    shards: list[list[OutputTensor]],
    metadata: dict[str, str],
    write_file: Callable[[Storage, str, list[OutputTensor]], None],
    *,
    single_file: str | None = None,
    first: Mapping[str, bytes] | None = None,
) -> list[str]:
    """The directory ``name`` in ``parent``: the files of ``first``, then one safetensors file
    per shard, written by ``write_file``, then the index (``metadata`` and the weight map).
    ``single_file``: the name of the only file when there is one shard, with no index (a Hugging
    Face model's ``model.safetensors``). Returns the names of the files, in the order written."""
    n = len(shards)
    if n == 1 and single_file is not None:
        files, indexed = [single_file], False
    else:
        files, indexed = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)], True
    remote = not isinstance(parent, LocalStorage)
    # Local disks: build under a temporary name and rename the directory last. Elsewhere (object
    # stores have no directories to rename) every file is published whole and the last one
    # written (the index, or the single file) marks the output complete.
    stage_name = name if remote else f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    stage = parent.child(stage_name)
    try:
        for key, data in (first or {}).items():
            stage.write_atomic(key, data)
        weight_map = {}
        for fname, shard in zip(files, shards):
            write_file(stage, fname, shard)
            weight_map.update({t.name: fname for t in shard})
        if indexed:
            total = sum(t.nbytes for shard in shards for t in shard)
            index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
            stage.write_atomic(INDEX_NAME, json.dumps(index, indent=2).encode())
        if not remote:
            _replace_dir(parent, stage_name, name)
    except BaseException:
        if not remote:
            with contextlib.suppress(ZshardError):
                parent.remove_tree(stage_name)
        raise
    return [*(first or {}), *files, *([INDEX_NAME] if indexed else [])]


def _replace_dir(parent: Storage, tmp: str, final: str) -> None:
    assert isinstance(parent, LocalStorage)
    src, dst = os.path.join(parent.root, tmp), os.path.join(parent.root, final)
    if os.path.exists(dst):
        # --overwrite: move the old output aside first so the final name is never half-done.
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, os.path.join(parent.root, old))
        os.rename(src, dst)
        parent.remove_tree(old)
    else:
        os.rename(src, dst)
