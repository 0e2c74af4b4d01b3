"""Training configuration: the schema (frozen, validated sections), loading YAML with ``--set``
overrides, and the mapping of DeepSpeed configs onto it.

    cfg = load_config("train.yaml", ["zero.stage=3", "precision=bf16"])
    cfg, not_applied = load_with_deepspeed("train.yaml", world_size=8)  # honours `deepspeed:`
"""

from zshard.train.config._deepspeed import from_deepspeed, prefetch_modules
from zshard.train.config._ds_rule import AUTO, Rule
from zshard.train.config._ds_table import RULES
from zshard.train.config._load import load_config, read_yaml
from zshard.train.config._lrsched import DS_SCHEDULES, schedule_params
from zshard.train.config._resolve import (
    apply_deepspeed,
    default_nproc,
    load_deepspeed,
    load_with_deepspeed,
    stats_of,
    warning_line,
)
from zshard.train.config._schema import (
    DEFAULT_MICRO_BATCH_SIZE,
    CheckpointConfig,
    DataConfig,
    DistConfig,
    LossScaleConfig,
    ModelConfig,
    OptimizerConfig,
    Precision,
    PrecisionConfig,
    SchedulerConfig,
    TrainConfig,
    ZshardConfig,
)
from zshard.train.config._sections_zero import (
    OffloadDevice,
    OffloadOptimizerConfig,
    OffloadParamConfig,
    ZeroConfig,
)

__all__ = [
    "AUTO",
    "DEFAULT_MICRO_BATCH_SIZE",
    "DS_SCHEDULES",
    "RULES",
    "CheckpointConfig",
    "DataConfig",
    "DistConfig",
    "LossScaleConfig",
    "ModelConfig",
    "OffloadDevice",
    "OffloadOptimizerConfig",
    "OffloadParamConfig",
    "OptimizerConfig",
    "Precision",
    "PrecisionConfig",
    "Rule",
    "SchedulerConfig",
    "TrainConfig",
    "ZeroConfig",
    "ZshardConfig",
    "apply_deepspeed",
    "default_nproc",
    "from_deepspeed",
    "load_config",
    "load_deepspeed",
    "load_with_deepspeed",
    "prefetch_modules",
    "read_yaml",
    "schedule_params",
    "stats_of",
    "warning_line",
]
