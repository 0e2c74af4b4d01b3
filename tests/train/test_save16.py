"""16-bit weights at save: ``checkpoint.save_16bit`` writes an HF-loadable safetensors directory
next to each committed checkpoint (after the commit, all or nothing), and
``Engine.save_16bit_model(dir)`` streams the live partitions, one module at a time at stage 3."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import zshard.train as zt
from tests.harness import run_ranks
from zshard.errors import OutputExistsError, ZshardError
from zshard.store.manifest import MANIFEST_KEY
from zshard.train.engine import _export

try:
    from tests.train import _engine_cases as cases
except ModuleNotFoundError:  # tests/train is not a package: pytest put it on sys.path
    import _engine_cases as cases  # type: ignore[no-redef]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _module_state(engine: zt.Engine) -> dict[str, torch.Tensor]:
    """The engine's weights (canonical names, tied ones once) and persistent buffers."""
    with engine.gathered_parameters():
        out = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    out.update({n: b.detach().clone() for n, b in _export._persistent_buffers(engine.module)})
    return out


def _train(stage: int, precision: str, steps: int = 2, **over: Any) -> zt.Engine:
    cfg = cases.config(stage, precision=precision, **over)
    engine = zt.initialize(cases.make_model(), cfg)
    cases.train(engine, range(steps))
    return engine


@pytest.mark.parametrize(("stage", "precision"), [(1, "bf16"), (3, "fp16"), (2, "fp32")])
def test_each_checkpoint_gets_its_16bit_weights(tmp_path: Path, stage: int, precision: str) -> None:
    root = tmp_path / "ckpt"
    engine = _train(stage, precision, checkpoint={"dir": str(root), "save_16bit": True})
    url = engine.save()
    out = Path(url) / _export.EXPORT_DIR
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    got = load_file(out / "model.safetensors")
    want = _module_state(engine)
    assert set(got) == set(want)  # the tied head.weight once, under emb.weight
    for name, t in want.items():
        assert got[name].dtype == (DTYPES[precision] if t.is_floating_point() else t.dtype)
        assert torch.equal(got[name], t.to(got[name].dtype)), name
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["zshard.ties"]) == {"head.weight": "emb.weight"}
    engine.close()


def test_export_runs_after_the_commit_and_never_leaves_a_partial_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ckpt"
    engine = _train(1, "bf16", checkpoint={"dir": str(root), "save_16bit": True})
    seen: dict[str, bool] = {}
    real_write = _export.write_safetensors

    def failing_write(storage: Any, key: str, *args: Any) -> None:
        step_dir = Path(storage.root).parent
        seen["committed_first"] = (step_dir / MANIFEST_KEY).exists()
        real_write(storage, key, *args)  # the whole file, then a failure before the rename
        raise OSError("disk full")

    monkeypatch.setattr(_export, "write_safetensors", failing_write)
    with pytest.raises(ZshardError, match="is committed, but writing its 16-bit weights"):
        engine.save()
    step_dir = root / "step-00000002"
    assert seen == {"committed_first": True}
    assert (step_dir / MANIFEST_KEY).exists()  # the checkpoint itself is intact
    assert [n for n in os.listdir(step_dir) if "hf16" in n] == []  # no partial export
    monkeypatch.undo()
    cases.train(engine, range(2, 3))
    engine.save()
    assert (root / "step-00000003" / "hf16" / "model.safetensors").exists()
    engine.close()


def test_retention_removes_the_export_with_its_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    ck = {"dir": str(root), "save_16bit": True, "keep_last": 1}
    engine = _train(2, "bf16", steps=1, checkpoint=ck)
    engine.save()
    cases.train(engine, range(1, 2))
    engine.save()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step-")) == ["step-00000002"]
    assert (root / "step-00000002" / "hf16" / "model.safetensors").exists()
    engine.close()


def test_save_16bit_model_streams_one_module_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _train(3, "bf16", zero={"stage": 3, "param_persistence_threshold": 0})
    s3 = engine._stage3
    assert s3 is not None
    most = [0]
    real_gather = s3.gather

    def spy(g: Any) -> None:
        real_gather(g)
        most[0] = max(most[0], sum(x.flat is not None for x in engine.groups))

    monkeypatch.setattr(s3, "gather", spy)
    out = tmp_path / "hf"
    assert engine.save_16bit_model(str(out), max_shard_size="600B") == str(out)
    assert most[0] == 1  # never more than one module's parameters gathered
    assert all(g.flat is None for g in engine.groups)  # and all released again
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and len(files) > 2  # sharded past 600 B
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got: dict[str, torch.Tensor] = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(out / f))
    monkeypatch.undo()
    want = _module_state(engine)
    assert set(got) == set(want)
    assert all(torch.equal(got[n], want[n]) for n in want)
    with pytest.raises(OutputExistsError, match="already exists"):
        engine.save_16bit_model(str(out))
    engine.save_16bit_model(str(out), overwrite=True)
    engine.close()


def test_an_hf_model_loads_with_from_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from zshard.train.models import make_model

    llama = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32,
        "tie_word_embeddings": True,
    }
    root = tmp_path / "ckpt"
    cfg = {
        "model": {"name": "hf", "args": {"config": llama}},
        "precision": "bf16",
        "zero": {"stage": 3, "param_persistence_threshold": 0},
        "train": {"micro_batch_size": 2, "grad_accum": 1},
        "checkpoint": {"dir": str(root), "save_16bit": True},
    }
    engine = zt.initialize(None, cfg, model_factory=lambda: make_model("hf", config=llama).model)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    engine.backward(engine(x, torch.roll(x, -1, 1)))
    engine.step()
    url = engine.save()
    live = tmp_path / "live"
    engine.save_16bit_model(str(live))
    want = _module_state(engine)
    engine.close()
    for out in (Path(url) / "hf16", live):
        assert (out / "config.json").exists()
        model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
        sd = model.state_dict()
        assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
        for name, t in want.items():
            assert torch.equal(sd[name], t), name


# -- across ranks (slow) --------------------------------------------------------------------------


def check_save16(rank: int, world_size: int, root: str) -> dict[str, Any]:
    ck = {"dir": root, "save_16bit": True}
    engine = _train(3, "bf16", checkpoint=ck, zero={"stage": 3, "param_persistence_threshold": 0})
    url = engine.save()
    written = engine.save_16bit_model(os.path.join(root, "live"))
    want = {n: t.float().tolist() for n, t in _module_state(engine).items()}
    engine.close()
    return {"url": url, "written": written, "want": want}


@pytest.mark.slow
def test_save16_at_world_size_2(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    results = run_ranks(check_save16, 2, (root,), timeout=180)
    assert results[0]["written"] is not None and results[1]["written"] is None  # rank 0 writes
    want = results[0]["want"]
    for out in (Path(results[0]["url"]) / "hf16", Path(root) / "live"):
        got = load_file(out / "model.safetensors")
        assert {n: t.float().tolist() for n, t in got.items()} == want
