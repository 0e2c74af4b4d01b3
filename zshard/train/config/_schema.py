"""Training configuration: one tree of frozen, keyword-only dataclasses, validated at construction.

Load it from a YAML file, a dict or an existing config, with dotted ``--set`` overrides::

    cfg = load_config("train.yaml", ["zero.stage=3", "precision=bf16", "optimizer.lr=1e-3"])

Every section checks its field types (modes are ``Literal``) and ranges in ``__post_init__``, so
a bad file fails at start-up with the dotted key, the allowed values and the value given, e.g.
``zero.stage: expected one of 0, 1, 2, 3, got 5``. The ``zero:`` section and its offload
sections are in ``_sections_zero.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from zshard.errors import ConfigError
from zshard.train.config._section import _Section, _to_plain
from zshard.train.config._sections_zero import ZeroConfig

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
