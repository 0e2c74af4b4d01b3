"""16-bit (training dtype) weights as a Hugging Face-loadable safetensors directory.

Two ways, both in bounded memory:

- ``checkpoint.save_16bit`` (DeepSpeed: ``stage3_gather_16bit_weights_on_model_save``): after
  each checkpoint commits, rank 0 streams the just-committed checkpoint into
  ``<step dir>/hf16/`` (window by window, as ``zshard consolidate`` does: the fp32 master cast
  to the training dtype, which is what the module holds). It lives in the step directory, so
  retention removes it with its checkpoint.
- :func:`save_16bit_model` (``Engine.save_16bit_model``, DeepSpeed's ``save_16bit_model``): from
  the live engine, every rank taking part; stage 3 gathers one flat group (one module) at a
  time, so no rank ever holds more than the largest module; rank 0 writes.

Either output appears whole or not at all: on a local disk it is built under a temporary name
and renamed last (after the checkpoint's own commit); on object stores, which cannot rename,
every file is published whole and the last one written (the shard index, or the single weights
file) marks it complete. Files: ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors``
with ``model.safetensors.index.json`` past ``max_shard_size``), and ``config.json`` when the
model carries a Hugging Face config, so ``AutoModelForCausalLM.from_pretrained(dir)`` loads it.
A tied parameter is written once, under its canonical name (transformers re-ties it).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from zshard.convert.consolidate import ZshardSource, select
from zshard.convert.safetensors_io import INDEX_NAME, TIES_METADATA_KEY, SafetensorsWriter
from zshard.errors import OutputExistsError, ZshardError
from zshard.store import dtypes, to_numpy
from zshard.store.reader import CheckpointReader, cast
from zshard.store.root import join_url, parent_url
from zshard.store.storage import LocalStorage, Storage, open_storage
from zshard.units import parse_size

EXPORT_DIR = "hf16"  # in each step directory (checkpoint.save_16bit)
WINDOW_BYTES = 16 << 20
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class _Tensor:
    name: str
    dtype: str  # zshard logical dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * dtypes.dtype(self.dtype).itemsize


def _file_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _shards(tensors: Sequence[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_hf_dir(
    out_url: str,
    tensors: Sequence[_Tensor],
    chunks: Iterator[np.ndarray],
    *,
    metadata: dict[str, str],
    config_json: str | None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> list[str]:
    """Write ``tensors`` (their bytes coming from ``chunks`` in order, in any pieces) as an HF
    directory at ``out_url``; returns the file names. See the module docstring for atomicity."""
    parent_u, name = parent_url(out_url)
    parent = open_storage(parent_u)
    if parent.exists(name) and not overwrite:
        raise OutputExistsError(f"{out_url} already exists; pass overwrite=True to replace it")
    shards = _shards(tensors, parse_size(max_shard_size))
    files = _file_names(len(shards))
    remote = not isinstance(parent, LocalStorage)
    stage_name = name if remote else f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    stage = parent.child(stage_name)
    try:
        if config_json is not None:
            stage.write_atomic(CONFIG_FILE, config_json.encode())
        weight_map: dict[str, str] = {}
        for fname, shard in zip(files, shards):
            _write_file(stage, fname, shard, chunks, metadata)
            weight_map.update({t.name: fname for t in shard})
        if len(files) > 1:
            total = sum(t.nbytes for t in tensors)
            index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
            stage.write_atomic(INDEX_NAME, json.dumps(index, indent=2).encode())
        if not remote:
            _replace_dir(parent, stage_name, name)
    except BaseException:
        if not remote:
            with contextlib.suppress(ZshardError, OSError):
                parent.remove_tree(stage_name)
        raise
    return (
        ([CONFIG_FILE] if config_json is not None else [])
        + files
        + ([INDEX_NAME] if len(files) > 1 else [])
    )


def _write_file(
    storage: Storage,
    key: str,
    shard: list[_Tensor],
    chunks: Iterator[np.ndarray],
    metadata: dict[str, str],
) -> None:
    w = SafetensorsWriter(storage, key, [(t.name, t.dtype, t.shape) for t in shard], metadata)
    try:
        for t in shard:
            left = t.nbytes
            while left > 0:
                data = next(chunks)
                w.write(data)
                left -= data.nbytes
            if left < 0:
                raise ZshardError(f"16-bit export: data of {t.name!r} overran its size")
        w.close()
    except BaseException:
        w.abort()
        raise


def _replace_dir(parent: Storage, tmp: str, final: str) -> None:
    assert isinstance(parent, LocalStorage)
    src, dst = os.path.join(parent.root, tmp), os.path.join(parent.root, final)
    if os.path.exists(dst):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(dst, os.path.join(parent.root, old))
        os.rename(src, dst)
        parent.remove_tree(old)
    else:
        os.rename(src, dst)


def hf_config_json(module: Any) -> str | None:
    """The model's Hugging Face config as JSON, if it has one."""
    config = getattr(module, "config", None)
    to_json = getattr(config, "to_json_string", None)
    return to_json() if callable(to_json) else None


# -- from a committed checkpoint (checkpoint.save_16bit) -----------------------------------------


def export_checkpoint(step_url: str, dtype: str, config_json: str | None = None) -> str:
    """Stream the committed checkpoint at ``step_url`` into ``<step_url>/hf16`` in ``dtype``
    (fp32, bf16 or fp16); returns the directory's URL. Memory: a window of 16 MB."""
    source = ZshardSource(CheckpointReader.open(step_url))
    chosen = select(source, dtype, include_optimizer=False)
    tensors = [_Tensor(t.name, t.dtype, tuple(t.source.shape)) for t in chosen]

    def chunks() -> Iterator[np.ndarray]:
        for t in chosen:
            src = dtypes.dtype(t.source.dtype)
            window = max(1, WINDOW_BYTES // max(src.itemsize, dtypes.dtype(t.dtype).itemsize))
            for lo in range(0, t.source.numel, window):
                hi = min(lo + window, t.source.numel)
                yield cast(source.read(t.source, lo, hi), t.source.dtype, t.dtype)

    out = join_url(step_url, EXPORT_DIR)
    write_hf_dir(
        out,
        tensors,
        chunks(),
        metadata=_metadata(source.ties),
        config_json=config_json,
        overwrite=True,  # a leftover of an interrupted export of this same step
    )
    return out


def _metadata(ties: dict[str, str]) -> dict[str, str]:
    metadata = {"format": "pt"}
    if ties:
        metadata[TIES_METADATA_KEY] = json.dumps(ties, sort_keys=True)
    return metadata


# -- from the live engine (save_16bit_model) -----------------------------------------------------


def save_16bit_model(
    engine: Any,
    save_dir: str,
    *,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    agree: Callable[[bool], bool] | None = None,
) -> str | None:
    """Write the engine's weights in the module dtype to ``save_dir`` (every rank calls it;
    rank 0 writes). ``agree(failed)`` tells every rank whether any failed (an all-reduce).
    Returns ``save_dir`` on rank 0, None elsewhere."""
    groups = list(engine.groups)
    members = [(g, m) for g in groups for m in g.members]
    tensors = [_Tensor(m.name, dtypes.from_torch(g.dtype).name, tuple(m.shape)) for g, m in members]
    buffers = [
        (n, b)
        for n, b in _persistent_buffers(engine.module)
        if n not in {m.name for _, m in members}
    ]
    tensors += [_Tensor(n, dtypes.from_torch(b.dtype).name, tuple(b.shape)) for n, b in buffers]
    s3 = engine._stage3
    rank0 = engine.rank == 0
    error: BaseException | None = None

    def chunks() -> Iterator[Any]:
        """Each tensor's bytes on rank 0 (None elsewhere), gathering one group at a time."""
        for g in groups:
            if s3 is not None:
                s3.gather(g)
            try:
                assert g.flat is not None
                for m in g.members:
                    part = g.flat[m.offset : m.offset + m.numel]
                    # A copy: a numpy view would pin the gathered buffer's storage.
                    yield to_numpy(part.detach().to("cpu", copy=True)) if rank0 else None
            finally:
                if s3 is not None:
                    s3.maybe_release(g)
        for _, b in buffers:
            yield to_numpy(b.detach().reshape(-1).to("cpu")) if rank0 else None

    stream = chunks()
    try:
        if rank0:
            write_hf_dir(
                save_dir,
                tensors,
                stream,
                metadata=_metadata(dict(engine.ties)),
                config_json=hf_config_json(engine.module),
                max_shard_size=max_shard_size,
                overwrite=overwrite,
            )
    except BaseException as e:
        error = e
    finally:
        # Every rank runs the same gathers, in the same order, whatever rank 0's writer did.
        for _ in stream:
            pass
    failed = agree(error is not None) if agree is not None else error is not None
    if error is not None:
        raise error
    if failed:
        raise ZshardError(f"save_16bit_model({save_dir}): rank 0 failed to write; see its error")
    return save_dir if rank0 else None


def _persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for path, m in module.named_modules():
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                out.append((f"{path}.{name}" if path else name, b))
    return out
