"""DeepSpeed ZeRO checkpoints in, against DeepSpeed itself, with no DeepSpeed installed.

The committed fixtures (``tests/fixtures/deepspeed/``, made by
``tools/make_deepspeed_fixtures.py``) are real DeepSpeed CPU (gloo) runs of stages 1-3 at world
sizes 2 and 3, in fp32, bf16 and fp16, of a model with a tied weight, a frozen parameter and a
buffer; each save directory holds two tags. Beside each tag lie DeepSpeed's own answers:
``zero_to_fp32``'s state dict, the live engine's full optimizer state and counters, and the loss
of every step. zshard's fp32 consolidation must equal ``zero_to_fp32`` bitwise, an import must
keep the master weights, moments and step counters, and a run resumed in zshard from an imported
checkpoint must continue DeepSpeed's own loss curve. Tests that make fresh checkpoints with a
live DeepSpeed are in ``test_deepspeed_live.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import snapshot
from tests.convert._deepspeed_fixtures import (
    TIES,
    Fixture,
    load,
    load_safetensors,
    names,
    optimizer_step_in_files,
    torch_load,
)
from tests.convert._make_deepspeed import GRAD_CLIP, LR, MICRO, WEIGHT_DECAY, batch, build
from tests.harness import mean_over_ranks, run_cli, run_ranks
from zshard.convert.consolidate import consolidate
from zshard.convert.importer import import_checkpoint
from zshard.convert.sources import UnsafePickleError, detect, open_source
from zshard.errors import ZshardError
from zshard.store.reader import CheckpointReader

NAMES = names()
TAGGED = [(n, tag) for n in NAMES for tag in load(n).tags]
MODEL_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _trainable(fx: Fixture, tag: str) -> list[str]:
    return sorted(fx.optimizer(tag)["master"])


def test_fixture_set_covers_stages_world_sizes_and_dtypes():
    jobs = [(load(n).job.stage, load(n).world_size, load(n).job.dtype) for n in NAMES]
    assert {s for s, _, _ in jobs} == {1, 2, 3}
    for stage in (1, 2, 3):
        assert {w for s, w, _ in jobs if s == stage} == {2, 3}, stage
        assert {d for s, _, d in jobs if s == stage} >= {"fp32", "bf16"}, stage
    assert {s for s, _, d in jobs if d == "fp16"} == {2, 3}
    for n in NAMES:
        fx = load(n)
        assert len(fx.tags) == 2 and fx.latest == fx.tags[-1], n
        for tag in fx.tags:
            assert len(fx.files(tag, "optim")) == fx.world_size, (n, tag)
            models = fx.files(tag, "model")
            assert len(models) == (fx.world_size if fx.job.stage == 3 else 0), (n, tag)


@pytest.mark.parametrize(("name", "tag"), TAGGED)
def test_consolidate_equals_zero_to_fp32(tmp_path, name, tag):
    fx = load(name)
    src = fx.save_dir
    assert detect(src) == "deepspeed"
    out = str(tmp_path / "model.safetensors")
    # The newest tag through `latest`, the older one by --tag.
    consolidate(src, out, dtype="fp32", tag=None if tag == fx.latest else tag)
    got, ties = load_safetensors(out)
    want, shared = fx.zero_to_fp32(tag)
    assert ties == TIES == shared
    assert "head.weight" not in got  # tied weights written once
    for alias, target in ties.items():
        got[alias] = got[target]
    # DeepSpeed records frozen parameters only from stage 2 on; zero_to_fp32 drops them at
    # stage 1, zshard reads them from the module state dict.
    extra = set(got) - set(want)
    assert extra == ({"frozen.weight"} if fx.job.stage == 1 else set())
    assert set(want) <= set(got)
    for k, w in want.items():
        # zero_to_fp32 keeps frozen parameters in the model dtype; --dtype fp32 upcasts exactly.
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], w.float()), k
    if fx.job.stage == 1:
        module = torch_load(os.path.join(fx.tag_dir(tag), "mp_rank_00_model_states.pt"))["module"]
        assert module["frozen.weight"].dtype == MODEL_DTYPE[fx.job.dtype]
        assert torch.equal(got["frozen.weight"], module["frozen.weight"].float())


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_state_equals_deepspeeds(tmp_path, name):
    """Moments and fp32 masters, as DeepSpeed's engine assembled them, bitwise."""
    fx = load(name)
    out = str(tmp_path / "m.safetensors")
    consolidate(fx.save_dir, out, dtype="fp32", include_optimizer=True)
    got, _ = load_safetensors(out)
    ref = fx.optimizer(fx.latest)
    for name_ in _trainable(fx, fx.latest):
        assert torch.equal(got[name_], ref["master"][name_]), name_
        for kind in ("exp_avg", "exp_avg_sq"):
            g = got[f"optimizer.{kind}.{name_}"]
            assert g.dtype == torch.float32, (kind, name_)
            assert torch.equal(g, ref[kind][name_].reshape(g.shape)), (kind, name_)
    assert not any(k.startswith("optimizer.") and k.endswith("frozen.weight") for k in got)


def test_bf16_output_and_optimizer_state(tmp_path):
    fx = load("s3b2")
    out = str(tmp_path / "m.safetensors")
    consolidate(fx.save_dir, out, dtype="bf16", include_optimizer=True)
    got, _ = load_safetensors(out)
    want, _ = fx.zero_to_fp32(fx.latest)
    assert torch.equal(got["up.weight"], want["up.weight"].to(torch.bfloat16))
    assert got["optimizer.exp_avg.up.weight"].dtype == torch.float32
    assert got["optimizer.exp_avg_sq.up.weight"].shape == want["up.weight"].shape


@pytest.mark.parametrize(
    ("name", "world"), [("s1b3", 2), ("s2h2", 3), ("s3b2", 3), ("s1f2", 1), ("s3f3", 2)]
)
def test_import_keeps_master_moments_and_steps(tmp_path, name, world):
    fx = load(name)
    job, tag = fx.job, fx.latest
    counters = fx.counters(tag)
    ref = import_checkpoint(fx.save_dir, str(tmp_path / "z"), world)
    reader = CheckpointReader.open(ref.url)
    m = reader.manifest
    assert m.step == counters["step"] == job.steps
    assert m.layout.world_size == world and m.layout.stage == job.stage
    assert m.ties == TIES
    kinds = {(t.name, t.kind): t for t in m.tensors}
    assert ("gain", "buffer") in kinds and ("frozen.weight", "param") in kinds
    assert ("frozen.weight", "exp_avg") not in kinds
    low = job.dtype != "fp32"
    expect = {"param", "exp_avg", "exp_avg_sq"} | ({"master"} if low else set())
    assert {k for n, k in kinds if n == "up.weight"} == expect
    assert kinds[("up.weight", "param")].dtype == str(MODEL_DTYPE[job.dtype]).split(".")[1]
    # Master weights and moments as DeepSpeed's engine had them when it saved, bitwise.
    want = fx.optimizer(tag)
    for n in _trainable(fx, tag):
        shape = kinds[(n, "param")].shape
        master = reader.read_torch(n, "master" if low else "param").reshape(shape)
        assert torch.equal(master, want["master"][n].reshape(shape)), n
        for kind in ("exp_avg", "exp_avg_sq"):
            got = reader.read_torch(n, kind).reshape(shape)
            assert torch.equal(got, want[kind][n].reshape(shape)), (n, kind)
    # Step counters: the engine's, the optimizer files' and the import's agree.
    train = m.state["train"]
    assert optimizer_step_in_files(fx, tag) == {counters["optimizer_step"]}
    assert train["global_step"] == job.steps
    assert train["optimizer"]["step"] == counters["optimizer_step"]
    assert train["skipped_steps"] == counters["skipped_steps"]
    assert train["optimizer"]["name"] == "adamw" and train["optimizer"]["lr"] == LR
    if job.dtype == "fp16":
        assert train["loss_scaler"]["scale"] == counters["loss_scale"]
    # Consolidating the import gives what consolidating DeepSpeed's files gives.
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    consolidate(ref.url, a, include_optimizer=True)
    consolidate(fx.save_dir, b, include_optimizer=True)
    ga, gb = load_safetensors(a)[0], load_safetensors(b)[0]
    assert ga.keys() == gb.keys()
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


@pytest.mark.parametrize("name", ["s2h2", "s2b3"])
def test_16_bit_module_weights_are_the_imported_params(tmp_path, name):
    """Stages 1-2 keep the model-dtype weights whole in the module state dict: the import's
    ``param`` kind is those bytes (fp16 with its loss scaler, bf16 without)."""
    fx = load(name)
    ref = import_checkpoint(fx.save_dir, str(tmp_path / "z"), 2)
    reader = CheckpointReader.open(ref.url)
    module = torch_load(os.path.join(fx.tag_dir(fx.latest), "mp_rank_00_model_states.pt"))
    for n in _trainable(fx, fx.latest):
        w = module["module"][n]
        assert w.dtype == MODEL_DTYPE[fx.job.dtype], n
        assert torch.equal(reader.read_torch(n, "param").reshape(w.shape), w), n
    scale = reader.manifest.state["train"].get("loss_scaler")
    if fx.job.dtype == "fp16":
        assert scale is not None and scale["scale"] == fx.counters(fx.latest)["loss_scale"]


# -- tags ---------------------------------------------------------------------------------------


def test_choosing_a_tag(tmp_path):
    fx = load("s2f2")
    old, new = fx.tags
    assert open_source(fx.save_dir).tag == new  # `latest`
    src = open_source(fx.save_dir, tag=old)
    assert src.tag == old and src.step == fx.counters(old)["step"]
    assert open_source(fx.tag_dir(old)).step == fx.counters(old)["step"]  # a tag directory
    ref = import_checkpoint(fx.save_dir, str(tmp_path / "z"), 2, tag=old)
    assert CheckpointReader.open(ref.url).manifest.step == fx.counters(old)["step"]
    # `latest` is only a pointer: rewritten, it picks the other tag.
    copy = fx.copy(str(tmp_path / "copy"))
    with open(os.path.join(copy, "latest"), "w") as f:
        f.write(old)
    assert open_source(copy).step == fx.counters(old)["step"]


def test_unknown_tag_and_unknown_format(tmp_path):
    fx = load("s1f2")
    with pytest.raises(
        ZshardError,
        match=r"tag 'global_step99' does not exist \(tags here: global_step2, global_step3\)",
    ):
        open_source(fx.save_dir, tag="global_step99")
    with pytest.raises(ZshardError, match="does not exist"):
        import_checkpoint(fx.save_dir, str(tmp_path / "y"), 2, tag="../ckpt")
    assert not (tmp_path / "y").exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(ZshardError, match="not a checkpoint zshard can read"):
        import_checkpoint(str(tmp_path / "junk"), str(tmp_path / "z"), 2)
    assert not (tmp_path / "z").exists()


def test_latest_naming_a_missing_tag_is_refused(tmp_path):
    copy = load("s2f2").copy(str(tmp_path / "copy"))
    with open(os.path.join(copy, "latest"), "w") as f:
        f.write("global_step7")
    with pytest.raises(ZshardError, match=r"latest names tag 'global_step7'.*--tag"):
        open_source(copy)
    assert open_source(copy, tag="global_step2").step == 2


# -- resume -------------------------------------------------------------------------------------


def _resume_in_zshard(
    rank: int, world: int, root: str, name: str, start: int, steps: int
) -> list[float]:
    import zshard.train

    model = build(load(name).job)
    vocab = model.emb.num_embeddings
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
        x, y = batch(step, rank, vocab)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(mean_over_ranks(loss))
    engine.close()
    return losses


@pytest.mark.slow
def test_resume_in_zshard_continues_deepspeed_loss_curve(tmp_path):
    """From the older tag: the curve runs through the step where DeepSpeed saved again."""
    fx = load("s2f2")
    tag = fx.tags[0]
    start = fx.counters(tag)["step"]
    want = fx.losses_from(start)
    assert len(want) == fx.job.steps + fx.job.more - start >= 3
    ref = import_checkpoint(fx.save_dir, str(tmp_path / "z"), fx.world_size, tag=tag)
    args = (ref.url, fx.name, start, len(want))
    got = run_ranks(_resume_in_zshard, fx.world_size, args, timeout=120)[0]
    assert got == pytest.approx(want, rel=1e-4)


# -- bad input ----------------------------------------------------------------------------------


def test_missing_rank_file_is_one_line_error_and_writes_nothing(tmp_path):
    fx = load("s2b3")
    copy = fx.copy(str(tmp_path / "copy"))
    tag_dir = os.path.join(copy, fx.latest)
    os.remove(os.path.join(tag_dir, os.path.basename(fx.files(fx.latest, "optim")[1])))
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(str(out))
    with pytest.raises(ZshardError, match=r"rank\(s\) \[1\] is missing") as e:
        import_checkpoint(tag_dir, str(out / "z"), 2)
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(ZshardError, match="missing"):
        consolidate(copy, str(out / "m.safetensors"))
    assert snapshot(str(out)) == before


def test_missing_stage3_model_states_is_refused(tmp_path):
    fx = load("s3f3")
    copy = fx.copy(str(tmp_path / "copy"))
    os.remove(os.path.join(copy, fx.latest, os.path.basename(fx.files(fx.latest, "model")[2])))
    with pytest.raises(ZshardError, match=r"model states of data-parallel rank\(s\) \[2\]"):
        import_checkpoint(copy, str(tmp_path / "z"), 2)
    assert not (tmp_path / "z").exists()


def test_unsafe_pickle_needs_trust_pickle(tmp_path):
    import argparse

    fx = load("s2f2")
    copy = fx.copy(str(tmp_path / "copy"))
    path = os.path.join(copy, fx.latest, "mp_rank_00_model_states.pt")
    sd = torch.load(path, weights_only=True)
    sd["args"] = argparse.Namespace(lr=1.0)  # pickled by reference: not weights-only loadable
    torch.save(sd, path)
    with pytest.raises(UnsafePickleError, match=r"--trust-pickle.*"):
        open_source(copy)
    with pytest.raises(UnsafePickleError):
        import_checkpoint(copy, str(tmp_path / "z"), 2)
    assert not (tmp_path / "z").exists()
    src = open_source(copy, trust_pickle=True)
    assert any(t.name == "up.weight" for t in src.tensors)


# -- CLI ----------------------------------------------------------------------------------------


def test_cli_import(tmp_path):
    fx = load("s3f3")
    src = fx.save_dir
    r = run_cli("import", src, str(tmp_path / "z"), "--world-size", "2", "-q", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "deepspeed" in r.stdout
    r = run_cli("import", src, str(tmp_path / "y"), "-n", "2", "--tag", "nope", cwd=str(tmp_path))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "global_step2, global_step3" in r.stderr
    assert not (tmp_path / "y").exists()
    out = str(tmp_path / "old.safetensors")
    r = run_cli("consolidate", src, out, "--tag", fx.tags[0], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    got, _ = load_safetensors(out)
    want, _ = fx.zero_to_fp32(fx.tags[0])
    assert all(torch.equal(got[k], want[k]) for k in got)
