"""The run's configuration as ``zshard train`` resolves it: the YAML, a DeepSpeed config it names
(or ``--deepspeed-config``) merged under it, then ``--set``; values that need the model
(``stage3_prefetch_bucket_size`` in modules) are resolved by counting it on ``meta``.

Precedence, lowest first: zshard defaults < the DeepSpeed config < keys set in the YAML <
``--set``. Every DeepSpeed value the YAML overrides is reported, in one warning line.
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
from zshard.train.config._deepspeed import _BATCH_KEYS, _map, _put, _show, prefetch_modules
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
    node: Any = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, str) and parts[i - 1] == "precision" and i == len(parts) - 1:
            return (True, node) if part == "dtype" else (False, None)
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
) -> tuple[dict[str, Any], list[str]]:
    """Merge a DeepSpeed config into a zshard config tree (see the module docstring for the
    precedence). ``ds_source`` (a path or mapping; the ``--deepspeed-config`` flag) replaces the
    tree's ``deepspeed:`` key, whose relative paths resolve against ``base_dir`` (the YAML's
    directory). Returns the merged tree, without ``deepspeed``, for ``load_config``, and the
    DeepSpeed settings not applied (unsupported, or overridden by the zshard config)."""
    merged = copy.deepcopy(dict(tree))
    inline = merged.pop("deepspeed", None)
    if ds_source is None:
        if inline is None:
            return merged, []
        ds, where = load_deepspeed(inline, base_dir)
    else:
        ds, where = load_deepspeed(ds_source)
    m = _map(ds, world_size, None, where)
    ignored = list(m.ignored)
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
            ignored.append(
                f"{m.origin[dotted]} (the zshard config sets {dotted}: {_show(current)})"
            )
    zero = ds.get("zero_optimization")
    bucket = zero.get("stage3_prefetch_bucket_size") if isinstance(zero, Mapping) else None
    if (
        isinstance(bucket, (int, float))
        and not isinstance(bucket, bool)
        and bucket > 0
        and not _lookup(merged, "zero.prefetch")[0]
    ):
        # Needs the model, as merged (DeepSpeed's persistence threshold included).
        prefetch = prefetch_modules(int(bucket), _stage3_modules(merged))
        if prefetch is not None:
            _put(merged, "zero.prefetch", prefetch)
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
    merged, ignored = apply_deepspeed(tree, ds_source, world_size, base_dir=base_dir)
    return load_config(merged, overrides), ignored


def warning_line(ignored: Sequence[str]) -> str:
    """One line naming every DeepSpeed setting that was not applied."""
    n = len(ignored)
    return (
        f"zshard: warning: {n} DeepSpeed setting{'s' if n != 1 else ''} not applied: "
        + "; ".join(ignored)
    )
