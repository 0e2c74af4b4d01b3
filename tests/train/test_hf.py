"""The ``hf`` model provider: transformers models from a config, trained by the engine, loaded
from and consolidated to weights that ``from_pretrained`` accepts."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from zshard.errors import ConfigError

pytest.importorskip("transformers", reason="transformers is not installed (pip install zshard[hf])")

LLAMA = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}


def _batch(rank: int, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randint(0, 256, (2, 16), generator=g)
    return x, torch.roll(x, -1, dims=1)


def test_builds_from_a_mapping_or_a_path_and_returns_a_loss(tmp_path):
    from zshard.train.models import make_model

    model = make_model("hf", config=LLAMA, num_hidden_layers=1).model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 1
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x, y = _batch(0)
    loss = model(x, y)
    assert loss.dim() == 0 and 4.0 < float(loss.detach()) < 7.0  # about ln(256) at init
    model.config.save_pretrained(str(tmp_path / "cfg"))
    again = make_model("hf", config=str(tmp_path / "cfg")).model
    assert again.config.hidden_size == 32


def test_bad_config_and_missing_transformers(monkeypatch):
    from zshard.train.models import make_model

    with pytest.raises(ConfigError, match="model_type"):
        make_model("hf", config={"hidden_size": 3})
    with pytest.raises(ConfigError, match="no config file"):
        make_model("hf", config="/nonexistent/config.json")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match=r"pip install zshard\[hf\]"):
        make_model("hf", config=LLAMA)


def test_init_from_safetensors_without_the_engine(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from zshard.train.models import make_model

    torch.manual_seed(1)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA))
    ref.save_pretrained(str(tmp_path / "w"))  # model.safetensors without lm_head (tied)
    got = make_model("hf", config=LLAMA, init_from=str(tmp_path / "w")).model
    for (n, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(ConfigError, match="shape"):
        make_model("hf", config={**LLAMA, "hidden_size": 48}, init_from=str(tmp_path / "w"))


def _train_stage3(rank: int, world: int, cfg: dict, init_from: str, ckpt: str) -> list[float]:
    import zshard.train
    from zshard.train.models import make_model

    def factory() -> torch.nn.Module:
        return make_model("hf", config=LLAMA, init_from=init_from).model

    engine = zshard.train.initialize(None, cfg, model_factory=factory)
    losses = []
    for step in range(3):
        x, y = _batch(rank, step)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    engine.save(ckpt)
    engine.close()
    return losses


@pytest.mark.slow
def test_stage3_init_from_then_consolidate_loads_in_transformers(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.harness import run_ranks
    from zshard.convert.consolidate import consolidate

    hf_config = AutoConfig.for_model(**LLAMA)
    torch.manual_seed(2)
    ref = AutoModelForCausalLM.from_config(hf_config)
    ref.save_pretrained(str(tmp_path / "w"))
    cfg = {
        "zero": {"stage": 3, "param_persistence_threshold": 0},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "train": {"micro_batch_size": 2, "grad_accum": 1},
        "dist": {"backend": "gloo", "device": "cpu", "timeout_s": 60},
    }
    args = (cfg, str(tmp_path / "w"), str(tmp_path / "ckpt"))
    losses = run_ranks(_train_stage3, 2, args, timeout=150)
    # The first loss is the loaded model's loss on each rank's batch: init_from took effect.
    with torch.no_grad():
        for rank in range(2):
            x, y = _batch(rank, 0)
            logits = ref(input_ids=x).logits
            want = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
            assert losses[rank][0] == pytest.approx(float(want), rel=1e-5)
    out = str(tmp_path / "hf_out")
    consolidate(str(tmp_path / "ckpt"), out)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert "lm_head.weight" not in index["weight_map"]  # tied: written once, transformers re-ties
    # transformers 5 reads generation settings from config.json even when given config=.
    hf_config.save_pretrained(out)
    loaded = AutoModelForCausalLM.from_pretrained(out, config=hf_config)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    from safetensors.torch import load_file

    saved: dict[str, torch.Tensor] = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            saved.update(load_file(os.path.join(out, f)))
    state = loaded.state_dict()
    assert set(saved) | {"lm_head.weight"} == set(state)
    for name, t in saved.items():
        assert torch.equal(state[name], t), name
    assert not torch.equal(state["model.norm.weight"], ref.state_dict()["model.norm.weight"])
