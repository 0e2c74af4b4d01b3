"""Model providers for ``zshard train``: the built-in GPT, or any ``package.module:function``.

A provider is a callable taking the config's keyword arguments and returning a model, or a
``(model, dataset)`` pair when the model comes with its own data. :func:`make_model` always hands
back a :class:`ModelAndData`, with ``dataset=None`` when the provider gave none.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn
from torch.utils.data import Dataset

from zshard.errors import ConfigError
from zshard.train.models._checkpointing import (
    ActivationCheckpointing,
    apply_activation_checkpointing,
)
from zshard.train.models._meta import on_meta
from zshard.train.models.gpt import GPT, GPTConfig, build_model, num_params

__all__ = [
    "GPT",
    "MODELS",
    "ActivationCheckpointing",
    "GPTConfig",
    "ModelAndData",
    "apply_activation_checkpointing",
    "build_model",
    "gpt",
    "hf",
    "make_model",
    "num_params",
    "on_meta",
]

BYTE_VOCAB_SIZE = 256  # the built-in CharDataset is byte-level


class ModelAndData(NamedTuple):
    """What a model provider produced; ``dataset`` is None when it brought no data."""

    model: nn.Module
    dataset: Dataset[Any] | None


def gpt(*, activation_checkpointing: Any = False, **kwargs: Any) -> GPT:
    """The built-in provider: ``GPTConfig(**kwargs)`` with ``vocab_size`` defaulting to 256.

    ``activation_checkpointing``: ``train.activation_checkpointing``; a mapping is applied by
    the engine (:func:`apply_activation_checkpointing`)."""
    kwargs.setdefault("vocab_size", BYTE_VOCAB_SIZE)
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ConfigError(
            f"unknown option(s) for model 'gpt': {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(fields | {'activation_checkpointing'}))}"
        )
    on = activation_checkpointing is True
    return build_model(GPTConfig(**kwargs), activation_checkpointing=on)


def hf(**kwargs: Any) -> nn.Module:
    """Hugging Face transformers causal LM from a config (``zshard.train.models.hf``)."""
    from zshard.train.models.hf import hf as build_hf

    return build_hf(**kwargs)


MODELS: dict[str, Callable[..., Any]] = {"gpt": gpt, "hf": hf}


def _import_provider(name: str) -> Callable[..., Any]:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model {name!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"model {name!r}: cannot import module {module_name!r} ({exc}); "
            "is it installed or on PYTHONPATH?"
        ) from exc
    provider = getattr(module, attr, None)
    if not callable(provider):
        raise ConfigError(f"model {name!r}: module {module_name!r} has no function {attr!r}")
    return provider


def make_model(name: str, **kwargs: Any) -> ModelAndData:
    """Build the model called ``name`` (a key of :data:`MODELS` or ``package.module:function``).

    Args:
        name: registry key, or an import path whose function is called with ``kwargs``.
        **kwargs: passed to the provider (for ``gpt``: the :class:`GPTConfig` fields).
    """
    if name in MODELS:
        provider = MODELS[name]
    elif ":" in name:
        provider = _import_provider(name)
    else:
        raise ConfigError(
            f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))} "
            "or give 'package.module:function'"
        )
    result = provider(**kwargs)
    if isinstance(result, nn.Module):
        return ModelAndData(result, None)
    if (
        isinstance(result, tuple)
        and len(result) == 2
        and isinstance(result[0], nn.Module)
        # Anything a DataLoader accepts: map-style (indexable) or iterable.
        and (
            result[1] is None or hasattr(result[1], "__getitem__") or hasattr(result[1], "__iter__")
        )
    ):
        return ModelAndData(result[0], result[1])
    raise ConfigError(
        f"model {name!r} returned {type(result).__name__}; a provider must return an "
        "nn.Module or a (model, dataset) pair"
    )
