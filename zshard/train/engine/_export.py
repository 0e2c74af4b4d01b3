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

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from zshard.convert.consolidate import (
    OutputTensor,
    WriteTensor,
    ZshardSource,
    safetensors_metadata,
    select,
    split_shards,
    streamer,
    write_safetensors,
    write_shard_dir,
)
from zshard.convert.safetensors_io import SafetensorsWriter
from zshard.convert.tensor_source import SourceTensor
from zshard.errors import OutputExistsError, ZshardError
from zshard.store import dtypes, to_numpy
from zshard.store.reader import CheckpointReader
from zshard.store.root import join_url, parent_url
from zshard.store.storage import open_storage
from zshard.units import parse_size

EXPORT_DIR = "hf16"  # in each step directory (checkpoint.save_16bit)
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def write_hf_dir(
    out_url: str,
    tensors: list[OutputTensor],
    write_tensor: WriteTensor,
    *,
    metadata: dict[str, str],
    config_json: str | None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> list[str]:
    """Write ``tensors`` (each by ``write_tensor``) as an HF directory at ``out_url``; returns
    the file names. See the module docstring for atomicity."""
    parent_u, name = parent_url(out_url)
    parent = open_storage(parent_u)
    if parent.exists(name) and not overwrite:
        raise OutputExistsError(f"{out_url} already exists; pass overwrite=True to replace it")
    return write_shard_dir(
        parent,
        name,
        split_shards(tensors, parse_size(max_shard_size)),
        metadata,
        lambda stage, key, shard: write_safetensors(stage, key, shard, metadata, write_tensor),
        single_file=SINGLE_FILE,
        first={CONFIG_FILE: config_json.encode()} if config_json is not None else None,
    )


def hf_config_json(module: Any) -> str | None:
    """The model's Hugging Face config as JSON, if it has one."""
    config = getattr(module, "config", None)
    to_json = getattr(config, "to_json_string", None)
    return to_json() if callable(to_json) else None


# -- from a committed checkpoint (checkpoint.save_16bit) -----------------------------------------


def export_checkpoint(step_url: str, dtype: str, config_json: str | None = None) -> str:
    """Stream the committed checkpoint at ``step_url`` into ``<step_url>/hf16`` in ``dtype``
    (fp32, bf16 or fp16); returns the directory's URL. Memory: one window of ``zshard
    consolidate`` (16 MB)."""
    source = ZshardSource(CheckpointReader.open(step_url))
    out = join_url(step_url, EXPORT_DIR)
    write_hf_dir(
        out,
        select(source, dtype, include_optimizer=False),
        streamer(source),
        metadata=safetensors_metadata(source.ties),
        config_json=config_json,
        overwrite=True,  # a leftover of an interrupted export of this same step
    )
    return out


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
    tensors = [_output(m.name, "param", g.dtype, m.shape) for g, m in members]
    buffers = [
        (n, b)
        for n, b in _persistent_buffers(engine.module)
        if n not in {m.name for _, m in members}
    ]
    tensors += [_output(n, "buffer", b.dtype, b.shape) for n, b in buffers]
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
                _taker(stream),
                metadata=safetensors_metadata(dict(engine.ties)),
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


def _output(name: str, kind: str, dtype: torch.dtype, shape: Any) -> OutputTensor:
    """A live tensor to write as it is, in the terms of a source's (consolidate's)."""
    dt = dtypes.from_torch(dtype).name
    return OutputTensor(name, SourceTensor(name, kind, tuple(shape), dt), dt)


def _taker(chunks: Iterator[np.ndarray]) -> WriteTensor:
    """Writes each tensor from the next pieces of ``chunks`` (in any sizes, in tensor order)."""

    def write(w: SafetensorsWriter, t: OutputTensor) -> None:
        left = t.nbytes
        while left > 0:
            data = next(chunks)
            w.write(data)
            left -= data.nbytes
        if left < 0:
            raise ZshardError(f"16-bit export: data of {t.name!r} overran its size")

    return write
