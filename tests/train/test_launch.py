"""`zshard train` end to end: the elastic launcher, the loop, metrics, resume, bad input.

Real worker processes on CPU + gloo, through the console entry point, with a tiny GPT so each
run takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.harness import run_cli_together
from zshard.cli import main
from zshard.store.reader import CheckpointReader

pytestmark = pytest.mark.slow

TINY = """
model: {name: gpt, args: {n_layer: 1, n_head: 2, d_model: 32}}
data: {name: builtin, seq_len: 32}
train: {steps: 6, micro_batch_size: 2, global_batch_size: 12, seed: 3, log_every: 1}
optimizer: {name: adamw, lr: 1.0e-3, weight_decay: 0.1}
scheduler: {name: cosine, warmup_steps: 2}
zero: {stage: 1}
checkpoint: {dir: CKPT, every: 3, keep_last: 5}
"""


def write_config(tmp: Path, ckpt: Path, text: str = TINY) -> Path:
    path = tmp / "cfg.yaml"
    path.write_text(textwrap.dedent(text).replace("CKPT", str(ckpt)))
    return path


def zshard(
    *args: str, cwd: Path | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "zshard.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        check=False,
    )


def final_params(ckpt: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader.open(str(ckpt))
    kinds = {t.kind for t in r.manifest.tensors}
    kind = "master" if "master" in kinds else "param"
    return {
        t.name: r.read_torch(t.name, t.kind).clone() for t in r.manifest.tensors if t.kind == kind
    }


def tree(path: Path) -> dict[str, bytes]:
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


# Each `zshard train` costs seconds of start-up (launcher, agent, workers), so the runs that
# several tests check are made once per module, side by side; a test that goes on from one
# copies it first.


@pytest.fixture(scope="module")
def first_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The checkpoint roots of an uninterrupted 6-step run at 2 ranks, ZeRO 1, and of the same
    run stopped after 3 steps (``--set train.steps=3``), made at the same time."""
    tmp, tmp3 = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("three")
    ckpt, ckpt3 = tmp / "run", tmp3 / "run"
    straight_run, three_run = run_cli_together(
        ["train", write_config(tmp, ckpt), "--nproc", "2"],
        ["train", write_config(tmp3, ckpt3), "--nproc", "2", "--set", "train.steps=3"],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert straight_run[0] == 0, straight_run[1]
    assert three_run[0] == 0, three_run[1]
    return ckpt, ckpt3


@pytest.fixture(scope="module")
def straight(first_runs: tuple[Path, Path]) -> Path:
    """The checkpoint root of an uninterrupted 6-step run at 2 ranks, ZeRO 1."""
    return first_runs[0]


@pytest.fixture(scope="module")
def three_steps(first_runs: tuple[Path, Path]) -> Path:
    """The checkpoint root of the same run stopped after 3 steps (``--set train.steps=3``)."""
    return first_runs[1]


def test_train_writes_metrics_and_checkpoints(straight: Path) -> None:
    ckpt = straight
    lines = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "tokens_per_s", "step_time_s", "peak_rss_bytes"):
        assert all(isinstance(x[key], (int, float)) for x in lines), key
    assert lines[-1]["loss"] < lines[0]["loss"]
    # Each periodic save reports what it cost training: the stall, and the snapshot within it.
    saved = [x for x in lines if "checkpoint" in x]
    assert [x["step"] for x in saved] == [3, 6]
    assert all(0 <= x["checkpoint"]["snapshot_s"] <= x["checkpoint"]["stall_s"] for x in saved)
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000003", "step-00000006"]
    r = CheckpointReader.open(str(ckpt))
    assert (r.manifest.step, r.manifest.layout.world_size, r.manifest.layout.stage) == (6, 2, 1)
    assert zshard("verify", str(ckpt)).returncode == 0


def test_resume_at_another_world_size_and_stage_matches_a_straight_run(
    tmp_path: Path, straight: Path, three_steps: Path
) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(three_steps, resumed)
    cfg = write_config(tmp_path, resumed)
    # Same global batch at 3 ranks (12 = 2 x 3 x 2), ZeRO 1 -> 3 across the resume.
    second = zshard("train", str(cfg), "--nproc", "3", "--set", "zero.stage=3")
    assert second.returncode == 0, second.stderr
    r = CheckpointReader.open(str(resumed))
    assert (r.manifest.step, r.manifest.layout.world_size, r.manifest.layout.stage) == (6, 3, 3)

    a, b = final_params(straight), final_params(resumed)
    assert a.keys() == b.keys()
    for name in a:
        # Same samples in the same steps; only the reduction order differs across world sizes.
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    losses = [json.loads(x)["loss"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    straight_losses = [
        json.loads(x)["loss"] for x in (straight / "metrics.jsonl").read_text().splitlines()
    ]
    assert losses == pytest.approx(straight_losses, rel=1e-5)


BAD_CONFIGS = [
    ("model: [unclosed", "YAML"),
    ("train: {steps: 2, micro_batch_size: 2, global_batch_size: 4}\nbogus: 1", "bogus"),
    ("train: {steps: two, micro_batch_size: 2, global_batch_size: 4}", "train.steps"),
    (
        "train: {steps: 2, micro_batch_size: 2, global_batch_size: 4}\nzero: {stage: 5}",
        "zero.stage",
    ),
    ("train: {steps: 2, micro_batch_size: 0, global_batch_size: 4}", "micro_batch_size"),
    ("train: {steps: 2, micro_batch_size: 2, global_batch_size: -4}", "global_batch_size"),
    ("train: {steps: 2, micro_batch_size: 2, global_batch_size: 6}", "global_batch_size"),
    (
        "train: {steps: 2, micro_batch_size: 2, global_batch_size: 4}\n"
        "checkpoint: {dir: CKPT, resume: NOWHERE}",
        "no checkpoint at",
    ),
]


def _check_one_line_exit_2(code: object, stderr: str, needle: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("zshard: error:"), stderr
    assert needle in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize(("text", "needle"), BAD_CONFIGS)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    """The command's entry point in this process (a subprocess costs seconds of imports per
    case; the test below runs the real command for a few of these)."""
    ckpt = tmp_path / "run"
    cfg = write_config(tmp_path, ckpt, text.replace("NOWHERE", str(tmp_path / "nowhere")))
    before = tree(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["train", str(cfg), "--nproc", "2"])
    _check_one_line_exit_2(info.value.code, capsys.readouterr().err, needle)
    assert tree(tmp_path) == before


# The real command: a config error and a resume error (found by the launcher's preflight).
@pytest.mark.parametrize(("text", "needle"), [BAD_CONFIGS[0], BAD_CONFIGS[-1]])
def test_bad_config_through_the_command_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, text: str, needle: str
) -> None:
    ckpt = tmp_path / "run"
    cfg = write_config(tmp_path, ckpt, text.replace("NOWHERE", str(tmp_path / "nowhere")))
    before = tree(tmp_path)
    proc = zshard("train", str(cfg), "--nproc", "2", timeout=60)
    _check_one_line_exit_2(proc.returncode, proc.stderr, needle)
    assert tree(tmp_path) == before


def test_checkpoint_from_a_different_model_is_refused(tmp_path: Path, three_steps: Path) -> None:
    ckpt = tmp_path / "run"
    shutil.copytree(three_steps, ckpt)
    cfg = write_config(tmp_path, ckpt)
    before = tree(ckpt)
    proc = zshard("train", str(cfg), "--nproc", "2", "--set", "model.args.d_model=48", timeout=60)
    assert proc.returncode == 2
    assert "different model" in proc.stderr
    assert "pos_emb.weight: checkpoint [32, 32], model [32, 48]" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert tree(ckpt) == before


CRASHING_MODEL = """
import os
import torch
from zshard.train.models import gpt

class Crash(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = gpt(n_layer=1, n_head=2, d_model=32, seq_len=32)
        self.calls = 0

    def forward(self, x, y=None):
        self.calls += 1
        # Three micro batches per step at 2 ranks: call 13 is in step 5, after the step-3 save.
        if os.environ.get("RANK") == "1" and self.calls == 13:
            raise RuntimeError("injected failure on rank 1")
        return self.inner(x, y)

def model():
    return Crash()
"""


def test_worker_crash_shows_the_failing_rank_once_and_keeps_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    (tmp_path / "crashmodel.py").write_text(CRASHING_MODEL)
    ckpt = tmp_path / "run"
    cfg = write_config(
        tmp_path,
        ckpt,
        TINY.replace(
            "name: gpt, args: {n_layer: 1, n_head: 2, d_model: 32}", "name: 'crashmodel:model'"
        ),
    )
    env_path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", "zshard.cli", "train", str(cfg), "--nproc", "2"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env=dict(os.environ, PYTHONPATH=env_path, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 1
    assert proc.stderr.count("injected failure on rank 1") == 1, proc.stderr
    assert "rank 1" in proc.stderr
    assert f"last committed checkpoint {ckpt / 'step-00000003'}" in proc.stderr
    r = CheckpointReader.open(str(ckpt))
    assert r.manifest.step == 3
    assert zshard("verify", str(ckpt)).returncode == 0


# Shaped after DeepSpeed's documented ZeRO-2 example config (batch, fp32 AdamW, WarmupLR,
# bucket sizes), plus two keys zshard has no use for.
DEEPSPEED_ZERO2 = {
    "train_batch_size": 12,
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 3,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8}},
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 2},
    },
    "zero_optimization": {
        "stage": 2,
        "allgather_bucket_size": 200000000,
        "reduce_bucket_size": 200000000,
        "overlap_comm": True,
        "contiguous_gradients": True,
    },
    "steps_per_print": 10,
    "wall_clock_breakdown": False,
}


def test_a_deepspeed_config_trains(tmp_path: Path) -> None:
    ckpt = tmp_path / "run"
    cfg = write_config(
        tmp_path,
        ckpt,
        """
        model: {name: gpt, args: {n_layer: 1, n_head: 2, d_model: 32}}
        data: {name: builtin, seq_len: 32}
        train: {steps: 3, log_every: 1}
        checkpoint: {dir: CKPT}
        """,
    )
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps(DEEPSPEED_ZERO2))
    proc = zshard("train", str(cfg), "--nproc", "2", "--deepspeed-config", str(ds))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("zshard: warning:")]
    assert len(warnings) == 1 and "steps_per_print" in warnings[0], proc.stderr
    r = CheckpointReader.open(str(ckpt))
    assert (r.manifest.step, r.manifest.layout.world_size, r.manifest.layout.stage) == (3, 2, 2)
    train_state = r.manifest.state["config"]
    assert train_state["optimizer"]["name"] == "adamw" and train_state["grad_clip"] == 1.0
    lines = (ckpt / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
