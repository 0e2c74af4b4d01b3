"""Stopping `zshard train`: signals to the launcher, a second signal, a dead worker, a failed save.

Real launchers, agents and workers on CPU + gloo with a tiny GPT. Every wait is on a condition (a
marker file the test model writes, a line the launcher prints, the launcher's exit), each bounded.
The test model (STOP_MODEL) holds rank 0 inside a chosen step until the test opens a gate, so a
signal always lands in that step and the run stops at a known step; it can also stall a save,
kill its own worker, or make a save's writes fail with ENOSPC.

While a run goes, a thread records every descendant of the launcher (psutil), so the tests can
check that none is left once the launcher has exited.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from zshard.store.lock import LOCK_KEY
from zshard.store.reader import CheckpointReader
from zshard.train.config import CheckpointConfig
from zshard.train.run import EXIT_STOPPED

STEPS = 8
# 2 ranks x micro batch 2 x 3 micro batches: forward calls 3(k-1)+1 .. 3k make step k.
HOLD_IN_STEP_4 = {"rank": 0, "call": 10}

TINY = """
model: {name: 'stopmodel:model'}
data: {name: builtin, seq_len: 32}
train: {steps: STEPS, micro_batch_size: 2, global_batch_size: 12, seed: 3, log_every: 1}
optimizer: {name: adamw, lr: 1.0e-3, weight_decay: 0.1}
scheduler: {name: cosine, warmup_steps: 2}
zero: {stage: 1}
checkpoint: {dir: CKPT, every: 3, keep_last: 5}
dist: {timeout_s: 60}
"""

STOP_MODEL = """
import errno
import json
import os
import signal
import time

import torch

from zshard.store.storage import LocalStream, translate_errors
from zshard.store.writer import CheckpointWriter
from zshard.train.models import gpt

PLAN = json.loads(os.environ.get("ZSHARD_TEST_PLAN", "{}"))
MARKS = os.environ.get("ZSHARD_TEST_MARKS", "")
WORKER = "LOCAL_RANK" in os.environ  # the launcher imports this module too (to check shapes)
RANK = int(os.environ.get("RANK", "-1"))
ATTEMPT = int(os.environ.get("ZSHARD_RESTART_COUNT", "0"))


def mark(name):
    with open(os.path.join(MARKS, name), "w"):
        pass


def wait(name, timeout):
    path = os.path.join(MARKS, name)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"test gate {name} never opened")
        time.sleep(0.01)


def mine(key):
    spec = PLAN.get(key)
    return spec if WORKER and spec and spec["rank"] == RANK and ATTEMPT == 0 else None


class Gated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = gpt(n_layer=1, n_head=2, d_model=32, seq_len=32)
        self.calls = 0

    def forward(self, x, y=None):
        self.calls += 1
        hold, kill = mine("hold"), mine("kill")
        if hold and self.calls == hold["call"]:
            mark("held")
            wait("go", 120)
        if kill and self.calls == kill["call"]:
            mark("killed")
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x, y)


def model():
    return Gated()


if mine("stall_save"):  # block inside the save of one step, after its first shard
    _write_shard = CheckpointWriter.write_shard

    def write_shard(self, *a, **kw):
        n = _write_shard(self, *a, **kw)
        if self.name == "step-%08d" % PLAN["stall_save"]["step"]:
            mark("saving")
            wait("never", 300)
        return n

    CheckpointWriter.write_shard = write_shard

if mine("enospc"):  # every write into one step directory fails: the disk is full
    _write = LocalStream.write

    def write(self, data):
        if "/step-%08d/" % PLAN["enospc"]["step"] in self._final:
            with translate_errors(self._final):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _write(self, data)

    LocalStream.write = write
"""


@dataclass
class Run:
    """One `zshard train` in the background: its files, its process tree, its outcome."""

    workdir: Path
    ckpt: Path
    proc: subprocess.Popen[bytes]
    marks: Path
    out: Path
    err: Path
    seen: dict[int, float] = field(default_factory=dict)
    _done: threading.Event = field(default_factory=threading.Event)
    _watch: threading.Thread | None = None

    def start_watching(self) -> None:
        def watch() -> None:
            while not self._done.is_set():
                try:
                    procs = psutil.Process(self.proc.pid).children(recursive=True)
                except psutil.Error:
                    procs = []
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        self.seen.setdefault(p.pid, p.create_time())
                if self.proc.poll() is not None:
                    return
                time.sleep(0.02)

        self._watch = threading.Thread(target=watch, daemon=True)
        self._watch.start()

    def wait_for(self, what: str, pred: Callable[[], bool], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if self.proc.poll() is not None and not pred():
                raise AssertionError(
                    f"run ended ({self.proc.returncode}) before {what}: {self.stderr}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.stderr}")
            time.sleep(0.02)

    def wait_mark(self, name: str, timeout: float = 180) -> None:
        self.wait_for(f"marker {name}", lambda: (self.marks / name).exists(), timeout)

    def open_gate(self, name: str = "go") -> None:
        (self.marks / name).touch()

    def finish(self, timeout: float = 240) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            self._done.set()
            if self._watch is not None:
                self._watch.join(5)
        return code

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def left_alive(self) -> list[int]:
        """Descendants recorded while running that still exist (zombies count as gone)."""
        alive = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                continue
        return alive


def start_run(
    workdir: Path, name: str, *args: str, plan: dict[str, Any] | None = None, steps: int = STEPS
) -> Run:
    (workdir / "stopmodel.py").write_text(STOP_MODEL)
    ckpt = workdir / name
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(textwrap.dedent(TINY).replace("CKPT", str(ckpt)).replace("STEPS", str(steps)))
    marks = workdir / f"{name}-marks"
    marks.mkdir(exist_ok=True)
    for old in marks.iterdir():
        old.unlink()
    out, err = workdir / f"{name}.out", workdir / f"{name}.err"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        ZSHARD_TEST_PLAN=json.dumps(plan or {}),
        ZSHARD_TEST_MARKS=str(marks),
    )
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zshard.cli", "train", str(cfg), "--nproc", "2", *args],
            stdout=fo,
            stderr=fe,
            env=env,
        )
    run = Run(workdir, ckpt, proc, marks, out, err)
    run.start_watching()
    return run


def final_params(ckpt: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader.open(str(ckpt))
    return {
        t.name: r.read_torch(t.name, t.kind).clone()
        for t in r.manifest.tensors
        if t.kind == "param"
    }


def committed_step(ckpt: Path) -> int:
    return CheckpointReader.open(str(ckpt)).manifest.step


def verify(ckpt: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "zshard.cli", "verify", str(ckpt), "--all"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, torch.Tensor]]:
    """The parameters after an uninterrupted run of STEPS steps."""
    workdir = tmp_path_factory.mktemp("reference")
    run = start_run(workdir, "straight")
    assert run.finish() == 0, run.stderr
    done = lines_with(run.stdout, "zshard: done:")
    assert len(done) == 1 and f"step-{STEPS:08d}" in done[0] and "zshard consolidate" in done[0]
    yield final_params(run.ckpt)


# -- SIGTERM / SIGINT: finish the step, save, exit 75, resume bitwise ------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_step_and_the_rerun_resumes_bitwise(
    tmp_path: Path, reference: dict[str, torch.Tensor], sig: signal.Signals
) -> None:
    run = start_run(tmp_path, "run", plan={"hold": HOLD_IN_STEP_4})
    run.wait_mark("held")  # rank 0 is inside step 4; step 3 is committed
    os.kill(run.proc.pid, sig)  # the launcher alone
    run.wait_for(
        "the launcher's acknowledgement", lambda: "finishing the current step" in run.stderr
    )
    t0 = time.monotonic()
    run.open_gate()
    code = run.finish()
    assert time.monotonic() - t0 < 60
    err = run.stderr
    assert code == EXIT_STOPPED, err
    assert run.left_alive() == [], f"processes left: {run.left_alive()}"
    assert len(run.seen) >= 3, run.seen  # the agent and two workers were seen
    ack = lines_with(err, "finishing the current step")
    assert len(ack) == 1 and "saving a checkpoint" in ack[0] and "abort at once" in ack[0], err
    if sig == signal.SIGINT:
        assert "Ctrl-C" in ack[0]
    stopped = lines_with(err, "zshard: stopped at step")
    step4 = run.ckpt / "step-00000004"
    assert stopped == [
        f"zshard: stopped at step 4 by {sig.name}; checkpoint {step4}; rerun the same command to "
        "resume"
    ], err
    assert "Traceback" not in err
    assert committed_step(run.ckpt) == 4
    verify(step4)
    assert not (run.ckpt / LOCK_KEY).exists()

    rerun = start_run(tmp_path, "run")  # the same command (the gate only exists in attempt 0)
    assert rerun.finish() == 0, rerun.stderr
    assert committed_step(run.ckpt) == STEPS
    got = final_params(run.ckpt)
    assert got.keys() == reference.keys()
    for name in got:
        assert torch.equal(got[name], reference[name]), name


@pytest.mark.slow
def test_preempt_signal_with_on_signal_exit_stops_without_saving(tmp_path: Path) -> None:
    run = start_run(
        tmp_path,
        "run",
        "--set",
        "checkpoint.preempt_signal=SIGUSR2",
        "--set",
        "checkpoint.on_signal=exit",
        plan={"hold": HOLD_IN_STEP_4},
    )
    run.wait_mark("held")
    os.kill(run.proc.pid, signal.SIGUSR2)
    run.wait_for("the acknowledgement", lambda: "finishing the current step" in run.stderr)
    run.open_gate()
    code = run.finish()
    err = run.stderr
    assert code == 128 + signal.SIGUSR2, err
    assert run.left_alive() == []
    stopped = lines_with(err, "zshard: stopped at step")
    assert len(stopped) == 1, err
    assert "step 4 by SIGUSR2 without saving (checkpoint.on_signal: exit)" in stopped[0]
    assert f"last committed checkpoint {run.ckpt / 'step-00000003'}" in stopped[0]
    assert committed_step(run.ckpt) == 3


# -- a second signal aborts at once, the last committed checkpoint intact --------------------------


@pytest.mark.slow
def test_second_signal_aborts_during_the_save_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    run = start_run(
        tmp_path, "run", plan={"hold": HOLD_IN_STEP_4, "stall_save": {"rank": 1, "step": 4}}
    )
    run.wait_mark("held")
    os.kill(run.proc.pid, signal.SIGTERM)
    run.wait_for("the acknowledgement", lambda: "finishing the current step" in run.stderr)
    run.open_gate()
    run.wait_mark("saving")  # rank 1 wrote part of step 4 and stalls: the save is half done
    t0 = time.monotonic()
    os.kill(run.proc.pid, signal.SIGTERM)
    code = run.finish(timeout=60)
    assert time.monotonic() - t0 < 30
    err = run.stderr
    assert code == 128 + signal.SIGTERM, err
    assert run.left_alive() == [], f"processes left: {run.left_alive()}"
    aborted = lines_with(err, "zshard: aborted")
    assert len(aborted) == 1 and "second SIGTERM" in aborted[0], err
    assert f"last committed checkpoint {run.ckpt / 'step-00000003'}" in aborted[0]
    assert committed_step(run.ckpt) == 3  # step 4 was never committed, so it is invisible
    verify(run.ckpt)
    assert not lines_with(err, "zshard: stopped at step")


# -- a dead worker ends the run: no hang, the rank named -------------------------------------------


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_naming_the_rank(tmp_path: Path) -> None:
    # Rank 1 kills itself in step 5 (forward call 13), after the step-3 save.
    run = start_run(tmp_path, "run", plan={"kill": {"rank": 1, "call": 13}})
    run.wait_mark("killed")
    t0 = time.monotonic()
    code = run.finish(timeout=120)
    took = time.monotonic() - t0
    assert took < 60, f"{took:.0f} s to end after the kill (dist.timeout_s is 60)"
    err = run.stderr
    assert code == 1, err
    assert run.left_alive() == []
    errors = lines_with(err, "zshard: error:")
    assert len(errors) == 1, err
    assert "rank 1 (local rank 1, pid" in errors[0] and "killed by SIGKILL" in errors[0]
    assert f"last committed checkpoint {run.ckpt / 'step-00000003'}" in errors[0]
    assert committed_step(run.ckpt) == 3


# -- a failed periodic save (ENOSPC) ---------------------------------------------------------------


@pytest.mark.slow
def test_disk_full_during_a_periodic_save_stops_with_one_line(tmp_path: Path) -> None:
    run = start_run(tmp_path, "run", plan={"enospc": {"rank": 1, "step": 6}})
    code = run.finish()
    err = run.stderr
    assert code == 1, err
    assert run.left_alive() == []
    errors = lines_with(err, "zshard: error:")
    assert len(errors) == 1, err
    line = errors[0]
    step6, step3 = run.ckpt / "step-00000006", run.ckpt / "step-00000003"
    assert line.startswith(f"zshard: error: rank 1: checkpoint step 6 ({step6}) failed: {step6}/")
    assert "no space left on device" in line
    assert f"last committed checkpoint {step3}" in line
    assert committed_step(run.ckpt) == 3
    verify(step3)


@pytest.mark.slow
def test_disk_full_with_on_error_continue_keeps_training(tmp_path: Path) -> None:
    run = start_run(
        tmp_path,
        "run",
        "--set",
        "checkpoint.on_error=continue",
        "--set",
        "checkpoint.every=2",
        plan={"enospc": {"rank": 1, "step": 4}},
    )
    code = run.finish()
    assert code == 0, run.stderr
    warnings = lines_with(run.stdout, "zshard: warning:")
    assert len(warnings) == 1, run.stdout
    line = warnings[0][warnings[0].index("zshard: warning:") :]
    assert "checkpoint step 4" in line and "no space left on device" in line
    assert f"the last committed checkpoint is {run.ckpt / 'step-00000002'}" in line
    assert "training continues" in line and "next attempt at step 6" in line
    assert committed_step(run.ckpt) == STEPS
    assert not (run.ckpt / "step-00000004" / "manifest.json").exists()
    verify(run.ckpt / "step-00000002")
    verify(run.ckpt)


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [("SIGUSR1", "SIGUSR1"), ("usr2", "SIGUSR2"), ("none", None), (None, None)],
)
def test_preempt_signal_names(given: str | None, stored: str | None) -> None:
    assert CheckpointConfig(preempt_signal=given).preempt_signal == stored


def test_bad_stop_settings_are_config_errors() -> None:
    from zshard.errors import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint\.preempt_signal"):
        CheckpointConfig(preempt_signal="SIGKILL")
    with pytest.raises(ConfigError, match=r"checkpoint\.on_signal"):
        CheckpointConfig(on_signal="pause")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"checkpoint\.on_error"):
        CheckpointConfig(on_error="ignore")  # type: ignore[arg-type]
