"""Loading a config: a YAML file, a tree or a config, with dotted ``--set`` overrides applied."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from zshard.errors import ConfigError
from zshard.train.config._schema import ZshardConfig
from zshard.train.config._section import _build, _to_plain


def read_yaml(path: str) -> dict[str, Any]:
    """A zshard YAML config file as a tree (an empty file is the empty tree)."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path!r}: expected a mapping at the top level")
    return loaded


def _set_dotted(tree: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected 'dotted.key=value'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {e}") from None
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and part in ("precision", "offload_optimizer", "offload_param"):
            child = {"dtype" if part == "precision" else "device": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | ZshardConfig | None = None,
    overrides: Sequence[str] = (),
) -> ZshardConfig:
    """Build a validated :class:`ZshardConfig`.

    Args:
        source: a YAML file path, a nested dict, a config, or None for the defaults.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML scalars
            (``zero.stage=3``, ``optimizer.betas=[0.9,0.95]``, ``checkpoint.dir=s3://b/run``).
    """
    if source is None:
        tree: dict[str, Any] = {}
    elif isinstance(source, ZshardConfig):
        tree = source.to_dict()
    elif isinstance(source, Mapping):
        tree = _to_plain(dict(source))
    else:
        tree = read_yaml(os.fspath(source))
    for override in overrides:
        _set_dotted(tree, override)
    cfg: ZshardConfig = _build(ZshardConfig, tree, "")
    return cfg
