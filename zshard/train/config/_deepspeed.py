"""DeepSpeed configuration compatibility: a DeepSpeed JSON config -> a zshard config tree.

One rule for every DeepSpeed key: it is **honoured** with the same meaning (mapped onto a zshard
key, or already what zshard always does), or **refused** (:class:`ConfigError`, naming the key
and what zshard supports). Only keys that cannot change the training result (logging, monitors,
profilers, performance knobs) are accepted with a **warning**, and so is ``"auto"`` (the Hugging
Face Trainer convention), which leaves the key to zshard: the warning says what it resolved to.
A key absent from :data:`RULES` is refused. ``docs/deepspeed.md`` is generated from
:data:`RULES` (``tools/gen_deepspeed_docs.py``), so the table and the behaviour cannot drift::

    tree, notes = from_deepspeed(json.load(open("ds_config.json")), world_size=8)
    cfg = load_config(tree)
    if notes:
        print(warning_line(notes))  # one line: keys accepted with a warning, "auto" resolved

A training YAML can name a DeepSpeed config (a JSON file, relative to the YAML, or an inline
mapping) under ``deepspeed:``, and ``zshard train CONFIG --deepspeed-config ds.json`` names one on
the command line (relative to the working directory; it replaces the YAML's). Precedence, lowest
first: zshard defaults < the DeepSpeed config < keys set in the zshard YAML < ``--set``. The
YAML is the more specific, zshard-native file, so it wins; every DeepSpeed value it overrides is
reported. The batch sizes are one unit: if the YAML sets any of ``train.micro_batch_size``,
``train.grad_accum``, ``train.global_batch_size``, DeepSpeed's three are all dropped.

Semantics follow DeepSpeed 0.19 (its pydantic config models and ``engine.py``). The rules are data
(``_ds_table.py``, ``_ds_table_zero.py``, their vocabulary in ``_ds_rule.py``); this module walks
a config through them, with the sections whose keys depend on each other.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from zshard.errors import ConfigError
from zshard.train.config._ds_rule import ANY, AUTO, DsMapping, Rule, show
from zshard.train.config._ds_table import OPTIMIZER_TYPES, RULES, TYPE_PARAMS
from zshard.train.config._ds_table_zero import ZERO
from zshard.train.config._lrsched import BY_DS_TYPE, DS_SCHEDULES, schedule_params

_BATCH_KEYS = ("train.micro_batch_size", "train.grad_accum", "train.global_batch_size")
DOCS = "docs/deepspeed.md"


def _rule(m: DsMapping, ds_key: str, value: Any) -> Rule:
    rule = RULES.get(ds_key)
    if rule is None:
        section, _, _ = ds_key.rpartition(".")
        known = sorted(k.rpartition(".")[2] for k in RULES if k.rpartition(".")[0] == section)
        where = f"; {section or 'the top level'} takes {', '.join(known)}" if known else ""
        raise ConfigError(
            f"{m.where}: {ds_key}: not a DeepSpeed key zshard supports{where} (see {DOCS})"
        )
    return rule


def _key(m: DsMapping, ds_key: str, value: Any) -> Rule | None:
    """Apply the generic part of a key's rule: quiet, warn, refuse or (mapped) its handler.
    Returns the rule when the caller has more to do (sections, mapped keys without handler)."""
    rule = _rule(m, ds_key, value)
    if value == AUTO:
        if rule.zshard and rule.treatment == "mapped":
            m.auto.append((ds_key, rule.zshard))
        return None
    if rule.accepts_quietly(value):
        return None
    if rule.treatment == "refused":
        raise m.refuse(ds_key, value, rule.note)
    if rule.treatment == "warn":
        m.note(ds_key, value if not isinstance(value, Mapping) else None, rule.note)
        return None
    if rule.treatment == "same":
        if rule.section and isinstance(value, Mapping):
            _walk(m, ds_key, value)
        return None
    if rule.caveat:
        m.note(ds_key, value, rule.caveat)
    if rule.apply is not None:
        rule.apply(m, ds_key, value)
        return None
    return rule


def _apply(m: DsMapping, ds_key: str, value: Any) -> None:
    """A key's rule, then the rules of the keys below it when it is a mapped section."""
    rule = _key(m, ds_key, value)
    if rule is not None and rule.section:
        _walk(m, ds_key, m.block(ds_key, value))


def _walk(m: DsMapping, prefix: str, block: Mapping[str, Any]) -> None:
    for key, value in block.items():
        _apply(m, f"{prefix}.{key}", value)


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
        ``(tree, notes)``: the zshard tree, and the notes for the warning line (keys accepted
        with a warning, ``"auto"`` keys and what zshard's defaults make of them).
    """
    m = _map(ds, world_size, stage3_modules, where)
    tree = _nest(m.leaves)
    notes = list(m.notes)
    if "unconverted_prefetch" in m.pending:
        notes.append(_unconverted_note(*m.pending["unconverted_prefetch"]))
    return tree, notes + auto_notes(m.auto, tree)


def _unconverted_note(ds_key: str, bucket: int) -> str:
    return (
        f"{ds_key}={bucket} (the model could not be counted to convert it to modules: "
        "zshard's zero.prefetch default kept)"
    )


def auto_notes(
    auto: Sequence[tuple[str, str]], tree: Mapping[str, Any], overrides: Sequence[str] = ()
) -> list[str]:
    """One note per ``"auto"`` key: the zshard key that decides it and, when the config
    validates, its value."""
    if not auto:
        return []
    from zshard.train.config._load import load_config

    try:
        plain: Any = load_config(tree, overrides).to_dict()
    except Exception:  # an invalid tree is reported by the real load later
        plain = None
    out = []
    for ds_key, zshard_key in auto:
        value = _resolved(plain, zshard_key)
        shown = "" if value is ANY else f" = {show(value)}"
        out.append(f"{ds_key}=auto (zshard's {zshard_key}{shown})")
    return out


def _resolved(plain: Any, dotted: str) -> Any:
    node = plain
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return ANY
        node = node[part]
    if node is None and dotted.startswith("train."):
        return "derived from the other batch sizes at start-up"
    return node if not isinstance(node, Mapping) else ANY


def _map(
    ds: Mapping[str, Any],
    world_size: int | None,
    stage3_modules: Sequence[int] | None,
    where: str,
) -> DsMapping:
    m = DsMapping(where)
    if not isinstance(ds, Mapping):
        raise ConfigError(f"{where}: expected a JSON object at the top level, got {ds!r}")
    for key, value in ds.items():
        if key == ZERO:
            _zero(m, value, stage3_modules)
        elif key in ("fp16", "bf16", "bfloat16"):
            _rule(m, key, value)
        elif key == "optimizer":
            _optimizer(m, value)
        elif key == "scheduler":
            pass  # after the optimizer and precision
        elif key == "activation_checkpointing":
            if value == AUTO:
                m.auto.append((key, "train.activation_checkpointing"))
                continue
            m.set("train.activation_checkpointing.enabled", True, key)
            _walk(m, key, m.block(key, value))
        else:
            _apply(m, key, value)
    _precision(m, ds)
    if "scheduler" in ds:
        _scheduler(m, ds["scheduler"])
    _check_batch(m, world_size)
    return m


def _check_batch(m: DsMapping, world_size: int | None) -> None:
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


# -- sections with more than key-by-key rules ----------------------------------------------------


def _zero(m: DsMapping, z: Any, stage3_modules: Sequence[int] | None) -> None:
    key = ZERO
    if z == AUTO:
        return
    if isinstance(z, bool):  # DeepSpeed's legacy form: `"zero_optimization": true` is stage 1
        m.set("zero.stage", 1 if z else 0, key)
        return
    z = m.block(key, z)
    for sub, value in z.items():
        ds_key = f"{key}.{sub}"
        if sub in ("offload_optimizer", "offload_param"):
            _offload(m, ds_key, sub, value)
            continue
        _key(m, ds_key, value)
    pending = m.pending
    if "pin_memory" in pending:
        ds_key, value = pending.pop("pin_memory")
        for which in ("offload_optimizer", "offload_param"):
            if f"zero.{which}.device" in m.leaves:
                m.set(f"zero.{which}.pin_memory", m.flag(ds_key, value), ds_key)
    if "sub_group_size" in pending:
        ds_key, value = pending.pop("sub_group_size")
        size = m.integer(ds_key, value, 1)
        if m.leaves.get("zero.offload_optimizer.device") in ("cpu", "nvme"):
            m.set("zero.offload_optimizer.sub_group_size", size, ds_key)
        # Without offload it only groups DeepSpeed's stage-3 step: the same update.
    if "prefetch_bucket_size" in pending:
        ds_key, value = pending.pop("prefetch_bucket_size")
        bucket = m.integer(ds_key, value)
        prefetch = prefetch_modules(bucket, stage3_modules)
        if prefetch is not None:
            m.set("zero.prefetch", prefetch, ds_key)
        else:
            m.pending["unconverted_prefetch"] = (ds_key, bucket)


def _offload(m: DsMapping, ds_key: str, which: str, value: Any) -> None:
    if value == AUTO:
        return
    if value is None:
        return  # DeepSpeed's default: no offload
    block = m.block(ds_key, value)
    device = block.get("device", "none")  # DeepSpeed's default device is none
    if device == AUTO:
        m.auto.append((f"{ds_key}.device", f"zero.{which}"))
        return
    if not isinstance(device, str) or device.lower() not in ("none", "cpu", "nvme"):
        raise m.bad(f"{ds_key}.device", device, "one of none, cpu, nvme")
    for sub in block:
        _rule(m, f"{ds_key}.{sub}", block[sub])  # unknown keys are refused even when off
    if device.lower() == "none":
        return
    m.set(f"zero.{which}.device", device.lower(), f"{ds_key}.device")
    for sub, v in block.items():
        if sub != "device":
            _key(m, f"{ds_key}.{sub}", v)


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


def _enabled(m: DsMapping, name: str, block: Mapping[str, Any]) -> bool | None:
    value = block.get("enabled", False)  # DeepSpeed: a block without `enabled` is off
    if value == AUTO:
        return None
    return m.flag(f"{name}.enabled", value)


def _precision(m: DsMapping, ds: Mapping[str, Any]) -> None:
    blocks: dict[str, tuple[str, Mapping[str, Any]]] = {}
    for key in ("fp16", "bf16", "bfloat16"):
        if key in ds and ds[key] != AUTO:
            blocks["bf16" if key == "bfloat16" else key] = (key, m.block(key, ds[key]))
        elif key in ds:
            m.auto.append((key, "precision.dtype"))
    state = {name: _enabled(m, key, block) for name, (key, block) in blocks.items()}
    for name, (key, _) in blocks.items():
        if state[name] is None:
            m.auto.append((f"{key}.enabled", "precision.dtype"))
    fp16, bf16 = state.get("fp16"), state.get("bf16")
    if fp16 and bf16:
        raise ConfigError(f"{m.where}: fp16.enabled and bf16.enabled are both true; pick one")
    for name, (key, block) in blocks.items():
        for sub, value in block.items():
            if sub == "enabled":
                continue
            ds_key = f"{key}.{sub}"
            _rule(m, ds_key, value)  # unknown keys are refused in a disabled block too
            if state[name] is not False:  # on, or "auto" (the zshard config may turn it on)
                _key(m, ds_key, value)
    if fp16:
        m.set("precision.dtype", "fp16", f"{blocks['fp16'][0]}.enabled")
        if m.leaves.get("precision.loss_scale.static_scale") == 0.0:
            del m.leaves["precision.loss_scale.static_scale"]  # 0 = dynamic, zshard's default
    elif bf16:
        m.set("precision.dtype", "bf16", f"{blocks['bf16'][0]}.enabled")
    elif fp16 is False or bf16 is False:
        m.set("precision.dtype", "fp32", "fp16.enabled" if fp16 is False else "bf16.enabled")
    if "grad_accum_dtype" in m.pending:
        ds_key, value = m.pending.pop("grad_accum_dtype")
        dtype = m.leaves.get("precision.dtype")
        names = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16"}
        names |= {"bf16": "bf16", "bfloat16": "bf16"}
        want = names.get(value) if isinstance(value, str) else None
        if value is None:
            return
        if want is None:
            raise m.bad(ds_key, value, "fp32, fp16 or bf16")
        if want == "fp32":
            m.set("precision.grad_accum_dtype", "fp32", ds_key)
        elif dtype in (None, want):
            m.set("precision.grad_accum_dtype", "param", ds_key)
        else:
            raise m.refuse(
                ds_key,
                value,
                f"zshard accumulates gradients in fp32 or in the module dtype ({dtype})",
            )


def _typed(
    m: DsMapping, section: str, value: Any, example: str
) -> tuple[Mapping[str, Any], str] | None:
    """A section chosen by its ``type`` (optimizer, scheduler): the block and the type, its keys
    beside ``type`` and ``params`` put through their rules; None when the type is ``"auto"``."""
    block = m.block(section, value)
    kind = block.get("type")
    if kind == AUTO:
        m.auto.append((f"{section}.type", f"{section}.name"))
        return None
    if not isinstance(kind, str):
        raise m.bad(f"{section}.type", kind, f"a name such as {example}")
    for key in block:
        if key not in ("type", "params"):
            _key(m, f"{section}.{key}", block[key])  # refused unless the table has a rule
    return block, kind


def _optimizer(m: DsMapping, value: Any) -> None:
    typed = _typed(m, "optimizer", value, "AdamW")
    if typed is None:
        return
    block, kind = typed
    params = dict(m.block("optimizer.params", block.get("params", {})))
    low = kind.lower()
    if low not in OPTIMIZER_TYPES:
        raise m.refuse(
            "optimizer.type",
            kind,
            "zshard implements Adam, AdamW, SGD and Lamb (not OneBitAdam, ZeroOneAdam, "
            "OneBitLamb, Adagrad, Lion, Muon or other torch.optim classes)",
        )
    # DeepSpeed reads adam_w_mode from params; some configs put it beside `type`.
    w_mode = params.pop("adam_w_mode", block.get("adam_w_mode", True))
    name = low
    if low == "adam" and w_mode != AUTO:
        name = "adamw" if m.flag("optimizer.params.adam_w_mode", w_mode) else "adam"
    m.set("optimizer.name", name, "optimizer.type")
    # DeepSpeed's optimizer classes' defaults where they differ from zshard's.
    m.set("optimizer.lr", 0.001, "optimizer.params.lr (DeepSpeed's default)")
    if name == "adamw" and params.get("torch_adam") is True:  # torch.optim.AdamW's default
        m.set("optimizer.weight_decay", 0.01, "optimizer.params.weight_decay (torch's default)")
    allowed = TYPE_PARAMS[name]
    for key, value in params.items():
        ds_key = f"optimizer.params.{key}"
        rule = _rule(m, ds_key, value)
        if value == AUTO:
            if rule.zshard:
                m.leaves.pop(rule.zshard, None)
                m.auto.append((ds_key, rule.zshard))
            continue
        if rule.treatment != "mapped":
            _key(m, ds_key, value)
            continue
        if key not in allowed:
            raise m.refuse(ds_key, value, f"not a parameter of {OPTIMIZER_TYPES[name]} in zshard")
        if key == "betas":
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise m.bad(ds_key, value, "a list of 2 numbers")
            m.set("optimizer.betas", [m.number(ds_key, v) for v in value], ds_key)
        elif key in ("nesterov", "eps_inside_sqrt"):
            m.set(f"optimizer.{key}", m.flag(ds_key, value), ds_key)
        elif key == "bias_correction":
            flag = m.flag(ds_key, value)
            if name != "lamb" and not flag:
                raise m.refuse(ds_key, value, "zshard's Adam always corrects the moments' bias")
            if name == "lamb":
                m.set("optimizer.bias_correction", flag, ds_key)
        else:
            m.set(f"optimizer.{key}", m.number(ds_key, value), ds_key)


def _scheduler(m: DsMapping, value: Any) -> None:
    typed = _typed(m, "scheduler", value, "WarmupLR")
    if typed is None:
        return
    block, kind = typed
    name = BY_DS_TYPE.get(kind)
    if name is None:
        raise m.refuse(
            "scheduler.type",
            kind,
            f"zshard implements DeepSpeed's {', '.join(BY_DS_TYPE)} (not torch.optim.lr_scheduler "
            "classes)",
        )
    given: dict[str, Any] = {}
    for key, v in m.block("scheduler.params", block.get("params", {})).items():
        ds_key = f"scheduler.params.{key}"
        _rule(m, ds_key, v)
        if key == "last_batch_iteration":
            _key(m, ds_key, v)
            continue
        if key not in DS_SCHEDULES[name][1]:
            raise m.refuse(ds_key, v, f"not a parameter of DeepSpeed's {kind}")
        if v == AUTO:
            # The Hugging Face Trainer fills these from the run: here, zshard's values.
            if key in ("warmup_max_lr", "total_num_steps"):
                given[key] = None
                what = "optimizer.lr" if key == "warmup_max_lr" else "train.steps"
                m.auto.append((ds_key, what))
            else:
                default = DS_SCHEDULES[name][1][key]
                m.note(ds_key, v, f"DeepSpeed's default {show(default)}")
            continue
        given[key] = v
    try:
        schedule_params(name, given, "scheduler.params")
    except ConfigError as e:
        raise ConfigError(f"{m.where}: {e}") from None
    m.set("scheduler.name", name, "scheduler.type")
    m.set("scheduler.params", given, "scheduler.params")


# -- dotted keys into a tree ----------------------------------------------------------------

# Sections a zshard YAML may give as one string (``precision: bf16``): their field.
SHORTHAND = {"precision": "dtype", "offload_optimizer": "device", "offload_param": "device"}


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
        if isinstance(child, str) and part in SHORTHAND:
            child = {SHORTHAND[part]: child}  # `precision: bf16`, `offload_param: cpu`
        elif child is True and part == "activation_checkpointing":
            child = {}  # `activation_checkpointing: true` with DeepSpeed's details
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value
