"""Hugging Face ``transformers`` causal LMs for ``zshard train``, built from a config: no download.

    model:
      name: hf
      args:
        config: {model_type: llama, vocab_size: 256, hidden_size: 64, ...}   # or a path
        init_from: weights/            # optional: .safetensors, HF directory, DeepSpeed or DCP
        num_hidden_layers: 2           # optional overrides of config fields

``config`` is a mapping with ``model_type`` (``AutoConfig.for_model``) or a local ``config.json``
/ directory holding one (read with ``local_files_only``). The model is
``AutoModelForCausalLM.from_config``; its ``forward(x, y)`` returns the mean cross-entropy of the
logits against ``y`` (zshard's data is already shifted), so the training loop needs no change.
Parameter names stay the model's own FQNs, so consolidated checkpoints load with
``from_pretrained(dir, config=...)`` (a tied ``lm_head.weight`` is written once, under the
embedding's name, which transformers re-ties).

``init_from`` is read through zshard's import sources, one tensor at a time, by parameter name
(fp32 ``master`` preferred over ``param``). At ZeRO stage 3 the engine builds the model on the
``meta`` device and materialises one module at a time, calling the model's ``init_weights()``:
this provider installs one that initialises (HF's ``_init_weights``) and loads only the modules
that just got storage, so no rank ever holds the whole model.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zshard.errors import ConfigError

INSTALL_HINT = "model 'hf' needs Hugging Face transformers: pip install zshard[hf]"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return transformers


def build_config(config: Any, overrides: Mapping[str, Any]) -> Any:
    """A ``PretrainedConfig`` from a mapping with ``model_type`` or a local path."""
    tf = _transformers()
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"model.args.config: no config file at {config!r}")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except ValueError as e:
            raise ConfigError(f"model.args.config: {path} is not valid JSON ({e})") from None
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"model.args.config: expected a mapping with model_type or a path, got {config!r}"
        )
    fields = {**config, **overrides}
    model_type = fields.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ConfigError("model.args.config: needs 'model_type' (e.g. llama, gpt2, qwen2)")
    for key in ("architectures", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    try:
        return tf.AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.args.config: transformers rejects it ({e})") from None


def hf(
    *,
    config: Any,
    init_from: str | None = None,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> nn.Module:
    """The ``hf`` provider: ``AutoModelForCausalLM.from_config`` (see module doc)."""
    tf = _transformers()
    cfg = build_config(config, overrides)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False  # training: no KV cache
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = tf.AutoModelForCausalLM.from_config(cfg, **kwargs)
    except ValueError as e:
        raise ConfigError(f"model 'hf': no causal LM for this config ({e})") from None
    model.forward = types.MethodType(_lm_forward, model)
    init = _Init(model, init_from)
    model.init_weights = init  # called by the engine as it materialises a meta model
    if not any(p.is_meta for p in model.parameters()):
        init.load_all()  # built for real (stages 0-2): transformers initialised it already
    return model


def _lm_forward(self: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, **kw: Any) -> Any:
    """``model(x, y)`` -> mean cross-entropy of next-token logits against ``y``; without ``y``
    the model's usual output."""
    out = type(self).forward(self, input_ids=x, **kw)
    if y is None:
        return out
    logits = out.logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


class _Init:
    """Initialise (and load ``init_from`` into) modules as they get storage."""

    def __init__(self, model: nn.Module, init_from: str | None) -> None:
        self.model = model
        self.init_from = init_from
        self._source: Any = None
        self._by_name: dict[str, Any] = {}
        self._seen: set[int] = set()  # ids of tensors already initialised

    def source(self) -> Any:
        if self._source is None and self.init_from:
            from zshard.convert.sources import open_source

            self._source = open_source(self.init_from)
            for t in self._source.tensors:
                if t.kind in ("param", "master", "buffer"):
                    cur = self._by_name.get(t.name)
                    if cur is None or t.kind == "master":
                        self._by_name[t.name] = t
        return self._source

    def __call__(self) -> None:
        """Initialise every module whose own tensors all have storage and are new."""
        canonical = self._canonical_names()
        with torch.no_grad():
            for path, module in self.model.named_modules():
                own = [t for t in _own_tensors(module) if t is not None]
                if not own or any(t.is_meta or id(t) in self._seen for t in own):
                    continue
                self.model._init_weights(module)  # type: ignore[operator]
                self._load(path, module, canonical)
                self._seen.update(id(t) for t in own)

    def load_all(self) -> None:
        canonical = self._canonical_names()
        with torch.no_grad():
            for path, module in self.model.named_modules():
                self._load(path, module, canonical)
                self._seen.update(id(t) for t in _own_tensors(module) if t is not None)

    def _canonical_names(self) -> dict[int, str]:
        names: dict[int, str] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), name)
        return names

    def _load(self, path: str, module: nn.Module, canonical: dict[int, str]) -> None:
        source = self.source()
        if source is None:
            return
        from zshard.store.reader import to_torch

        prefix = f"{path}." if path else ""
        persistent = [
            (a, b)
            for a, b in module._buffers.items()
            if b is not None and a not in module._non_persistent_buffers_set
        ]
        for attr, t in [*module._parameters.items(), *persistent]:
            if t is None:
                continue
            name = prefix + attr
            entry = self._lookup(name, canonical.get(id(t)))
            if entry is None:
                if attr in module._parameters:
                    raise ConfigError(
                        f"model.args.init_from: {self.init_from} has no tensor {name!r}; it does "
                        "not hold this model's weights"
                    )
                continue  # a buffer the file does not carry keeps its initial value
            if tuple(entry.shape) != tuple(t.shape):
                raise ConfigError(
                    f"model.args.init_from: {name!r} has shape {list(entry.shape)} in "
                    f"{self.init_from}, but the model's is {list(t.shape)}"
                )
            data = to_torch(source.read(entry, 0, entry.numel), entry.dtype)
            t.copy_(data.reshape(t.shape))

    def _lookup(self, name: str, canonical: str | None) -> Any:
        ties = self._source.ties if self._source is not None else {}
        for n in (name, ties.get(name), canonical, ties.get(canonical or "")):
            if n and n in self._by_name:
                return self._by_name[n]
        return None


def _own_tensors(module: nn.Module) -> list[torch.Tensor | None]:
    return [*module._parameters.values(), *module._buffers.values()]
