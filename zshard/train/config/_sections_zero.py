"""The ``zero:`` section of the training configuration: the ZeRO stage, its buffers, ZeRO++, and
the two offload sections (``zero.offload_optimizer``, ``zero.offload_param``), which also accept
DeepSpeed's spellings of their keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from zshard.errors import ConfigError
from zshard.train.config._section import _Section

log = logging.getLogger("zshard.train")

OffloadDevice = Literal["none", "cpu", "nvme"]


@dataclass(frozen=True, kw_only=True)
class _OffloadSection(_Section):
    """Shared parts of the two offload sections: DeepSpeed's spellings and the path rule.

    ``device``: ``cpu`` keeps the state in host memory (pinned with ``pin_memory`` when CUDA is
    present); ``nvme`` keeps it in store-format files under ``path``, any fsspec URL (a local
    NVMe directory, ``memory://``, ``s3://``); ``none`` turns the section off (the field becomes
    None). DeepSpeed's key names are accepted where they mean the same (``nvme_path``, ...);
    DeepSpeed tuning knobs zshard has no use for are accepted with a warning; anything else is a
    ConfigError naming the key.
    """

    # DeepSpeed key -> zshard field.
    _renamed: ClassVar[dict[str, str]] = {"nvme_path": "path"}
    # DeepSpeed keys accepted with no effect -> why (logged once as a warning).
    _noops: ClassVar[dict[str, str]] = {}

    device: OffloadDevice = "cpu"
    path: str | None = None
    buffer_count: int = 4
    pin_memory: bool = False

    @classmethod
    def _translate(cls, data: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key in cls._renamed:
                target = cls._renamed[key]
                if target in data:
                    raise ConfigError(
                        f"{prefix}.{key}: give {target} or {key} (DeepSpeed's name), not both"
                    )
                out[target] = value
            elif key in cls._noops:
                log.warning(
                    "%s.%s=%r has no effect in zshard: %s", prefix, key, value, cls._noops[key]
                )
            elif key == "ratio":
                # DeepSpeed's partial offload (stage 3, CPU Adam on a fraction of the state).
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value != 1:
                    raise ConfigError(
                        f"{prefix}.ratio: partial offload is not supported, got {value!r}; use "
                        "1.0 or remove the key"
                    )
            else:
                out[key] = value
        return out

    def _check(self) -> None:
        self._positive("buffer_count")
        if self.device == "nvme" and not self.path:
            raise ConfigError(
                f"{self._key('path')}: device 'nvme' needs a path (a local directory or an fsspec "
                "URL such as s3://bucket/swap)"
            )
        if self.device != "nvme" and self.path:
            log.warning(
                "%s=%r is only used with device 'nvme' (device is %r)",
                self._key("path"),
                self.path,
                self.device,
            )


@dataclass(frozen=True, kw_only=True)
class OffloadOptimizerConfig(_OffloadSection):
    """Stages 1-3: the fp32 master weights and the optimizer state off the rank.

    The step streams them in sub-groups of ``sub_group_size`` elements of each flat group's
    partition: read (the next one prefetched), update, write back. At most ``buffer_count``
    sub-groups are in memory at once (one updating, the others being read or written).
    """

    _section: ClassVar[str] = "zero.offload_optimizer"
    _shorthand: ClassVar[str | None] = "device"
    _noops: ClassVar[dict[str, str]] = {
        "pipeline_read": "zshard always reads the next sub-group ahead",
        "pipeline_write": "zshard always writes sub-groups back in the background",
        "pipeline": "zshard always overlaps reads and writes with the update",
        "fast_init": "zshard always initialises offloaded state by streaming",
    }
    sub_group_size: int = 1 << 22

    def _check(self) -> None:
        super()._check()
        self._positive("sub_group_size")


@dataclass(frozen=True, kw_only=True)
class OffloadParamConfig(_OffloadSection):
    """Stage 3: each rank's parameter partitions off the rank, fetched before a module's forward
    and backward (``buffer_count`` modules ahead, in the order recorded in the first step) and
    released after. Up to ``max_in_memory`` elements of fetched partitions stay cached."""

    _section: ClassVar[str] = "zero.offload_param"
    _shorthand: ClassVar[str | None] = "device"
    _renamed: ClassVar[dict[str, str]] = {"nvme_path": "path", "max_in_cpu": "max_in_memory"}
    _noops: ClassVar[dict[str, str]] = {
        "buffer_size": "zshard sizes fetch buffers to each module's partition",
    }
    buffer_count: int = 5
    max_in_memory: int = 0

    def _check(self) -> None:
        super()._check()
        self._positive("max_in_memory", allow_zero=True)


@dataclass(frozen=True, kw_only=True)
class ZeroConfig(_Section):
    """ZeRO stage and its buffers (sizes count elements); offload of optimizer state (stages
    1-3) and of parameters (stage 3).

    ``overlap_comm`` (default true) starts communication asynchronously and waits only where the
    result is needed: each gradient bucket of ``reduce_bucket_size`` elements is reduced as soon
    as backward has produced it, while backward goes on (stages 0-1 in the window's last
    backward, stage 2 every backward, stage 3 one reduce-scatter per module, at most 2 in
    flight); the engine waits for them at the optimizer step. At stages 1-2 the updated
    partitions are all-gathered per bucket of ``allgather_bucket_size`` elements during the next
    forward, each waited for just before the first module using it; stage 3 prefetches
    ``prefetch`` modules ahead either way. ``false``: every collective blocks where it is issued
    (stages 0-1 reduce after backward, stage 2 and 3 inside the gradient hook, stages 1-2 gather
    at the end of the step).

    ZeRO++ (stage 3 only; zero/_zeropp.py): ``quantized_weights`` (qwZ) all-gathers parameters
    as int8 with one scale per block of ``quantization_block_size`` elements;
    ``hpz_partition_size`` (hpZ; 1 = off) keeps a secondary copy of each gathered module over
    that many ranks of a node, so the backward all-gather stays inside the node;
    ``quantized_gradients`` (qgZ) reduces gradients by a hierarchical all-to-all of int8 (or,
    with ``quantized_gradients_bits: 4``, int4) blocks. A node is ``hpz_partition_size`` ranks
    when set, else the ranks the launcher starts together (``LOCAL_WORLD_SIZE``)."""

    _section: ClassVar[str] = "zero"
    stage: Literal[0, 1, 2, 3] = 0
    reduce_bucket_size: int = 2_000_000
    allgather_bucket_size: int = 2_000_000
    overlap_comm: bool = True
    prefetch: int = 2  # stage 3: modules gathered ahead of use
    param_persistence_threshold: int = 100_000  # stage 3: smaller modules stay whole
    offload_optimizer: OffloadOptimizerConfig | None = None
    offload_param: OffloadParamConfig | None = None
    quantized_weights: bool = False  # ZeRO++ qwZ
    quantized_gradients: bool = False  # ZeRO++ qgZ
    quantized_gradients_bits: Literal[8, 4] = 8
    hpz_partition_size: int = 1  # ZeRO++ hpZ: ranks of a secondary partition (1 = off)
    quantization_block_size: int = 2048  # elements per quantization scale (qwZ, qgZ)

    def _check(self) -> None:
        self._positive("reduce_bucket_size", "allgather_bucket_size")
        self._positive("hpz_partition_size", "quantization_block_size")
        zeropp = [
            key
            for key, on in (
                ("quantized_weights", self.quantized_weights),
                ("quantized_gradients", self.quantized_gradients),
                ("hpz_partition_size", self.hpz_partition_size > 1),
            )
            if on
        ]
        if zeropp and self.stage != 3:
            raise ConfigError(
                f"zero.{zeropp[0]}: ZeRO++ needs zero.stage 3 (it changes stage 3's parameter "
                f"gathers and gradient reduce-scatters), got stage {self.stage}"
            )
        self._positive("prefetch", "param_persistence_threshold", allow_zero=True)
        # `device: none` means off: one representation of "off" (None) for everyone downstream.
        for name in ("offload_optimizer", "offload_param"):
            block = getattr(self, name)
            if block is not None and block.device == "none":
                object.__setattr__(self, name, None)
        if self.offload_optimizer is not None and self.stage == 0:
            raise ConfigError(
                "zero.offload_optimizer: needs zero.stage 1, 2 or 3 (stage 0 keeps the whole "
                "optimizer state on every rank)"
            )
        if self.offload_param is not None and self.stage != 3:
            raise ConfigError(
                f"zero.offload_param: needs zero.stage 3 (only stage 3 partitions parameters), "
                f"got stage {self.stage}"
            )
