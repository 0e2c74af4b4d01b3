"""The ZeRO machinery below the engine: collectives (``Comm``), flat groups and their
partitions, building them from a model, gradient reduction (stages 0-2) and stage-3 parameter
gathering. Nothing above this package calls torch.distributed directly."""

from zshard.train.zero._build import (
    buffer_groups,
    build_model,
    build_partitioned,
    build_replicated,
    canonical_parameters,
    prepare_buffers,
    seeded,
    target_dtype,
)
from zshard.train.zero._comm import Comm, Work, resolve_device
from zshard.train.zero._flat import FlatBufferGroup, FlatParamGroup, Member, numel_bytes
from zshard.train.zero._reduce import BucketReducer, GradSink, WindowReducer
from zshard.train.zero._stage3 import ParamSource, Stage3

__all__ = [
    "BucketReducer",
    "Comm",
    "FlatBufferGroup",
    "FlatParamGroup",
    "GradSink",
    "Member",
    "ParamSource",
    "Stage3",
    "WindowReducer",
    "Work",
    "buffer_groups",
    "build_model",
    "build_partitioned",
    "build_replicated",
    "canonical_parameters",
    "numel_bytes",
    "prepare_buffers",
    "resolve_device",
    "seeded",
    "target_dtype",
]
