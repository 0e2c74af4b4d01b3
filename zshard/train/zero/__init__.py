"""The ZeRO machinery below the engine: collectives (``Comm``), flat groups and their
partitions, building them from a model, gradient reduction (stages 0-2), the parameter all-gather
after the step (stages 1-2), stage-3 parameter gathering and the staging slots they reuse. Nothing
above this package calls torch.distributed directly."""

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
from zshard.train.zero._comm import (
    KINDS,
    MODE_ENV,
    Comm,
    Handle,
    Work,
    collective_mode,
    resolve_device,
)
from zshard.train.zero._flat import FlatBufferGroup, FlatParamGroup, Member, numel_bytes
from zshard.train.zero._gather import ParamGather
from zshard.train.zero._quant import DEFAULT_BLOCK, Codec, record_nbytes
from zshard.train.zero._reduce import DoubleGradientError, GradReducer, GradSink
from zshard.train.zero._slots import (
    GATHER_SLOTS,
    STAGE2_SLOTS,
    STAGE3_SLOTS,
    UPDATE_WINDOW,
    SlotPool,
)
from zshard.train.zero._stage3 import ParamSource, Stage3
from zshard.train.zero._zeropp import (
    HierarchicalReduceScatter,
    Hierarchy,
    ZeroPP,
    ZeroPPOptions,
    check_zeropp,
    node_size,
    zeropp_buffer_bytes,
)

__all__ = [
    "DEFAULT_BLOCK",
    "GATHER_SLOTS",
    "KINDS",
    "MODE_ENV",
    "STAGE2_SLOTS",
    "STAGE3_SLOTS",
    "UPDATE_WINDOW",
    "Codec",
    "Comm",
    "DoubleGradientError",
    "FlatBufferGroup",
    "FlatParamGroup",
    "GradReducer",
    "GradSink",
    "Handle",
    "HierarchicalReduceScatter",
    "Hierarchy",
    "Member",
    "ParamGather",
    "ParamSource",
    "SlotPool",
    "Stage3",
    "Work",
    "ZeroPP",
    "ZeroPPOptions",
    "buffer_groups",
    "build_model",
    "build_partitioned",
    "build_replicated",
    "canonical_parameters",
    "check_zeropp",
    "collective_mode",
    "node_size",
    "numel_bytes",
    "prepare_buffers",
    "record_nbytes",
    "resolve_device",
    "seeded",
    "target_dtype",
    "zeropp_buffer_bytes",
]
