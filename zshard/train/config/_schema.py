"""Training configuration: one tree of frozen, keyword-only dataclasses, validated at construction.

Load it from a YAML file, a dict or an existing config, with dotted ``--set`` overrides::

    cfg = load_config("train.yaml", ["zero.stage=3", "precision=bf16", "optimizer.lr=1e-3"])

Every section checks its field types (modes are ``Literal``) and ranges in ``__post_init__``, so
a bad file fails at start-up with the dotted key, the allowed values and the value given, e.g.
``zero.stage: expected one of 0, 1, 2, 3, got 5``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from zshard.errors import ConfigError
from zshard.train.config._section import _Section, _to_plain

log = logging.getLogger("zshard.train")

Precision = Literal["fp32", "bf16", "fp16"]
DEFAULT_MICRO_BATCH_SIZE = 8  # used only when no two of the three batch sizes are given


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section):
    """Which model to build: ``gpt`` or ``package.module:function``, called with ``args``."""

    _section: ClassVar[str] = "model"
    name: str = "gpt"
    args: dict[str, Any] = field(default_factory=dict)

    def _check(self) -> None:
        module, sep, func = self.name.partition(":")
        if not self.name or (sep and (not module or not func)):
            raise ConfigError(
                f"model.name: expected 'gpt' or 'package.module:function', got {self.name!r}"
            )


@dataclass(frozen=True, kw_only=True)
class DataConfig(_Section):
    """Training data, cut into windows of ``seq_len`` tokens addressed by global sample index.

    ``name``:

    - ``builtin``: the shipped corpus, byte level (vocabulary 256); or the path of a text file;
    - ``tokens``: flat little-endian token ids at ``path`` (a file, fsspec URL or glob, or a list
      of them, read as one stream; local files memory-mapped, others read by byte range), of
      ``dtype`` uint16/uint32 (``auto``: the files' ``.json`` sidecar's, else uint16);
    - ``hf_dataset``: local text at ``path`` (a dataset directory, or json/jsonl/txt/csv/parquet
      files), ``split`` and ``text_field``, tokenized once with the local ``tokenizer`` into token
      files in ``cache`` (default: ``.zshard-tokens/`` next to the data), then read as ``tokens``.

    ``val_path`` (or, for ``hf_dataset``, ``val_split``) is the validation data for
    ``train.eval_every``. The model's vocabulary defaults to the ``tokenizer``'s (or the token
    files' sidecar's) unless ``model.args`` sets it.
    """

    _section: ClassVar[str] = "data"
    # The data names that read files, and the keys each uses.
    _keys: ClassVar[dict[str, tuple[str, ...]]] = {
        "tokens": ("path", "val_path", "dtype", "tokenizer"),
        "hf_dataset": ("path", "val_path", "dtype", "tokenizer", "val_split", "cache"),
    }
    name: str = "builtin"
    seq_len: int = 128
    path: str | tuple[str, ...] | None = None
    val_path: str | tuple[str, ...] | None = None
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    split: str = "train"
    val_split: str | None = None
    text_field: str = "text"
    tokenizer: str | None = None
    cache: str | None = None

    def __post_init__(self) -> None:
        # Lists of paths are checked here: the section machinery types fixed-length tuples only.
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("path", "val_path"):
            value = getattr(self, key)
            if isinstance(value, (list, tuple)):
                if not value or not all(isinstance(v, str) and v for v in value):
                    raise ConfigError(
                        f"data.{key}: expected a path, URL or glob, or a list of them, got "
                        f"{value!r}"
                    )
                lists[key] = tuple(value)
                object.__setattr__(self, key, None)
        super().__post_init__()
        for key, paths in lists.items():
            object.__setattr__(self, key, paths)
        self._check_sources()

    def _check(self) -> None:
        self._positive("seq_len")
        if not self.name:
            raise ConfigError(
                "data.name: expected 'builtin', 'tokens', 'hf_dataset' or a text file path, got ''"
            )
        for key in ("split", "text_field"):
            if not getattr(self, key):
                raise ConfigError(f"data.{key}: expected a name, got ''")

    def _check_sources(self) -> None:
        kind = self.name if self.name in self._keys else "builtin or a text file"
        if kind in self._keys and not self.path:
            raise ConfigError(
                f"data.path: data name {kind!r} needs a path: a file, URL or glob, or a list"
            )
        if kind == "hf_dataset" and not self.tokenizer:
            raise ConfigError(
                "data.tokenizer: data name 'hf_dataset' needs a local tokenizer directory"
            )
        allowed = self._keys.get(kind, ())
        for key in ("path", "val_path", "dtype", "tokenizer", "val_split", "cache"):
            if getattr(self, key) not in (None, "", "auto") and key not in allowed:
                raise ConfigError(
                    f"data.{key}: not used with data name {self.name!r}; it is for "
                    + " or ".join(repr(k) for k, keys in self._keys.items() if key in keys)
                )

    def vocab_size(self) -> int | None:
        """The vocabulary the data was made with (its tokenizer's, or the token files'
        sidecar's), None when byte level or unknown."""
        from zshard.train.data import data_vocab_size

        return data_vocab_size(self.name, path=self.path, tokenizer=self.tokenizer)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_Section):
    """Loop length and batch arithmetic (DeepSpeed's rule):
    ``global_batch_size = micro_batch_size * grad_accum * world_size``; give any two, or one
    (``grad_accum`` then defaults to 1); :meth:`resolve_batch` fills in the rest."""

    _section: ClassVar[str] = "train"
    steps: int = 100
    micro_batch_size: int | None = None
    grad_accum: int | None = None
    global_batch_size: int | None = None
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = never
    # true, or {blocks: [class names], number_checkpoints: N, cpu_checkpointing: bool}
    # (zshard.train.models.ActivationCheckpointing).
    activation_checkpointing: bool | dict[str, Any] = False

    def _check(self) -> None:
        self._positive("steps", "micro_batch_size", "grad_accum", "global_batch_size")
        from zshard.train.models import ActivationCheckpointing

        ActivationCheckpointing.parse(self.activation_checkpointing)  # raises on a bad value
        self._positive("log_every", "eval_every", allow_zero=True)
        m, a, g = self.micro_batch_size, self.grad_accum, self.global_batch_size
        # The world size is only known at run time; what can be checked now, is.
        if m is not None and a is not None and g is not None and g % (m * a):
            raise ConfigError(
                f"train.global_batch_size={g} is not a multiple of train.micro_batch_size={m} "
                f"x train.grad_accum={a} (it must equal micro_batch_size x grad_accum x world size)"
            )

    def resolved_global_batch(self, world_size: int) -> int:
        return self.resolve_batch(world_size)[2]

    def resolve_batch(self, world_size: int) -> tuple[int, int, int]:
        """``(micro_batch_size, grad_accum, global_batch_size)`` for ``world_size`` ranks."""
        m, a, g = self.micro_batch_size, self.grad_accum, self.global_batch_size
        n = world_size
        if g is not None and (m is None or a is None):
            if m is None and a is None:
                a = 1
            per = a if m is None else m  # the one of the two that is known
            assert per is not None
            if g % (per * n):
                known = "grad_accum" if m is None else "micro_batch_size"
                raise ConfigError(
                    f"train.global_batch_size={g} is not divisible by train.{known}={per} x "
                    f"world size {n}; change one of them"
                )
            if m is None:
                m = g // (per * n)
            else:
                a = g // (per * n)
        if m is None:
            m = DEFAULT_MICRO_BATCH_SIZE
        if a is None:
            a = 1
        if g is None:
            g = m * a * n
        if g != m * a * n:
            raise ConfigError(
                f"train.global_batch_size={g} != train.micro_batch_size={m} x "
                f"train.grad_accum={a} x world size {n} = {m * a * n}; give two of the three"
            )
        return m, a, g


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig(_Section):
    """An optimizer run on flat fp32 partitions; results match ``torch.optim`` elementwise.

    ``adamw`` decouples weight decay; ``adam`` adds ``weight_decay * param`` to the gradient
    (L2); ``sgd`` uses ``momentum`` (0 = plain SGD) and optionally Nesterov; ``lamb`` is
    DeepSpeed's (apex's) LAMB: an Adam step scaled per tensor by the trust ratio
    ``||w|| / ||update||`` clamped to [``min_coeff``, ``max_coeff``] (``bias_correction`` and
    ``eps_inside_sqrt`` as DeepSpeed's ``FusedLamb``).
    """

    _section: ClassVar[str] = "optimizer"
    name: Literal["adamw", "adam", "sgd", "lamb"] = "adamw"
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    max_coeff: float = 10.0  # lamb
    min_coeff: float = 0.01  # lamb
    bias_correction: bool = True  # lamb
    eps_inside_sqrt: bool = False  # lamb

    def _check(self) -> None:
        self._positive("lr", "eps")
        self._positive("max_coeff", "min_coeff", allow_zero=True)
        if self.min_coeff > self.max_coeff:
            raise ConfigError(
                f"optimizer.min_coeff: {self.min_coeff} exceeds optimizer.max_coeff "
                f"{self.max_coeff}"
            )
        self._positive("weight_decay", "momentum", allow_zero=True)
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"optimizer.betas[{i}]: expected a number in [0, 1), got {beta}")
        if self.nesterov and self.momentum <= 0:
            raise ConfigError("optimizer.nesterov: Nesterov needs optimizer.momentum > 0")


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig(_Section):
    """Learning rate: linear warmup over ``warmup_steps``, then constant, cosine or linear
    decay to ``min_lr_ratio * lr`` at ``total_steps`` (default ``train.steps``).

    DeepSpeed's schedules run with DeepSpeed's formulas, parameter names and defaults in
    ``params``: ``warmup_lr``, ``warmup_decay_lr``, ``warmup_cosine_lr``, ``one_cycle`` (which
    also cycles Adam's and LAMB's beta1, as DeepSpeed does) and ``lr_range_test``.
    """

    _section: ClassVar[str] = "scheduler"
    name: Literal[
        "constant",
        "cosine",
        "linear",
        "warmup_lr",
        "warmup_decay_lr",
        "warmup_cosine_lr",
        "one_cycle",
        "lr_range_test",
    ] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    total_steps: int | None = None
    params: dict[str, Any] = field(default_factory=dict)  # the DeepSpeed schedules' parameters

    def _check(self) -> None:
        from zshard.train.config._lrsched import DS_SCHEDULES, schedule_params

        if self.name in DS_SCHEDULES:
            schedule_params(self.name, self.params)
        elif self.params:
            raise ConfigError(
                f"scheduler.params: only DeepSpeed's schedules ({', '.join(DS_SCHEDULES)}) take "
                f"params; {self.name!r} uses warmup_steps, min_lr_ratio and total_steps"
            )
        self._positive("warmup_steps", allow_zero=True)
        self._positive("total_steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(
                f"scheduler.min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio}"
            )


@dataclass(frozen=True, kw_only=True)
class LossScaleConfig(_Section):
    """Dynamic loss scaling for fp16, DeepSpeed's ``DynamicLossScaler`` step for step: the scale
    starts at ``2**initial_scale_power``; an overflow skips the step and uses up one of
    ``hysteresis`` allowances, and once they are used up halves the scale (never below
    ``min_scale``; an overflow at ``min_scale`` is an error when ``raise_error_at_min_scale``);
    the scale doubles after each ``window`` overflow-free steps (counted from the last
    overflow), which also refills the allowances, or every good step refills them when
    ``consecutive_hysteresis``. ``static_scale`` > 0 instead keeps that fixed scale
    (DeepSpeed's ``loss_scale``); overflowing steps are still skipped."""

    _section: ClassVar[str] = "precision.loss_scale"
    initial_scale_power: int = 16
    window: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    consecutive_hysteresis: bool = False
    raise_error_at_min_scale: bool = True
    static_scale: float = 0.0

    def _check(self) -> None:
        self._positive("initial_scale_power", allow_zero=True)
        self._positive("window", "hysteresis", "min_scale")
        self._positive("static_scale", allow_zero=True)


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig(_Section):
    """Module dtype. ``bf16``/``fp16`` keep fp32 master weights and optimizer state.

    ``grad_accum_dtype``: ``param`` keeps gradients in the module dtype (the ZeRO paper's 2 bytes
    per element, what the memory formula assumes); ``fp32`` accumulates them in fp32 (more
    accurate over many micro steps, 2 more bytes per gradient element).
    """

    _section: ClassVar[str] = "precision"
    _shorthand: ClassVar[str | None] = "dtype"
    dtype: Precision = "fp32"
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    grad_accum_dtype: Literal["param", "fp32"] = "param"


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


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig(_Section):
    """Where and how often to save. ``dir`` is a URL (local path, ``file://``, ``s3://``...).

    ``async`` (YAML key; the field is ``async_save``) writes in a background thread from a host
    copy; ``resume`` is ``auto`` (latest under ``dir`` if any), ``never``, or a checkpoint URL.

    Stopping (``zshard train``): on SIGINT, SIGTERM, SIGHUP or ``preempt_signal`` (default
    SIGUSR1, which SLURM's ``--signal`` can send ahead of the deadline; ``none`` for no extra
    signal) every rank finishes its step, then ``on_signal: save`` commits a checkpoint of it and
    ``exit`` leaves without one. A periodic save that fails (disk full, store unreachable) stops
    the run (``on_error: stop``) or is reported and retried at the next interval (``continue``).
    """

    _section: ClassVar[str] = "checkpoint"
    _aliases: ClassVar[dict[str, str]] = {"async": "async_save"}
    dir: str | None = None
    every: int = 0  # steps; 0 = only when asked
    keep_last: int = 0  # 0 = keep all
    async_save: bool = False
    resume: str = "auto"
    # After each commit: an HF-loadable safetensors directory of the weights in the training
    # dtype, in the step directory (engine._export).
    save_16bit: bool = False
    on_signal: Literal["save", "exit"] = "save"
    on_error: Literal["stop", "continue"] = "stop"
    preempt_signal: str | None = "SIGUSR1"

    def _check(self) -> None:
        self._positive("every", "keep_last", allow_zero=True)
        if not self.resume:
            raise ConfigError("checkpoint.resume: expected 'auto', 'never' or a checkpoint URL")
        if self.preempt_signal is not None:
            raw = self.preempt_signal.strip().upper()
            name = None if raw in ("", "NONE") else raw if raw.startswith("SIG") else f"SIG{raw}"
            if name is not None and name not in _PREEMPT_SIGNALS:
                raise ConfigError(
                    f"checkpoint.preempt_signal: expected one of {', '.join(_PREEMPT_SIGNALS)} "
                    f"or none, got {self.preempt_signal!r}"
                )
            object.__setattr__(self, "preempt_signal", name)


# Signals that may ask a run to stop, besides SIGINT, SIGTERM and SIGHUP (always honoured).
_PREEMPT_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGXCPU", "SIGTERM", "SIGINT", "SIGHUP")


@dataclass(frozen=True, kw_only=True)
class DistConfig(_Section):
    """Process group: ``auto`` picks NCCL on CUDA, gloo otherwise. ``timeout_s`` bounds every
    collective so a hung peer fails the job instead of stalling it."""

    _section: ClassVar[str] = "dist"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_s: float = 300.0

    def _check(self) -> None:
        self._positive("timeout_s")
        if self.backend == "nccl" and self.device == "cpu":
            raise ConfigError("dist.backend: nccl needs dist.device 'cuda' or 'auto', got 'cpu'")


@dataclass(frozen=True, kw_only=True)
class ZshardConfig(_Section):
    """The whole training configuration. ``grad_clip`` is the max global gradient norm (0: off)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    grad_clip: float = 0.0
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def _check(self) -> None:
        self._positive("grad_clip", allow_zero=True)
        if math.isnan(self.grad_clip):
            raise ConfigError("grad_clip: expected a number >= 0, got nan")
        offload = self.zero.offload_optimizer or self.zero.offload_param
        if self.optimizer.name == "lamb" and offload is not None:
            raise ConfigError(
                "optimizer.name: lamb needs each tensor's whole update for its trust ratio, and "
                "offload (zero.offload_optimizer / offload_param) streams the update in "
                "sub-groups; use adamw, adam or sgd with offload, or turn offload off"
            )

    @property
    def total_steps(self) -> int:
        return self.scheduler.total_steps or self.train.steps

    def model_kwargs(self) -> dict[str, Any]:
        """The keyword arguments the model provider is called with: ``model.args``, and for the
        built-in GPT the sequence length and activation checkpointing of this config unless
        ``model.args`` sets them."""
        kwargs = dict(self.model.args)
        if self.model.name == "gpt":
            kwargs.setdefault("seq_len", self.data.seq_len)
            kwargs.setdefault("activation_checkpointing", self.train.activation_checkpointing)
        self._data_vocab(kwargs)
        return kwargs

    def _data_vocab(self, kwargs: dict[str, Any]) -> None:
        """The data's vocabulary (its tokenizer's) for a gpt or hf model that sets none."""
        config = kwargs.get("config")
        settable = isinstance(config, Mapping) and "vocab_size" not in config
        if self.model.name == "hf" and not settable:
            return  # a config file, or a mapping that sets it
        if self.model.name not in ("gpt", "hf") or "vocab_size" in kwargs:
            return
        vocab = self.data.vocab_size()
        if vocab is not None:
            kwargs["vocab_size"] = vocab

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types; ``load_config(cfg.to_dict())`` gives an equal config."""
        out: dict[str, Any] = _to_plain(self)
        return out


# -- loading ------------------------------------------------------------------------------------
