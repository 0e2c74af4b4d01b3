"""Building a model on the ``meta`` device without running its initialisers.

Stage 3, the launcher's checks and the model statistics build models on ``meta``: shapes only, the
values come later (materialisation) or never. The model's own initialisation still runs there,
and several in-place initialisers (``normal_``, ``erfinv_``, ``clamp_``, ``exponential_``) have
their meta kernels written in Python, whose first use imports ``torch._dynamo``: ~1.7 s of CPU in
every process that builds on meta (the launcher, each worker) for values that do not exist.
:func:`on_meta` builds under ``torch.device("meta")`` and skips those value-only in-place
operations on meta tensors; shape-changing ones (``resize_``, ``squeeze_``...) still run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# In-place operations that change values only, as initialisers use them (torch.nn.init, Hugging
# Face ``_init_weights``): on a meta tensor they have nothing to change.
_VALUE_OPS = frozenset(
    {
        "normal_", "uniform_", "zero_", "fill_", "erfinv_", "mul_", "add_", "sub_", "div_",
        "clamp_", "clamp_min_", "clamp_max_", "exponential_", "bernoulli_", "random_",
        "log_normal_", "cauchy_", "geometric_", "copy_", "abs_", "neg_", "sqrt_", "fmod_",
        # torch.nn.init's own (they pass the tensor as the keyword ``tensor``)
        "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
        "trunc_normal_", "orthogonal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
        "sparse_",
    }
)  # fmt: skip


class _SkipMetaValues(TorchFunctionMode):
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _VALUE_OPS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """``with on_meta(): model = factory()`` builds on ``meta`` with initialisers skipped."""
    with torch.device("meta"), _SkipMetaValues():
        yield
