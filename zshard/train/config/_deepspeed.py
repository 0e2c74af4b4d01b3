"""DeepSpeed configuration compatibility: a DeepSpeed JSON config -> a zshard config tree.

``from_deepspeed(ds, world_size)`` maps what zshard implements and lists the rest::

    tree, ignored = from_deepspeed(json.load(open("ds_config.json")), world_size=8)
    cfg = load_config(tree)
    if ignored:
        print(warning_line(ignored))  # one line: the DeepSpeed settings not applied

A training YAML can name a DeepSpeed config (a JSON file, relative to the YAML, or an inline
mapping) under ``deepspeed:``, and ``zshard train CONFIG --deepspeed-config ds.json`` names one on
the command line (relative to the working directory; it replaces the YAML's). Precedence, lowest
first: zshard defaults < the DeepSpeed config < keys set in the zshard YAML < ``--set``. The
YAML is the more specific, zshard-native file, so it wins; every DeepSpeed value it overrides is
reported. The batch sizes are one unit: if the YAML sets any of ``train.micro_batch_size``,
``train.grad_accum``, ``train.global_batch_size``, DeepSpeed's three are all dropped.

What maps (DeepSpeed key -> zshard key):

- ``zero_optimization``: ``stage``, ``reduce_bucket_size``, ``allgather_bucket_size``,
  ``stage3_param_persistence_threshold`` -> ``zero.*`` (element counts in both);
  ``stage3_prefetch_bucket_size`` (elements fetched ahead) -> ``zero.prefetch`` (modules
  gathered ahead): 0 disables prefetch; otherwise, when the model is known, the number of the
  model's average stage-3 module that fit in the bucket (at least 1, at most every module), and
  without the model zshard's default; ``offload_optimizer`` / ``offload_param``: ``device``
  (``none`` = no offload), ``nvme_path`` -> ``path``, ``buffer_count``, ``pin_memory``.
- ``fp16`` (``enabled``, ``initial_scale_power``, ``loss_scale_window``, ``hysteresis``,
  ``min_loss_scale``; ``loss_scale: 0`` = dynamic) and ``bf16`` -> ``precision``;
  ``data_types.grad_accum_dtype`` -> ``precision.grad_accum_dtype``.
- ``optimizer``: ``Adam`` is AdamW unless ``adam_w_mode`` is false (DeepSpeed's default since
  0.3.11), ``AdamW``, ``SGD``; ``params``: ``lr``, ``betas``, ``eps``, ``weight_decay``,
  ``momentum``, ``nesterov``.
- ``scheduler``: ``WarmupLR`` -> constant, ``WarmupDecayLR`` -> linear (down to
  ``warmup_min_lr``), ``WarmupCosineLR`` -> cosine (down to ``cos_min_ratio``); DeepSpeed's
  defaults apply to absent parameters (1000 warmup steps, max lr 0.001); ``warmup_max_lr`` sets
  ``optimizer.lr``, as DeepSpeed's scheduler overrides the optimizer's lr. zshard warms up
  linearly from 0: a ``log`` warmup (DeepSpeed's default) or a non-zero start is reported.
- ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``, ``train_batch_size``,
  ``gradient_clipping``, ``steps_per_print`` -> ``train.*`` and ``grad_clip``.

``"auto"`` (the Hugging Face Trainer convention) leaves a key unset, so zshard derives or defaults
it. Settings that only tune DeepSpeed's own implementation and match what zshard always does
(``contiguous_gradients``, ``overlap_comm``, ``reduce_scatter: true``, ...) are accepted silently;
everything else is returned as ignored.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from zshard.errors import ConfigError

AUTO = "auto"
_BATCH_KEYS = ("train.micro_batch_size", "train.grad_accum", "train.global_batch_size")
# DeepSpeed scheduler defaults (deepspeed/runtime/lr_schedules.py).
_WARMUP_DEFAULTS = {
    "warmup_min_lr": 0.0,
    "warmup_max_lr": 0.001,
    "warmup_num_steps": 1000,
    "warmup_type": "log",
}
_COSINE_DEFAULTS = {
    "warmup_min_ratio": 0.0,
    "warmup_num_steps": 1000,
    "warmup_type": "log",
    "cos_min_ratio": 0.0001,
}
# zero_optimization keys about DeepSpeed's own implementation. None: any value is fine (a
# performance knob, or something zshard always does); a value: fine only when equal to it.
_ZERO_NOOPS: dict[str, Any] = {
    "contiguous_gradients": None,  # zshard's gradients are always in flat buffers
    "overlap_comm": None,
    "round_robin_gradients": None,
    "elastic_checkpoint": None,  # zshard checkpoints load at any world size
    "stage3_gather_16bit_weights_on_model_save": None,  # `zshard consolidate` does it offline
    "gather_16bit_weights_on_model_save": None,
    "reduce_scatter": True,
    "allgather_partitions": True,
    "load_from_fp32_weights": True,
}
# Top-level keys that change nothing when off (monitors, profilers, DeepSpeed-only guards).
_TOP_NOOPS: dict[str, Any] = {
    "wall_clock_breakdown": False,
    "memory_breakdown": False,
    "dump_state": False,
    "zero_allow_untested_optimizer": None,
    "zero_force_ds_cpu_optimizer": None,
}
_MONITORS = ("tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler", "comms_logger")


class _Mapping:
    """Collects zshard leaves (dotted key -> value, and which DeepSpeed key set it) and the
    DeepSpeed keys not applied."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.leaves: dict[str, Any] = {}
        self.origin: dict[str, str] = {}
        self.ignored: list[str] = []

    def set(self, key: str, value: Any, ds_key: str) -> None:
        self.leaves[key] = value
        self.origin[key] = ds_key

    def ignore(self, ds_key: str, value: Any = None, why: str = "") -> None:
        shown = ds_key if value is None else f"{ds_key}={_show(value)}"
        self.ignored.append(f"{shown} ({why})" if why else shown)

    def bad(self, ds_key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{self.where}: {ds_key}: expected {expected}, got {value!r}")

    def integer(self, ds_key: str, value: Any, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(ds_key, value, "a number")
        if isinstance(value, float) and not value.is_integer():
            raise self.bad(ds_key, value, "a whole number")
        if value < minimum:
            raise self.bad(ds_key, value, f"a number >= {minimum}")
        return int(value)

    def number(self, ds_key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad(ds_key, value, "a number")
        return float(value)

    def flag(self, ds_key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.bad(ds_key, value, "true or false")
        return value

    def block(self, ds_key: str, value: Any) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.bad(ds_key, value, "a mapping")
        return value


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def from_deepspeed(
    ds: Mapping[str, Any],
    world_size: int | None = None,
    *,
    stage3_modules: Sequence[int] | None = None,
    where: str = "DeepSpeed config",
) -> tuple[dict[str, Any], list[str]]:
    """Map a DeepSpeed config onto a zshard config tree (the nested dict ``load_config`` takes).

    Args:
        ds: the DeepSpeed config, as parsed from its JSON.
        world_size: if known, DeepSpeed's batch rule (train_batch_size = micro batch x
            accumulation x world size) is checked when all three are given.
        stage3_modules: parameter counts of the modules stage 3 gathers (see
            ``zshard.train.models.stats``), to convert ``stage3_prefetch_bucket_size``.
        where: names the config in error messages.

    Returns:
        ``(tree, ignored)``: the zshard tree, and the DeepSpeed settings not applied.
    """
    m = _map(ds, world_size, stage3_modules, where)
    return _nest(m.leaves), m.ignored


def _map(
    ds: Mapping[str, Any],
    world_size: int | None,
    stage3_modules: Sequence[int] | None,
    where: str,
) -> _Mapping:
    m = _Mapping(where)
    if not isinstance(ds, Mapping):
        raise ConfigError(f"{where}: expected a JSON object at the top level, got {ds!r}")
    precision_blocks: dict[str, Mapping[str, Any]] = {}
    scheduler: Mapping[str, Any] | None = None
    for key, value in ds.items():
        if value == AUTO and key not in ("fp16", "bf16"):
            continue
        if key == "train_micro_batch_size_per_gpu":
            m.set("train.micro_batch_size", m.integer(key, value, 1), key)
        elif key == "gradient_accumulation_steps":
            m.set("train.grad_accum", m.integer(key, value, 1), key)
        elif key == "train_batch_size":
            m.set("train.global_batch_size", m.integer(key, value, 1), key)
        elif key == "gradient_clipping":
            m.set("grad_clip", m.number(key, value), key)
        elif key == "steps_per_print":
            m.set("train.log_every", m.integer(key, value), key)
        elif key == "zero_optimization":
            _zero(m, value, stage3_modules)
        elif key in ("fp16", "bf16", "bfloat16"):
            precision_blocks["bf16" if key == "bfloat16" else key] = m.block(key, value)
        elif key == "data_types":
            _data_types(m, m.block(key, value), ds)
        elif key == "optimizer":
            _optimizer(m, m.block(key, value))
        elif key == "scheduler":
            scheduler = m.block(key, value)  # after the optimizer: its max lr wins
        elif not _top_noop(key, value):
            m.ignore(key)
    _precision(m, precision_blocks)
    if scheduler is not None:
        _scheduler(m, scheduler)
    _check_batch(m, world_size)
    return m


def _top_noop(key: str, value: Any) -> bool:
    if key in _MONITORS:
        return isinstance(value, Mapping) and not value.get("enabled")
    return key in _TOP_NOOPS and _TOP_NOOPS[key] in (None, value)


def _check_batch(m: _Mapping, world_size: int | None) -> None:
    mb, ga, gb = (m.leaves.get(k) for k in _BATCH_KEYS)
    if not world_size or mb is None or ga is None or gb is None:
        return
    want = int(mb) * int(ga) * world_size
    if gb != want:
        raise ConfigError(
            f"{m.where}: train_batch_size={gb} != train_micro_batch_size_per_gpu={mb} x "
            f"gradient_accumulation_steps={ga} x world size {world_size} = {want}; "
            'fix one of them or set it to "auto"'
        )


def _zero(m: _Mapping, z: Any, stage3_modules: Sequence[int] | None) -> None:
    if isinstance(z, bool):  # DeepSpeed's legacy form: `"zero_optimization": true` is stage 1
        m.set("zero.stage", 1 if z else 0, "zero_optimization")
        return
    z = m.block("zero_optimization", z)
    prefetch_bucket: int | None = None
    for key, value in z.items():
        ds_key = f"zero_optimization.{key}"
        if value == AUTO:
            continue
        if key == "stage":
            stage = m.integer(ds_key, value)
            if stage not in (0, 1, 2, 3):
                raise m.bad(ds_key, value, "one of 0, 1, 2, 3")
            m.set("zero.stage", stage, ds_key)
        elif key in ("reduce_bucket_size", "allgather_bucket_size"):
            m.set(f"zero.{key}", m.integer(ds_key, value, 1), ds_key)
        elif key == "stage3_param_persistence_threshold":
            m.set("zero.param_persistence_threshold", m.integer(ds_key, value), ds_key)
        elif key == "stage3_prefetch_bucket_size":
            prefetch_bucket = m.integer(ds_key, value)
        elif key in ("offload_optimizer", "offload_param"):
            _offload(m, key, m.block(ds_key, value))
        elif key == "cpu_offload" and isinstance(value, bool):  # pre-0.3.16 spelling
            if value:
                m.set("zero.offload_optimizer", {"device": "cpu"}, ds_key)
        elif key in _ZERO_NOOPS and _ZERO_NOOPS[key] in (None, value):
            continue
        else:
            m.ignore(ds_key, value if key in _ZERO_NOOPS else None)
    if prefetch_bucket is not None:
        ds_key = "zero_optimization.stage3_prefetch_bucket_size"
        prefetch = prefetch_modules(prefetch_bucket, stage3_modules)
        if prefetch is not None:
            m.set("zero.prefetch", prefetch, ds_key)


def prefetch_modules(bucket: int, stage3_modules: Sequence[int] | None) -> int | None:
    """DeepSpeed's prefetch bucket (elements) -> zshard's ``zero.prefetch`` (modules ahead).

    0 disables prefetch in both. Otherwise: how many of the model's average gathered module fit
    in the bucket, at least 1 and at most the number of modules; None (keep zshard's default)
    when the model's modules are unknown.
    """
    if bucket == 0:
        return 0
    sizes = [s for s in (stage3_modules or ()) if s > 0]
    if not sizes:
        return None
    mean = sum(sizes) / len(sizes)
    return max(1, min(len(sizes), round(bucket / mean)))


def _offload(m: _Mapping, key: str, block: Mapping[str, Any]) -> None:
    base = f"zero_optimization.{key}"
    device = block.get("device", "cpu")
    if device == AUTO:
        return
    if not isinstance(device, str) or device.lower() not in ("none", "cpu", "nvme"):
        raise m.bad(f"{base}.device", device, "one of none, cpu, nvme")
    if device.lower() == "none":
        return
    out: dict[str, Any] = {"device": device.lower()}
    for k, value in block.items():
        ds_key = f"{base}.{k}"
        if k == "device" or value == AUTO:
            continue
        if k == "nvme_path":
            if not isinstance(value, str):
                raise m.bad(ds_key, value, "a path")
            out["path"] = value
        elif k == "buffer_count":
            out["buffer_count"] = m.integer(ds_key, value, 1)
        elif k == "pin_memory":
            out["pin_memory"] = m.flag(ds_key, value)
        else:
            m.ignore(ds_key)
    m.set(f"zero.{key}", out, base)


def _enabled(m: _Mapping, name: str, block: Mapping[str, Any]) -> bool | None:
    value = block.get("enabled", False)  # DeepSpeed: a block without `enabled` is off
    if value == AUTO:
        return None
    return m.flag(f"{name}.enabled", value)


def _precision(m: _Mapping, blocks: dict[str, Mapping[str, Any]]) -> None:
    fp16 = _enabled(m, "fp16", blocks["fp16"]) if "fp16" in blocks else None
    bf16 = _enabled(m, "bf16", blocks["bf16"]) if "bf16" in blocks else None
    if fp16 and bf16:
        raise ConfigError(f"{m.where}: fp16.enabled and bf16.enabled are both true; pick one")
    if fp16:
        m.set("precision.dtype", "fp16", "fp16.enabled")
        _loss_scale(m, blocks["fp16"])
    elif bf16:
        m.set("precision.dtype", "bf16", "bf16.enabled")
    elif fp16 is False or bf16 is False:
        m.set("precision.dtype", "fp32", "fp16.enabled" if fp16 is False else "bf16.enabled")
    for key in blocks.get("bf16", {}):
        if key != "enabled" and bf16:
            m.ignore(f"bf16.{key}")


def _loss_scale(m: _Mapping, block: Mapping[str, Any]) -> None:
    names = {
        "initial_scale_power": "initial_scale_power",
        "loss_scale_window": "window",
        "hysteresis": "hysteresis",
    }
    for key, value in block.items():
        ds_key = f"fp16.{key}"
        if key == "enabled" or value == AUTO:
            continue
        if key in names:
            m.set(f"precision.loss_scale.{names[key]}", m.integer(ds_key, value), ds_key)
        elif key == "min_loss_scale":
            scale = m.number(ds_key, value)
            if scale > 0:
                m.set("precision.loss_scale.min_scale", scale, ds_key)
            else:
                m.ignore(ds_key, value, "zshard needs a positive minimum")
        elif key == "loss_scale":
            if m.number(ds_key, value) != 0:
                m.ignore(ds_key, value, "static loss scaling; zshard scales dynamically")
        elif key in ("consecutive_hysteresis", "auto_cast") and value is False:
            continue
        else:
            m.ignore(ds_key, value)


def _data_types(m: _Mapping, block: Mapping[str, Any], ds: Mapping[str, Any]) -> None:
    for key, value in block.items():
        ds_key = f"data_types.{key}"
        if key == "grad_accum_dtype" and value in ("fp32", "float32"):
            m.set("precision.grad_accum_dtype", "fp32", ds_key)
        elif key == "grad_accum_dtype" and value in ("fp16", "bf16", "float16", "bfloat16"):
            m.set("precision.grad_accum_dtype", "param", ds_key)
        elif value not in (None, AUTO):
            m.ignore(ds_key, value)


def _optimizer(m: _Mapping, block: Mapping[str, Any]) -> None:
    kind = block.get("type")
    if not isinstance(kind, str):
        raise m.bad("optimizer.type", kind, "a name such as AdamW")
    params = dict(m.block("optimizer.params", block.get("params", {})))
    # DeepSpeed reads adam_w_mode from params; some configs put it beside `type`.
    w_mode = params.pop("adam_w_mode", block.get("adam_w_mode", True))
    params.pop("torch_adam", None)  # an implementation choice: same arithmetic
    low = kind.lower()
    if low == "adam":
        name = "adamw" if m.flag("optimizer.params.adam_w_mode", w_mode) else "adam"
    elif low in ("adamw", "sgd"):
        name = low
    else:
        m.ignore("optimizer.type", kind, "zshard has adamw, adam, sgd")
        return
    for key in block:
        if key not in ("type", "params", "adam_w_mode"):
            m.ignore(f"optimizer.{key}")
    m.set("optimizer.name", name, "optimizer.type")
    allowed = {"lr", "eps", "weight_decay", "betas"} if name != "sgd" else {"lr", "weight_decay"}
    if name == "sgd":
        allowed |= {"momentum", "nesterov"}
    defaults = {"bias_correction": True, "amsgrad": False, "dampening": 0, "maximize": False}
    for key, value in params.items():
        ds_key = f"optimizer.params.{key}"
        if value == AUTO:
            continue
        if key in allowed and key == "betas":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise m.bad(ds_key, value, "a list of 2 numbers")
            m.set("optimizer.betas", [m.number(ds_key, v) for v in value], ds_key)
        elif key in allowed and key == "nesterov":
            m.set("optimizer.nesterov", m.flag(ds_key, value), ds_key)
        elif key in allowed:
            m.set(f"optimizer.{key}", m.number(ds_key, value), ds_key)
        elif key in defaults and defaults[key] == value:
            continue
        else:
            m.ignore(ds_key, value)


def _scheduler(m: _Mapping, block: Mapping[str, Any]) -> None:
    kind = block.get("type")
    if not isinstance(kind, str):
        raise m.bad("scheduler.type", kind, "a name such as WarmupLR")
    names = {"warmuplr": "constant", "warmupdecaylr": "linear", "warmupcosinelr": "cosine"}
    name = names.get(kind.lower())
    if name is None:
        m.ignore("scheduler.type", kind, "zshard has WarmupLR, WarmupDecayLR, WarmupCosineLR")
        return
    given = dict(m.block("scheduler.params", block.get("params", {})))
    for key in block:
        if key not in ("type", "params"):
            m.ignore(f"scheduler.{key}")
    defaults = _COSINE_DEFAULTS if name == "cosine" else _WARMUP_DEFAULTS
    p = {**defaults, **given}

    def known(key: str) -> bool:
        return p.get(key, AUTO) != AUTO

    def ds(key: str) -> str:
        return f"scheduler.params.{key}"

    m.set("scheduler.name", name, "scheduler.type")
    if known("warmup_num_steps"):
        warmup = m.integer(ds("warmup_num_steps"), p["warmup_num_steps"])
        m.set("scheduler.warmup_steps", warmup, ds("warmup_num_steps"))
        if warmup and p.get("warmup_type") not in ("linear", AUTO):
            m.ignore(ds("warmup_type"), p.get("warmup_type"), "zshard warms up linearly")
    if name != "constant" and known("total_num_steps"):
        total = m.integer(ds("total_num_steps"), p["total_num_steps"], 1)
        m.set("scheduler.total_steps", total, ds("total_num_steps"))
    if name == "cosine":
        if known("cos_min_ratio"):
            m.set(
                "scheduler.min_lr_ratio",
                m.number(ds("cos_min_ratio"), p["cos_min_ratio"]),
                ds("cos_min_ratio"),
            )
        if known("warmup_min_ratio") and m.number(ds("warmup_min_ratio"), p["warmup_min_ratio"]):
            m.ignore(ds("warmup_min_ratio"), p["warmup_min_ratio"], "zshard warms up from 0")
    else:
        max_lr = (
            m.number(ds("warmup_max_lr"), p["warmup_max_lr"]) if known("warmup_max_lr") else None
        )
        if max_lr is not None:
            opt_lr = m.leaves.get("optimizer.lr")
            if opt_lr is not None and opt_lr != max_lr:
                m.ignore("optimizer.params.lr", opt_lr, "the scheduler's warmup_max_lr sets it")
            m.set("optimizer.lr", max_lr, ds("warmup_max_lr"))
        min_lr = (
            m.number(ds("warmup_min_lr"), p["warmup_min_lr"]) if known("warmup_min_lr") else 0.0
        )
        if min_lr and name == "linear" and max_lr:
            m.set("scheduler.min_lr_ratio", min_lr / max_lr, ds("warmup_min_lr"))
        if min_lr:
            m.ignore(ds("warmup_min_lr"), p["warmup_min_lr"], "zshard warms up from 0")
    extra = set(given) - set(defaults) - {"total_num_steps", "last_batch_iteration"}
    for key in sorted(extra):
        m.ignore(ds(key), given[key])


# -- dotted keys into a tree ----------------------------------------------------------------


def _nest(leaves: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in leaves.items():
        _put(tree, dotted, copy.deepcopy(value))
    return tree


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "precision":
            child = {"dtype": child}  # the `precision: bf16` shorthand
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value
