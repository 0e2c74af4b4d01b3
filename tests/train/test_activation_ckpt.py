"""Activation checkpointing for any model: the built-in GPT, a Hugging Face model through its own
mechanism (non-reentrant), a custom model by naming its block classes; DeepSpeed's
``activation_checkpointing`` section. Recomputation changes memory, never the result."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import zshard.train as zt
from zshard.errors import ConfigError
from zshard.train.config import from_deepspeed, load_config
from zshard.train.models import (
    GPT,
    ActivationCheckpointing,
    GPTConfig,
    apply_activation_checkpointing,
)

try:
    from tests.train import _engine_cases as cases
except ModuleNotFoundError:  # tests/train is not a package: pytest put it on sys.path
    import _engine_cases as cases  # type: ignore[no-redef]


def saved_bytes(model: nn.Module, *args: Any) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for backward during one forward (the activation memory)."""
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(*args)
    return total[0], loss


def grads(model: nn.Module, *args: Any) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(*args).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def same_grads(a: nn.Module, b: nn.Module, *args: Any) -> None:
    ga, gb = grads(a, *args), grads(b, *args)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert torch.allclose(ga[n], gb[n], rtol=1e-5, atol=1e-7), n


def test_parse() -> None:
    assert ActivationCheckpointing.parse(False) is None
    assert ActivationCheckpointing.parse({"enabled": False, "blocks": ["X"]}) is None
    spec = ActivationCheckpointing.parse({"blocks": "Block", "number_checkpoints": 2})
    assert spec == ActivationCheckpointing(("Block",), 2, False)
    for bad, msg in (
        ({"blocks": [1]}, "blocks: expected a list of class names"),
        ({"layers": ["X"]}, "layers: unknown key"),
        ({"number_checkpoints": -1}, "number_checkpoints: expected a whole number"),
        ("yes", "expected bool | dict"),
    ):
        with pytest.raises(ConfigError, match=msg):
            load_config({"train": {"activation_checkpointing": bad}})


def test_gpt_blocks_and_the_first_n() -> None:
    cfg = GPTConfig(vocab_size=64, seq_len=16, n_layer=3, n_head=2, d_model=32)
    torch.manual_seed(0)
    plain = GPT(cfg)
    x = torch.randint(0, 64, (4, 16))
    y = torch.roll(x, -1, 1)
    full = copy.deepcopy(plain)
    assert apply_activation_checkpointing(full, True) == ["blocks.0", "blocks.1", "blocks.2"]
    assert full.activation_checkpointing is True
    first = copy.deepcopy(plain)
    names = apply_activation_checkpointing(first, {"number_checkpoints": 2})
    assert names == ["blocks.0", "blocks.1"] and first.activation_checkpointing is False
    base, _ = saved_bytes(plain, x, y)
    some, _ = saved_bytes(first, x, y)
    most, _ = saved_bytes(full, x, y)
    assert most < some < base
    same_grads(plain, full, x, y)
    same_grads(plain, first, x, y)


def test_custom_model_by_block_class() -> None:
    plain = cases.make_model()
    model = cases.make_model()
    x, y = cases.global_batch(0)
    assert apply_activation_checkpointing(model, {"blocks": ["Block"]}) == ["block"]
    calls = [0]
    inner = model.block.up.forward

    def counting(*a: Any) -> Any:
        calls[0] += 1
        return inner(*a)

    model.block.up.forward = counting  # type: ignore[method-assign]
    same_grads(plain, model, x, y)
    assert calls[0] == 2  # forward, then the recompute in backward
    # Qualified names work too; applying twice does not nest.
    again = cases.make_model()
    apply_activation_checkpointing(again, {"blocks": [f"{cases.Block.__module__}.Block"]})
    apply_activation_checkpointing(again, {"blocks": ["Block"]})
    same_grads(plain, again, x, y)
    with torch.no_grad():  # no recompute without gradients
        assert torch.equal(model(x, y), plain(x, y))


def test_custom_model_errors_name_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"name the block classes to recompute"):
        apply_activation_checkpointing(cases.make_model(), True)
    with pytest.raises(
        ConfigError, match=r"no module of class Nope in TinyNet; its classes: .*Block"
    ):
        apply_activation_checkpointing(cases.make_model(), {"blocks": ["Nope"]})


def test_hf_model_uses_its_own_mechanism() -> None:
    pytest.importorskip("transformers")
    from zshard.train.models import make_model

    llama = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
    }
    torch.manual_seed(0)
    plain = make_model("hf", config=llama).model
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    full = copy.deepcopy(plain)
    names = apply_activation_checkpointing(full, True)
    assert names == ["model.layers.0", "model.layers.1", "model.layers.2"]
    some = copy.deepcopy(plain)
    spec = {"number_checkpoints": 1, "cpu_checkpointing": True}
    assert apply_activation_checkpointing(some, spec) == ["model.layers.0"]
    layers = some.model.layers
    assert [bool(m.gradient_checkpointing) for m in layers] == [True, False, False]
    plain.train(), full.train(), some.train()
    base, _ = saved_bytes(plain, x, y)
    one, _ = saved_bytes(some, x, y)
    most, _ = saved_bytes(full, x, y)
    assert most < one < base
    same_grads(plain, full, x, y)
    same_grads(plain, some, x, y)


def test_engine_stage3_with_checkpointed_custom_blocks() -> None:
    """ZeRO-3 gathers inside the recompute: the same weights as without checkpointing."""
    plain = zt.initialize(cases.make_model(), cases.config(3))
    ckpt = zt.initialize(
        cases.make_model(),
        cases.config(
            3, train={**cases.config(3)["train"], "activation_checkpointing": {"blocks": ["Block"]}}
        ),
    )
    cases.train(plain, range(3))
    cases.train(ckpt, range(3))
    assert cases.rel_err(cases.full_params(ckpt), cases.full_params(plain)) < 1e-6
    plain.close()
    ckpt.close()


def test_deepspeed_section_turns_it_on_for_the_gpt() -> None:
    ds = {"activation_checkpointing": {"number_checkpoints": 1, "cpu_checkpointing": False}}
    tree, _ = from_deepspeed(ds)
    tree["model"] = {"name": "gpt", "args": {"n_layer": 2, "n_head": 2, "d_model": 32}}
    tree["data"] = {"seq_len": 16}
    cfg = load_config(tree)
    from zshard.train.models import make_model

    model = make_model(cfg.model.name, **cfg.model_kwargs()).model
    assert model.activation_checkpointing is False  # a mapping: applied by the engine
    engine = zt.initialize(
        model, {**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "micro_batch_size": 2}}
    )
    assert engine.module.blocks[0].forward.func.__name__ == "_checkpointed"  # type: ignore[union-attr]
    assert not hasattr(engine.module.blocks[1].forward, "func")
    engine.close()
