"""Tests for the built-in GPT model and the model registry (pure tier, CPU, tiny sizes)."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from torch import nn

from zshard.errors import ConfigError, InvalidArgumentError
from zshard.train.models import MODELS, ModelAndData, make_model
from zshard.train.models.gpt import GPT, GPTConfig, build_model, num_params

TINY = GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=32)


def _batch(cfg: GPTConfig, b: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, cfg.seq_len + 1), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _seeded(cfg: GPTConfig, seed: int = 0, **kwargs: bool) -> GPT:
    torch.manual_seed(seed)
    return build_model(cfg, **kwargs)


def test_forward_shapes_and_loss_at_init() -> None:
    model = _seeded(GPTConfig(vocab_size=256, seq_len=32))  # default widths
    x, y = _batch(model.cfg)
    assert model(x).shape == (3, 32, 256)
    assert model(x[:, :5]).shape == (3, 5, 256)  # shorter than seq_len is fine
    loss = model(x, y)
    assert loss.shape == ()
    assert torch.isfinite(loss)
    # Small init keeps the logits near zero, so the loss starts near uniform guessing.
    assert abs(loss.item() - math.log(256)) < 0.1


def test_too_long_sequence_names_seq_len() -> None:
    model = _seeded(TINY)
    with pytest.raises(InvalidArgumentError, match="seq_len"):
        model(torch.zeros(1, TINY.seq_len + 1, dtype=torch.int64))


def test_tied_weights_share_storage_and_count_once() -> None:
    model = _seeded(TINY)
    assert model.lm_head.weight is model.tok_emb.weight
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    untied = _seeded(GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=32,
                               tie_embeddings=False))  # fmt: skip
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert num_params(untied) - num_params(model) == 256 * 32


def test_same_seed_same_params_and_different_seed_differs() -> None:
    a, b, c = _seeded(TINY, 0), _seeded(TINY, 0), _seeded(TINY, 1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.blocks[0].mlp.w1.weight, c.blocks[0].mlp.w1.weight)


def test_init_values() -> None:
    model = _seeded(GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=64))
    assert torch.equal(model.blocks[0].ln1.weight, torch.ones(64))
    assert torch.equal(model.blocks[1].attn.qkv.bias, torch.zeros(192))
    std = model.blocks[0].mlp.w1.weight.std().item()
    assert 0.018 < std < 0.022


def test_meta_build_then_materialise_matches_eager_build() -> None:
    with torch.device("meta"):
        meta = GPT(TINY)
    assert all(p.is_meta for p in meta.parameters())
    assert num_params(meta) == num_params(_seeded(TINY))
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    meta.init_weights()
    assert all(torch.isfinite(p).all() for p in meta.parameters())
    assert meta.lm_head.weight is meta.tok_emb.weight  # to_empty unties; init_weights re-ties
    eager = _seeded(TINY, 0)
    for (name, pm), pe in zip(meta.state_dict().items(), eager.state_dict().values(), strict=True):
        assert torch.equal(pm, pe), name


def test_activation_checkpointing_same_loss_and_grads() -> None:
    cfg = GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=32, dropout=0.1)
    x, y = _batch(cfg)
    results = []
    for ckpt in (False, True):
        model = _seeded(cfg, 0, activation_checkpointing=ckpt)
        model.train()
        calls: list[int] = []  # counts the first block's forward runs (hooks skip recompute)
        inner = model.blocks[0].forward
        model.blocks[0].forward = lambda h, f=inner, c=calls: c.append(1) or f(h)
        torch.manual_seed(123)  # same dropout masks in both runs
        loss = model(x, y)
        loss.backward()
        assert len(calls) == (2 if ckpt else 1)  # checkpointing re-runs the block in backward
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss0, loss1, rtol=0, atol=0)
    assert grads0.keys() == grads1.keys()
    for name, g in grads0.items():
        torch.testing.assert_close(g, grads1[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"d_model": 30, "n_head": 4}, "d_model"),
        ({"n_layer": 0}, "n_layer"),
        ({"seq_len": -1}, "seq_len"),
        ({"n_head": True}, "n_head"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_validation_names_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        GPTConfig(vocab_size=256, **kwargs)  # type: ignore[arg-type]


def test_make_model_builtin_and_errors() -> None:
    assert "gpt" in MODELS
    built = make_model("gpt", seq_len=16, n_layer=1, n_head=2, d_model=16)
    assert isinstance(built, ModelAndData)
    assert isinstance(built.model, GPT) and built.dataset is None
    assert built.model.cfg.vocab_size == 256
    with pytest.raises(ConfigError, match="gpt"):
        make_model("nope")
    with pytest.raises(ConfigError, match="n_layers"):
        make_model("gpt", n_layers=2)
    with pytest.raises(ConfigError, match="cannot import"):
        make_model("no_such_pkg_zshard.mod:fn")


def test_make_model_import_path(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = types.ModuleType("zshard_test_provider")
    data = [(torch.zeros(2), torch.zeros(2))]
    mod.model_only = lambda width=3: nn.Linear(width, 1)  # type: ignore[attr-defined]
    mod.with_data = lambda: (nn.Linear(2, 1), data)  # type: ignore[attr-defined]
    mod.bad = lambda: 42  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "zshard_test_provider", mod)
    model, dataset = make_model("zshard_test_provider:model_only", width=5)
    assert isinstance(model, nn.Linear) and model.in_features == 5 and dataset is None
    assert make_model("zshard_test_provider:with_data").dataset is data
    with pytest.raises(ConfigError, match="returned int"):
        make_model("zshard_test_provider:bad")
    with pytest.raises(ConfigError, match="no function"):
        make_model("zshard_test_provider:missing")
