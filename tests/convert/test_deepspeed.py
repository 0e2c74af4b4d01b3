"""DeepSpeed ZeRO checkpoints in, against DeepSpeed itself: real CPU (gloo) runs of stages 1-3,
world sizes 1-3, fp32, bf16 and fp16, of a model with a tied weight, a frozen parameter and a
buffer.

The checkpoints are made once per module (``_make_deepspeed``, one process group per world
size). zshard's fp32 consolidation must equal DeepSpeed's ``zero_to_fp32`` bitwise, and a run
resumed in zshard from an imported checkpoint must continue DeepSpeed's own loss curve.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import threading

import pytest
import torch

from tests.conftest import snapshot
from tests.convert._make_deepspeed import GRAD_CLIP, LR, MICRO, WEIGHT_DECAY, Job, batch, build
from zshard.convert.consolidate import consolidate
from zshard.convert.importer import import_checkpoint
from zshard.convert.sources import UnsafePickleError, detect, open_source
from zshard.errors import ZshardError
from zshard.store.reader import CheckpointReader

pytestmark = pytest.mark.slow

# name -> (world size, job). Covers stages 1-3 x world sizes 1-3 x fp32/bf16 without the whole
# product; "s2f2" also continues training after its save (the resume test's reference curve).
JOBS = {
    "s2f1": (1, Job("s2f1", 2, "fp32")),
    "s2f2": (2, Job("s2f2", 2, "fp32", steps=2, more=3)),
    "s1b2": (2, Job("s1b2", 1, "bf16")),
    "s2h2": (2, Job("s2h2", 2, "fp16", steps=3)),
    "s3f2": (2, Job("s3f2", 3, "fp32")),
    "s1f3": (3, Job("s1f3", 1, "fp32")),
    "s2b3": (3, Job("s2b3", 2, "bf16")),
    "s3b3": (3, Job("s3b3", 3, "bf16")),
}


@pytest.fixture(scope="module")
def ds_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")
    from tests.convert._make_deepspeed import make

    root = str(tmp_path_factory.mktemp("deepspeed"))
    by_world: dict[int, list[Job]] = {}
    for world, job in JOBS.values():
        by_world.setdefault(world, []).append(job)
    errors: list[BaseException] = []

    def run(world: int, jobs: list[Job]) -> None:
        try:
            make(root, world, jobs, timeout=240)
        except BaseException as e:
            errors.append(e)

    # One process group per world size, all at once: start-up (imports) dominates.
    threads = [threading.Thread(target=run, args=item) for item in by_world.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return root


def _zero_to_fp32(path: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(path)


def _load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        ties = json.loads((f.metadata() or {}).get("zshard.ties", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, ties  # noqa: SIM118


@pytest.mark.parametrize("name", sorted(JOBS))
def test_consolidate_equals_zero_to_fp32(ds_root, tmp_path, name):
    src = os.path.join(ds_root, name)
    assert detect(src) == "deepspeed"
    out = str(tmp_path / "model.safetensors")
    consolidate(src, out, dtype="fp32")
    got, ties = _load_safetensors(out)
    want = _zero_to_fp32(src)
    assert ties == {"head.weight": "emb.weight"}
    assert "head.weight" not in got  # tied weights written once
    for alias, target in ties.items():
        got[alias] = got[target]
    job = JOBS[name][1]
    # DeepSpeed records frozen parameters only from stage 2 on; zero_to_fp32 drops them at
    # stage 1, zshard reads them from the module state dict.
    extra = set(got) - set(want)
    assert extra == ({"frozen.weight"} if job.stage == 1 else set())
    assert set(want) <= set(got)
    for k, w in want.items():
        # zero_to_fp32 keeps frozen parameters in the model dtype; --dtype fp32 upcasts exactly.
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], w.float()), k
    if job.stage == 1:
        module = torch.load(
            os.path.join(src, f"global_step{job.steps}", "mp_rank_00_model_states.pt"),
            weights_only=True,
        )["module"]
        assert torch.equal(got["frozen.weight"], module["frozen.weight"].float())


def test_bf16_output_and_optimizer_state(ds_root, tmp_path):
    src = os.path.join(ds_root, "s3b3")
    out = str(tmp_path / "m.safetensors")
    consolidate(src, out, dtype="bf16", include_optimizer=True)
    got, _ = _load_safetensors(out)
    want = _zero_to_fp32(src)
    assert torch.equal(got["up.weight"], want["up.weight"].to(torch.bfloat16))
    assert got["optimizer.exp_avg.up.weight"].dtype == torch.float32
    assert got["optimizer.exp_avg_sq.up.weight"].shape == want["up.weight"].shape


@pytest.mark.parametrize(("name", "world"), [("s1b2", 3), ("s3b3", 2), ("s2f1", 2)])
def test_import_keeps_master_moments_and_steps(ds_root, tmp_path, name, world):
    src = os.path.join(ds_root, name)
    ref = import_checkpoint(src, str(tmp_path / "z"), world)
    reader = CheckpointReader.open(ref.url)
    m = reader.manifest
    job = JOBS[name][1]
    assert m.step == job.steps
    assert m.layout.world_size == world and m.layout.stage == job.stage
    assert m.ties == {"head.weight": "emb.weight"}
    kinds = {(t.name, t.kind): t for t in m.tensors}
    assert ("gain", "buffer") in kinds and ("frozen.weight", "param") in kinds
    assert ("frozen.weight", "exp_avg") not in kinds
    expect = {"param", "exp_avg", "exp_avg_sq"} | ({"master"} if job.dtype == "bf16" else set())
    assert {k for n, k in kinds if n == "up.weight"} == expect
    model_dtype = "bfloat16" if job.dtype == "bf16" else "float32"
    assert kinds[("up.weight", "param")].dtype == model_dtype
    train = m.state["train"]
    assert train["global_step"] == job.steps and train["optimizer"]["step"] == job.steps
    assert train["optimizer"]["name"] == "adamw" and train["optimizer"]["lr"] == LR
    # Consolidating the import gives what consolidating DeepSpeed's files gives.
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    consolidate(ref.url, a, include_optimizer=True)
    consolidate(src, b, include_optimizer=True)
    ga, gb = _load_safetensors(a)[0], _load_safetensors(b)[0]
    assert ga.keys() == gb.keys()
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


def _resume_in_zshard(rank: int, world: int, root: str, start: int, steps: int) -> list[float]:
    import zshard.train

    model = build(Job("resume", 2))
    cfg = {
        "zero": {"stage": 2},
        "optimizer": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY},
        "train": {"micro_batch_size": MICRO, "grad_accum": 1},
        "grad_clip": GRAD_CLIP,
        "dist": {"backend": "gloo", "device": "cpu", "timeout_s": 60},
    }
    engine = zshard.train.initialize(model, cfg)
    engine.load(root)
    assert engine.optimizer_steps == start
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, rank)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        t = loss.detach().float().reshape(1)
        torch.distributed.all_reduce(t)
        losses.append(float(t.item()) / world)
    engine.close()
    return losses


def test_resume_in_zshard_continues_deepspeed_loss_curve(ds_root, tmp_path):
    from tests.train._dist import run_ranks

    world, job = JOBS["s2f2"]
    src = os.path.join(ds_root, job.name)
    with open(os.path.join(src, "job.json")) as f:
        want = json.load(f)["losses"]
    assert len(want) == job.more
    ref = import_checkpoint(src, str(tmp_path / "z"), world, tag=f"global_step{job.steps}")
    got = run_ranks(_resume_in_zshard, world, (ref.url, job.steps, job.more), timeout=120)[0]
    assert got == pytest.approx(want, rel=1e-4)


# -- bad input ----------------------------------------------------------------------------------


def _copy_tag(ds_root: str, name: str, dest) -> str:
    job = JOBS[name][1]
    d = str(dest / name)
    shutil.copytree(os.path.join(ds_root, name), d)
    return os.path.join(d, f"global_step{job.steps}")


def test_missing_rank_file_is_one_line_error_and_writes_nothing(ds_root, tmp_path):
    tag_dir = _copy_tag(ds_root, "s1f3", tmp_path)
    os.remove(os.path.join(tag_dir, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(str(out))
    with pytest.raises(ZshardError, match=r"rank\(s\) \[1\] is missing"):
        import_checkpoint(tag_dir, str(out / "z"), 2)
    with pytest.raises(ZshardError, match="missing"):
        consolidate(os.path.dirname(tag_dir), str(out / "m.safetensors"))
    assert snapshot(str(out)) == before


def test_unknown_tag_and_unknown_format(ds_root, tmp_path):
    with pytest.raises(ZshardError, match="tag 'global_step99' does not exist"):
        open_source(os.path.join(ds_root, "s2f1"), tag="global_step99")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(ZshardError, match="not a checkpoint zshard can read"):
        import_checkpoint(str(tmp_path / "junk"), str(tmp_path / "z"), 2)
    assert not (tmp_path / "z").exists()


def test_unsafe_pickle_needs_trust_pickle(ds_root, tmp_path):
    import argparse

    tag_dir = _copy_tag(ds_root, "s2f1", tmp_path)
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    sd = torch.load(path, weights_only=True)
    sd["args"] = argparse.Namespace(lr=1.0)  # pickled by reference: not weights-only loadable
    torch.save(sd, path)
    with pytest.raises(UnsafePickleError, match=r"--trust-pickle.*"):
        open_source(os.path.dirname(tag_dir))
    src = open_source(os.path.dirname(tag_dir), trust_pickle=True)
    assert any(t.name == "up.weight" for t in src.tensors)


def zshard(*args: str, cwd: str):
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    cmd = [sys.executable, "-m", "zshard.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True)


def test_cli_import(ds_root, tmp_path):
    src = os.path.join(ds_root, "s3f2")
    r = zshard("import", src, str(tmp_path / "z"), "--world-size", "3", "-q", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "deepspeed" in r.stdout
    r = zshard("import", src, str(tmp_path / "y"), "-n", "2", "--tag", "nope", cwd=str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert not (tmp_path / "y").exists()
