"""The ZeRO training core: ``initialize(model, config)`` returns an :class:`Engine`.

Stages 0-3 of data-parallel training on flat groups whose partitions are exactly the shards the
checkpoint store writes (see DESIGN.md). Private modules: ``_comm`` (collectives), ``_flat``
(flat groups), ``_build`` (building them), ``_reduce`` (stage 0-2 gradients), ``_stage3``
(parameter gathering).
"""

from __future__ import annotations

from zshard.train.config import (
    CheckpointConfig,
    DataConfig,
    DistConfig,
    LossScaleConfig,
    ModelConfig,
    OptimizerConfig,
    PrecisionConfig,
    SchedulerConfig,
    TrainConfig,
    ZeroConfig,
    ZshardConfig,
    load_config,
)
from zshard.train.engine import Engine, initialize

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "DistConfig",
    "Engine",
    "LossScaleConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PrecisionConfig",
    "SchedulerConfig",
    "TrainConfig",
    "ZeroConfig",
    "ZshardConfig",
    "initialize",
    "load_config",
]
