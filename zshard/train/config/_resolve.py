"""The run's configuration as ``zshard train`` resolves it: the YAML, a DeepSpeed config it names
(or ``--deepspeed-config``) merged under it, then ``--set``; values that need the model
(``stage3_prefetch_bucket_size`` in modules) are resolved by counting it on ``meta``.

Precedence, lowest first: zshard defaults < the DeepSpeed config < keys set in the YAML <
``--set``. One warning line reports every DeepSpeed value the YAML overrides, the DeepSpeed keys
accepted with a warning (they cannot change the result) and what each ``"auto"`` resolved to.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import yaml

from zshard.errors import ConfigError, ZshardError
from zshard.train.config._deepspeed import (
    _BATCH_KEYS,
    SHORTHAND,
    _map,
    _put,
    _unconverted_note,
    auto_notes,
    prefetch_modules,
)
from zshard.train.config._ds_rule import show
from zshard.train.config._load import load_config, read_yaml
from zshard.train.config._schema import ZshardConfig
from zshard.train.models.stats import ModelStats, model_stats


def stats_of(cfg: ZshardConfig) -> ModelStats:
    """The configured model's parameter counts (built on ``meta``, as training would build it)."""
    return model_stats(cfg.model.name, cfg.model_kwargs(), cfg.zero.param_persistence_threshold)


def default_nproc() -> int:
    """``zshard train``'s default number of processes on this host: one per GPU, else 2."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _lookup(tree: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    """Whether the zshard tree sets ``dotted`` (and to what). A section given as one string
    sets its shorthand field (``precision: bf16`` sets ``precision.dtype``); a section given as
    another scalar (``activation_checkpointing: false``) sets everything under it."""
    node: Any = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if i and isinstance(node, str) and parts[i - 1] in SHORTHAND:
            if i == len(parts) - 1 and part == SHORTHAND[parts[i - 1]]:
                return True, node
            return False, None
        if i and node is not None and not isinstance(node, Mapping):
            return True, node  # a scalar where DeepSpeed sets a key below it
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def load_deepspeed(
    source: str | Mapping[str, Any], base_dir: str | None = None
) -> tuple[dict[str, Any], str]:
    """A DeepSpeed config from a JSON (or YAML) file or a mapping; returns it and its name."""
    if isinstance(source, Mapping):
        return dict(source), "deepspeed (inline)"
    if not isinstance(source, str) or not source:
        raise ConfigError(f"deepspeed: expected a path to a JSON file or a mapping, got {source!r}")
    path = source
    if base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"DeepSpeed config {path}: cannot read it ({e.strerror or e})") from None
    try:
        is_yaml = path.endswith((".yaml", ".yml"))
        data = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"DeepSpeed config {path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path}: expected a JSON object at the top level")
    return data, f"DeepSpeed config {path}"


def _stage3_modules(tree: Mapping[str, Any]) -> list[int] | None:
    """Sizes of the modules stage 3 would gather, from the tree's model (None if unknown)."""
    try:
        stats = stats_of(load_config(tree))
    except (ZshardError, ImportError, TypeError, ValueError):
        return None  # a bad model section is reported by the real load_config later
    return list(stats.gathered_modules)


def apply_deepspeed(
    tree: Mapping[str, Any],
    ds_source: str | Mapping[str, Any] | None,
    world_size: int | None,
    *,
    base_dir: str | None = None,
    overrides: Sequence[str] = (),
) -> tuple[dict[str, Any], list[str]]:
    """Merge a DeepSpeed config into a zshard config tree (see the module docstring for the
    precedence). ``ds_source`` (a path or mapping; the ``--deepspeed-config`` flag) replaces the
    tree's ``deepspeed:`` key, whose relative paths resolve against ``base_dir`` (the YAML's
    directory); ``overrides`` (``--set``) only inform the ``"auto"`` notes. Returns the merged
    tree, without ``deepspeed``, for ``load_config``, and the notes for the warning line
    (DeepSpeed values the zshard config overrides, keys accepted with a warning, ``"auto"``
    resolutions)."""
    merged = copy.deepcopy(dict(tree))
    inline = merged.pop("deepspeed", None)
    if ds_source is None:
        if inline is None:
            return merged, []
        ds, where = load_deepspeed(inline, base_dir)
    else:
        ds, where = load_deepspeed(ds_source)
    m = _map(ds, world_size, None, where)
    ignored = list(m.notes)
    yaml_batch = [k for k in _BATCH_KEYS if _lookup(merged, k)[0]]
    for dotted, value in m.leaves.items():
        if dotted in _BATCH_KEYS and yaml_batch:
            # The three batch sizes constrain each other: take them all from one side.
            ignored.append(f"{m.origin[dotted]} (the zshard config sets {', '.join(yaml_batch)})")
            continue
        present, current = _lookup(merged, dotted)
        if not present:
            _put(merged, dotted, copy.deepcopy(value))
        elif current != value:
            ignored.append(f"{m.origin[dotted]} (the zshard config sets {dotted}: {show(current)})")
    unconverted = m.pending.get("unconverted_prefetch")
    if unconverted is not None:
        ds_key, bucket = unconverted
        if _lookup(merged, "zero.prefetch")[0]:
            ignored.append(f"{ds_key} (the zshard config sets zero.prefetch)")
        else:
            # Needs the model, as merged (DeepSpeed's persistence threshold included).
            prefetch = prefetch_modules(int(bucket), _stage3_modules(merged))
            if prefetch is not None:
                _put(merged, "zero.prefetch", prefetch)
            else:
                ignored.append(_unconverted_note(ds_key, bucket))
    ignored += auto_notes(m.auto, merged, overrides)
    return merged, ignored


def load_with_deepspeed(
    config_path: str,
    overrides: Sequence[str] = (),
    ds_source: str | Mapping[str, Any] | None = None,
    world_size: int | None = None,
) -> tuple[ZshardConfig, list[str]]:
    """``load_config`` for a YAML that may name a DeepSpeed config (or with ``ds_source``):
    returns the validated ``ZshardConfig`` and the DeepSpeed settings not applied."""
    tree = read_yaml(config_path)
    base_dir = os.path.dirname(os.path.abspath(config_path))
    merged, ignored = apply_deepspeed(
        tree, ds_source, world_size, base_dir=base_dir, overrides=overrides
    )
    return load_config(merged, overrides), ignored


def warning_line(notes: Sequence[str]) -> str:
    """One line with every note about the DeepSpeed config (see :func:`apply_deepspeed`)."""
    n = len(notes)
    return f"zshard: warning: DeepSpeed config, {n} note{'s' if n != 1 else ''}: " + "; ".join(
        notes
    )
