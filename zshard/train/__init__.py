"""The ZeRO training core: ``initialize(model, config)`` returns an :class:`Engine`.

Stages 0-3 of data-parallel training on flat groups whose partitions are exactly the shards the
checkpoint store writes. Subpackages by role (docs/design.md): ``config``, ``models``, ``data``,
``zero`` (collectives, flat groups, reduction, stage-3 gathering), ``optim``, ``offload``,
``engine``, ``run`` (``zshard train``) and ``report`` (``zshard estimate``, ``zshard plot``).
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
