"""torch.distributed.checkpoint directories in, against torch itself: a real FSDP2 run on CPU
(gloo, 2 ranks) saves model + optimizer state with ``dcp.save``; zshard's consolidation must
equal ``dcp_to_torch_save`` bitwise, and its import must keep every state kind."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from tests.conftest import snapshot
from zshard.convert.consolidate import consolidate
from zshard.convert.dcp import _runs
from zshard.convert.importer import import_checkpoint
from zshard.convert.sources import UnsafePickleError, detect, open_source
from zshard.errors import ZshardError
from zshard.store.reader import CheckpointReader


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.convert._make_dcp import make
    from tests.convert._make_deepspeed import Job

    out = str(tmp_path_factory.mktemp("dcp") / "ckpt")
    os.makedirs(out)
    make(out, 2, Job("dcp", 0, "fp32", steps=2, more=3), timeout=180)
    return out


@pytest.fixture(scope="module")
def full(dcp_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = str(tmp_path_factory.mktemp("full") / "full.pt")
    dcp_to_torch_save(dcp_dir, path)
    return torch.load(path, weights_only=False)


def _load(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        ties = json.loads((f.metadata() or {}).get("zshard.ties", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, ties  # noqa: SIM118


@pytest.mark.slow
def test_consolidate_equals_dcp_to_torch_save(dcp_dir, full, tmp_path):
    assert detect(dcp_dir) == "dcp"
    out = str(tmp_path / "m.safetensors")
    consolidate(dcp_dir, out, dtype="fp32", include_optimizer=True)
    got, ties = _load(out)
    assert ties == {"head.weight": "emb.weight"}  # saved twice by DCP, once here
    model = {k: v for k, v in got.items() if not k.startswith("optimizer.")}
    for alias, target in ties.items():
        model[alias] = model[target]
    want = full["model"]
    assert model.keys() == want.keys()
    for k, w in want.items():
        assert torch.equal(model[k], w), k
    for name, state in full["optim"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got[f"optimizer.{key}.{name}"], state[key]), (name, key)


@pytest.mark.slow
def test_import_kinds_step_buffers_ties(dcp_dir, full, tmp_path):
    ref = import_checkpoint(dcp_dir, str(tmp_path / "z"), 3)
    m = CheckpointReader.open(ref.url).manifest
    kinds = {(t.name, t.kind) for t in m.tensors}
    assert ("gain", "buffer") in kinds  # replicated, not sharded: a buffer
    assert ("frozen.weight", "param") in kinds and ("frozen.weight", "exp_avg") not in kinds
    assert {("up.weight", k) for k in ("param", "exp_avg", "exp_avg_sq")} <= kinds
    assert m.ties == {"head.weight": "emb.weight"}
    step = int(full["optim"]["state"]["up.weight"]["step"])
    assert m.step == step == 2
    opt = m.state["train"]["optimizer"]
    assert opt["step"] == step and opt["name"] == "adamw" and opt["lr"] == 1e-2


@pytest.mark.slow
def test_bf16_consolidation(dcp_dir, full, tmp_path):
    out = str(tmp_path / "d")
    consolidate(dcp_dir, out, dtype="bf16", max_shard_size="4KB")
    from safetensors.torch import load_file

    got: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            got.update(load_file(os.path.join(out, f)))
    assert torch.equal(got["up.weight"], full["model"]["up.weight"].to(torch.bfloat16))


@pytest.mark.slow
def test_missing_data_file_and_unsafe_metadata(dcp_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(dcp_dir, bad)
    os.remove(bad / "__1_0.distcp")
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(str(out))
    with pytest.raises(ZshardError, match=r"__1_0\.distcp"):
        import_checkpoint(str(bad), str(out / "z"), 2)
    assert snapshot(str(out)) == before

    evil = tmp_path / "evil"
    shutil.copytree(dcp_dir, evil)
    raw = (evil / ".metadata").read_bytes()
    md = pickle.loads(raw)
    md.storage_meta = os.system  # any callable outside the allowlist
    (evil / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafePickleError, match="--trust-pickle"):
        open_source(str(evil))


def _resume(rank: int, world: int, root: str, start: int, steps: int) -> list[float]:
    import zshard.train
    from tests.convert._make_deepspeed import LR, MICRO, WEIGHT_DECAY, Job, batch, build
    from tests.harness import mean_over_ranks

    cfg = {
        "zero": {"stage": 3},
        "optimizer": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
        "train": {"micro_batch_size": MICRO, "grad_accum": 1},
        "dist": {"backend": "gloo", "device": "cpu", "timeout_s": 60},
    }
    engine = zshard.train.initialize(build(Job("resume", 3)), cfg)
    engine.load(root)
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, rank)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(mean_over_ranks(loss))
    engine.close()
    return losses


@pytest.mark.slow
def test_resume_in_zshard_continues_fsdp2_loss_curve(dcp_dir, tmp_path):
    from tests.harness import run_ranks

    with open(os.path.join(dcp_dir, "job.json")) as f:
        want = json.load(f)["losses"]
    ref = import_checkpoint(dcp_dir, str(tmp_path / "z"), 2)
    got = run_ranks(_resume, 2, (ref.url, 2, len(want)), timeout=120)[0]
    assert got == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize(
    ("shape", "offsets", "sizes"),
    [
        ((7, 5), (3, 0), (4, 5)),  # rows: one run
        ((4, 6, 5), (1, 2, 0), (2, 3, 5)),  # a middle dimension cut: one run per outer index
        ((4, 6), (0, 4), (4, 2)),  # columns (Shard(1)): one run per row
        ((3,), (1,), (2,)),
        ((), (), ()),  # 0-d
    ],
)
def test_chunk_runs_match_numpy_slicing(shape, offsets, sizes):
    import math

    import numpy as np

    full = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    chunk = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].copy()
    data = chunk.reshape(-1)
    got = np.full(full.size, -1, dtype=np.int64)
    for p in _runs(shape, offsets, sizes, "f", 0, 8):
        got[p.start : p.start + p.length] = data[p.offset // 8 : p.offset // 8 + p.length]
    want = np.full(full.size, -1, dtype=np.int64).reshape(shape)
    want[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = chunk
    assert np.array_equal(got, want.reshape(-1))
