"""What planning needs to know about a model's parameters, counted on the ``meta`` device.

``zshard estimate``, the offload preflight and the DeepSpeed mapping (its
``stage3_prefetch_bucket_size`` in modules) ask the same question before anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from zshard.errors import InvalidArgumentError
from zshard.train.models import make_model, on_meta

# Only Ψ known: a transformer-like model with Ψ ≈ 12·L·d² and d ≈ 128·L (GPT-3's aspect ratio)
# gives L ≈ (Ψ / 196608)^(1/3) layers; the largest gathered module is taken to be one layer.
_PARAMS_PER_CUBED_LAYER = 12 * 128 * 128


@dataclass(frozen=True, kw_only=True)
class ModelStats:
    """A model's parameters as element counts."""

    params: int  # Ψ: unique parameters (tied ones once)
    trainable: int  # those with requires_grad: only they have gradients and optimizer state
    largest_module: int  # parameters owned by the largest module (one stage-3 flat group)
    persistent: int = 0  # in modules below zero.param_persistence_threshold (whole at stage 3)
    gathered_modules: tuple[int, ...] = ()  # sizes of the modules stage 3 gathers
    counted: bool = False  # counted from a built model (True) or assumed from Ψ alone

    @classmethod
    def assumed(cls, params: int, layers: int | None = None) -> ModelStats:
        """A transformer-like model of ``params`` parameters: the largest module ~ Ψ / layers."""
        if layers is None:
            layers = max(1, round((params / _PARAMS_PER_CUBED_LAYER) ** (1 / 3)))
        return cls(params=params, trainable=params, largest_module=math.ceil(params / layers))


def model_stats(name: str, kwargs: Mapping[str, Any], persistence_threshold: int) -> ModelStats:
    """Count the parameters of model ``name`` built with ``kwargs`` on ``meta`` (no memory used).

    Args:
        name: a model provider, as ``make_model`` takes it.
        kwargs: the provider's keyword arguments (``ZshardConfig.model_kwargs()``).
        persistence_threshold: modules with fewer parameters stay whole at stage 3.
    """
    with on_meta():
        model = make_model(name, **kwargs).model
    seen: set[int] = set()
    sizes: list[int] = []
    trainable = 0
    for module in model.modules():
        own = 0
        for p in module._parameters.values():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            own += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        if own:
            sizes.append(own)
    if not sizes:
        raise InvalidArgumentError(f"model {name!r} has no parameters")
    gathered = tuple(s for s in sizes if s >= persistence_threshold)
    return ModelStats(
        params=sum(sizes),
        trainable=trainable,
        largest_module=max(sizes),
        persistent=sum(s for s in sizes if s < persistence_threshold),
        gathered_modules=gathered or (0,),  # all persistent: nothing is gathered
        counted=True,
    )
