"""Activation checkpointing for any model: recompute blocks in backward instead of keeping their
activations.

``train.activation_checkpointing`` is ``true`` or a mapping::

    activation_checkpointing: {blocks: [MyBlock], number_checkpoints: 8, cpu_checkpointing: true}

- The built-in GPT checkpoints its transformer blocks.
- A Hugging Face model (``gradient_checkpointing_enable`` / ``activation_checkpointing_enable``)
  uses its own mechanism, non-reentrant.
- Any other model names its block classes (``type(m).__name__``, or ``module.QualName``); each
  module of those classes runs its forward under ``torch.utils.checkpoint.checkpoint`` with
  ``use_reentrant=False`` (it works with ZeRO-3's parameter hooks and restores the RNG state, so
  dropout masks match between forward and recompute).

``number_checkpoints`` checkpoints only the first N blocks in module order (DeepSpeed's count of
checkpoints; the rest keep their activations). ``cpu_checkpointing`` keeps each checkpointed
block's input in host memory until backward (DeepSpeed's name): on a CPU-only run it changes
nothing. Naming ``blocks`` for a GPT or HF model uses the generic mechanism with those classes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from zshard.errors import ConfigError

_KEY = "train.activation_checkpointing"
_FIELDS = ("enabled", "blocks", "number_checkpoints", "cpu_checkpointing")
_MARK = "_zshard_checkpointed_forward"


@dataclass(frozen=True)
class ActivationCheckpointing:
    """A parsed ``train.activation_checkpointing``."""

    blocks: tuple[str, ...] = ()
    number_checkpoints: int | None = None
    cpu_checkpointing: bool = False

    @classmethod
    def parse(cls, value: Any) -> ActivationCheckpointing | None:
        """None when off; raises ConfigError naming the key for a bad value."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_KEY}: expected true, false or a mapping, got {value!r}")
        unknown = sorted(set(value) - set(_FIELDS))
        if unknown:
            raise ConfigError(
                f"{_KEY}.{unknown[0]}: unknown key; expected one of {', '.join(_FIELDS)}"
            )
        enabled = value.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{_KEY}.enabled: expected true or false, got {enabled!r}")
        blocks = value.get("blocks", ())
        if isinstance(blocks, str):
            blocks = (blocks,)
        if not isinstance(blocks, (list, tuple)) or not all(
            isinstance(b, str) and b for b in blocks
        ):
            raise ConfigError(f"{_KEY}.blocks: expected a list of class names, got {blocks!r}")
        number = value.get("number_checkpoints")
        if number is not None and (
            isinstance(number, bool) or not isinstance(number, int) or number < 0
        ):
            raise ConfigError(
                f"{_KEY}.number_checkpoints: expected a whole number >= 0, got {number!r}"
            )
        cpu = value.get("cpu_checkpointing", False)
        if not isinstance(cpu, bool):
            raise ConfigError(f"{_KEY}.cpu_checkpointing: expected true or false, got {cpu!r}")
        if not enabled:
            return None
        return cls(tuple(blocks), number, cpu)


def apply_activation_checkpointing(model: nn.Module, value: Any) -> list[str]:
    """Turn on activation checkpointing in ``model`` as ``value`` (the config's
    ``train.activation_checkpointing``) says; returns the names of the checkpointed modules
    (``["<hf layers>"]`` summarised for an HF model). Raises ConfigError when it cannot."""
    spec = ActivationCheckpointing.parse(value)
    if spec is None:
        return []
    if not spec.blocks:
        if hasattr(model, "activation_checkpointing") and hasattr(model, "blocks"):
            return _gpt(model, spec)
        if hasattr(model, "gradient_checkpointing_enable"):
            return _hf(model, spec)
        raise ConfigError(
            f"{_KEY}: {type(model).__name__} is neither the built-in GPT nor a Hugging Face model; "
            "name the block classes to recompute: activation_checkpointing: {blocks: [MyBlock]}"
        )
    return _generic(model, spec)


def _gpt(model: Any, spec: ActivationCheckpointing) -> list[str]:
    if spec.number_checkpoints is None and not spec.cpu_checkpointing:
        model.activation_checkpointing = True  # the GPT's own loop over its blocks
        return [f"blocks.{i}" for i in range(len(model.blocks))]
    model.activation_checkpointing = False
    blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    return _wrap(blocks, spec)


def _hf(model: Any, spec: ActivationCheckpointing) -> list[str]:
    kwargs = {"use_reentrant": False}
    try:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except ValueError as e:  # "does not support gradient checkpointing"
        raise ConfigError(
            f"{_KEY}: {e}; name the block classes instead: {{blocks: [...]}}"
        ) from None
    flagged = [
        (n, m) for n, m in model.named_modules() if getattr(m, "gradient_checkpointing", False)
    ]
    # The repeated layers (transformers >= 4.48: GradientCheckpointingLayer), not the models
    # around them, which older versions flag to checkpoint every layer from their own loop.
    layers = [(n, m) for n, m in flagged if not hasattr(m, "supports_gradient_checkpointing")]
    names = [n for n, _ in layers] or ["<every layer>"]
    if spec.number_checkpoints is not None:
        if not layers:
            raise ConfigError(
                f"{_KEY}.number_checkpoints: this transformers version checkpoints every layer "
                "of the model at once; name the layer class instead: {blocks: [LlamaDecoderLayer]}"
            )
        for _, m in layers[spec.number_checkpoints :]:
            m.gradient_checkpointing = False
        names = names[: spec.number_checkpoints]
    if spec.cpu_checkpointing:
        fn = functools.partial(_host_checkpoint, **kwargs)
        for _, m in flagged:
            m._gradient_checkpointing_func = fn
    return names


def _generic(model: nn.Module, spec: ActivationCheckpointing) -> list[str]:
    wanted = set(spec.blocks)
    found = [
        (n, m)
        for n, m in model.named_modules()
        if type(m).__name__ in wanted or f"{type(m).__module__}.{type(m).__qualname__}" in wanted
    ]
    # A block inside another checkpointed block is recomputed with it: wrap the outer one only.
    outer = [(n, m) for n, m in found if not any(n.startswith(f"{o}.") for o, _ in found if o != n)]
    if not outer:
        classes = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(
            f"{_KEY}.blocks: no module of class {', '.join(spec.blocks)} in "
            f"{type(model).__name__}; its classes: {', '.join(classes)}"
        )
    if hasattr(model, "activation_checkpointing"):
        setattr(model, "activation_checkpointing", False)  # noqa: B010 (the built-in GPT)
    return _wrap(outer, spec)


def _wrap(blocks: list[tuple[str, nn.Module]], spec: ActivationCheckpointing) -> list[str]:
    if spec.number_checkpoints is not None:
        blocks = blocks[: spec.number_checkpoints]
    for _, module in blocks:
        inner = getattr(module, _MARK, None) or module.forward
        module.forward = functools.partial(_checkpointed, module, inner, spec.cpu_checkpointing)
        setattr(module, _MARK, inner)
    return [n for n, _ in blocks]


def _checkpointed(module: nn.Module, forward: Any, to_host: bool, *args: Any, **kwargs: Any) -> Any:
    """``module``'s forward under non-reentrant checkpointing while training with gradients.

    The module's hooks (ZeRO-3 gathers) stay outside: in backward the module's output hook has
    already gathered its own parameters when the recompute runs."""
    if not (module.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    if to_host:
        return _host_checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _host_checkpoint(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Checkpoint ``function`` keeping its tensor inputs in host memory until the recompute:
    the only activations a checkpointed block saves are its inputs."""
    device_inputs = [
        i
        for i, a in enumerate(args)
        if isinstance(a, torch.Tensor) and a.device.type != "cpu" and a.is_floating_point()
    ]
    if not device_inputs:
        return checkpoint(function, *args, **kwargs)
    devices = {i: args[i].device for i in device_inputs}
    hosted = [a.to("cpu") if i in devices else a for i, a in enumerate(args)]

    def run(*host_args: Any, **kw: Any) -> Any:
        moved = [a.to(devices[i]) if i in devices else a for i, a in enumerate(host_args)]
        return function(*moved, **kw)

    return checkpoint(run, *hosted, **kwargs)
