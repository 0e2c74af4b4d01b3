"""Which reader opens a path: format detection over every format zshard reads.

``zshard import`` and ``zshard consolidate`` accept a safetensors file or Hugging Face directory
(:mod:`~zshard.convert.safetensors_io`), a DeepSpeed ZeRO checkpoint
(:mod:`~zshard.convert.deepspeed`) or a torch.distributed.checkpoint directory
(:mod:`~zshard.convert.dcp`); each becomes a :class:`~zshard.convert.tensor_source.TensorSource`.
This is the one module that knows them all; the formats know only the source types below them.
"""

from __future__ import annotations

from zshard.convert.dcp import DCPSource, is_dcp
from zshard.convert.deepspeed import DeepSpeedSource
from zshard.convert.deepspeed_files import is_deepspeed
from zshard.convert.pickles import UnsafePickleError
from zshard.convert.safetensors_io import INDEX_NAME, SafetensorsSource
from zshard.convert.tensor_source import TensorSource
from zshard.errors import InvalidArgumentError, NotACheckpointError
from zshard.store.manifest import MANIFEST_KEY
from zshard.store.root import committed_steps
from zshard.store.storage import open_storage

# UnsafePickleError and TensorSource are re-exported: callers of open_source catch and type them.
__all__ = ["TensorSource", "UnsafePickleError", "detect", "open_source"]


def detect(src: str) -> str:
    """The format of ``src``: ``zshard``, ``safetensors``, ``deepspeed`` or ``dcp``."""
    storage = open_storage(src)
    if not storage.isdir(""):
        if not storage.exists(""):
            raise InvalidArgumentError(f"{src}: no such file or directory")
        return "safetensors"
    if storage.exists(MANIFEST_KEY) or committed_steps(storage):
        return "zshard"
    if is_deepspeed(storage):
        return "deepspeed"
    if is_dcp(storage):
        return "dcp"
    if storage.exists(INDEX_NAME) or storage.exists("model.safetensors"):
        return "safetensors"
    raise NotACheckpointError(
        f"{src}: not a checkpoint zshard can read: expected a .safetensors file, a Hugging Face "
        f"directory with {INDEX_NAME} or model.safetensors, a DeepSpeed save or tag directory "
        "with *_model_states.pt, a torch.distributed.checkpoint directory with .metadata, or a "
        "zshard checkpoint"
    )


def open_source(src: str, *, tag: str | None = None, trust_pickle: bool = False) -> TensorSource:
    """Open a safetensors, DeepSpeed or DCP checkpoint as a :class:`TensorSource`."""
    fmt = detect(src)
    if tag is not None and fmt != "deepspeed":
        raise InvalidArgumentError(f"{src}: --tag applies to DeepSpeed checkpoints only")
    if fmt == "deepspeed":
        return DeepSpeedSource(src, tag=tag, trust_pickle=trust_pickle)
    if fmt == "dcp":
        return DCPSource(src, trust_pickle=trust_pickle)
    if fmt == "safetensors":
        return SafetensorsSource(src)
    raise InvalidArgumentError(f"{src}: already a zshard checkpoint; use reshard or consolidate")
