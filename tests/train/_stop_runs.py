"""`zshard train` runs that are stopped, aborted, lose a worker or fail a save: each scenario
runs real launchers, agents and workers (CPU + gloo, tiny GPT), asserts its invariants and
returns what it measured. ``tests/train/test_stop.py`` runs each once; ``tools/fault_report.py``
runs them more often and counts (docs/reliability.md, "Stopping a run").

Every wait is on a condition (a marker file the test model writes, a line the launcher prints,
the launcher's exit), each bounded. The test model (STOP_MODEL) holds rank 0 inside a chosen step
until a gate opens, so a signal always lands in that step and the run stops at a known step; it
can also stall a save, kill its own worker, or make a save's writes fail with ENOSPC. While a
run goes, a thread records every descendant of the launcher (psutil), so a scenario can check
that none is left once the launcher has exited.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from zshard.store.lock import LOCK_KEY
from zshard.store.reader import CheckpointReader
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
    workdir.mkdir(parents=True, exist_ok=True)
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


def acknowledged(run: Run) -> bool:
    return "finishing the current step" in run.stderr


def no_process_left(run: Run) -> None:
    left = run.left_alive()
    assert left == [], f"processes of the run left: {left}"
    assert len(run.seen) >= 3, f"the agent and two workers were not all seen: {run.seen}"


# -- scenarios ----------------------------------------------------------------------------------


# The parameters of an uninterrupted run, asked for only once a scenario needs them.
Reference = Callable[[], dict[str, torch.Tensor]]


def start_reference(workdir: Path) -> Reference:
    """Start an uninterrupted run of STEPS steps in the background; returns a function that waits
    for it (once), checks that it ended with the one-line summary and returns its parameters.

    A launch spends most of its wall time starting processes one after another (launcher, agent,
    workers), with a core often idle, so the reference runs alongside the first scenario's own
    run instead of before it.
    """
    run = start_run(workdir, "straight")
    params: dict[str, torch.Tensor] = {}

    def wait() -> dict[str, torch.Tensor]:
        if not params:
            assert run.finish() == 0, run.stderr
            done = lines_with(run.stdout, "zshard: done:")
            step = run.ckpt / f"step-{STEPS:08d}"
            assert done == [f"zshard: done: checkpoint {step}; next: zshard consolidate {step} "
                            "model.safetensors"], run.stdout  # fmt: skip
            params.update(final_params(run.ckpt))
        return params

    return wait


def reference_run(workdir: Path) -> dict[str, torch.Tensor]:
    """An uninterrupted run of STEPS steps; it ends with the one-line summary. Its parameters."""
    return start_reference(workdir)()


def signal_stop(
    workdir: Path, sig: signal.Signals, reference: Reference | None = None
) -> dict[str, float]:
    """``sig`` to the launcher alone while rank 0 is in step 4: every rank finishes step 4, a
    checkpoint of it is committed and verifies, one line, exit 75, no process left; the rerun
    (same command) resumes and ends bitwise equal to ``reference()``."""
    run = start_run(workdir, "run", plan={"hold": HOLD_IN_STEP_4})
    run.wait_mark("held")  # rank 0 is inside step 4; step 3 is committed
    os.kill(run.proc.pid, sig)
    run.wait_for("the launcher's acknowledgement", lambda: acknowledged(run))
    t0 = time.monotonic()
    run.open_gate()
    code = run.finish()
    seconds = time.monotonic() - t0
    assert seconds < 60, f"{seconds:.0f} s from the end of the step to the launcher's exit"
    err = run.stderr
    assert code == EXIT_STOPPED, err
    no_process_left(run)
    ack = lines_with(err, "finishing the current step")
    assert len(ack) == 1 and "saving a checkpoint" in ack[0] and "abort at once" in ack[0], err
    assert "Ctrl-C" in ack[0] or sig != signal.SIGINT
    step4 = run.ckpt / "step-00000004"
    assert lines_with(err, "zshard: stopped") == [
        f"zshard: stopped at step 4 by {sig.name}; checkpoint {step4}; rerun the same command to "
        "resume"
    ], err
    assert "Traceback" not in err
    assert committed_step(run.ckpt) == 4
    verify(step4)
    assert not (run.ckpt / LOCK_KEY).exists()
    if reference is not None:
        rerun = start_run(workdir, "run")  # the same command (the gate only exists in attempt 0)
        assert rerun.finish() == 0, rerun.stderr
        assert committed_step(run.ckpt) == STEPS
        got, want = final_params(run.ckpt), reference()
        assert got.keys() == want.keys()
        for name in got:
            assert torch.equal(got[name], want[name]), f"{name} differs after the resume"
    return {"seconds": seconds}


def preempt_exit(workdir: Path) -> dict[str, float]:
    """``checkpoint.preempt_signal: SIGUSR2`` with ``on_signal: exit``: the ranks stop after
    step 4 without saving; exit 128 + SIGUSR2, the line names the last committed checkpoint."""
    run = start_run(
        workdir,
        "run",
        "--set",
        "checkpoint.preempt_signal=SIGUSR2",
        "--set",
        "checkpoint.on_signal=exit",
        plan={"hold": HOLD_IN_STEP_4},
    )
    run.wait_mark("held")
    os.kill(run.proc.pid, signal.SIGUSR2)
    run.wait_for("the acknowledgement", lambda: acknowledged(run))
    t0 = time.monotonic()
    run.open_gate()
    code = run.finish()
    seconds = time.monotonic() - t0
    err = run.stderr
    assert code == 128 + signal.SIGUSR2, err
    no_process_left(run)
    assert "without saving (checkpoint.on_signal: exit)" in lines_with(err, "finishing")[0]
    assert lines_with(err, "zshard: stopped") == [
        "zshard: stopped at step 4 by SIGUSR2 without saving (checkpoint.on_signal: exit); last "
        f"committed checkpoint {run.ckpt / 'step-00000003'}; rerun the same command to resume"
    ], err
    assert committed_step(run.ckpt) == 3
    return {"seconds": seconds}


def second_signal(workdir: Path) -> dict[str, float]:
    """A second SIGTERM while rank 1 is half-way through the stop's save of step 4: every process
    killed at once, exit 143, one line; step 3 stays the newest committed checkpoint and verifies
    (step 4, never committed, is invisible)."""
    plan = {"hold": HOLD_IN_STEP_4, "stall_save": {"rank": 1, "step": 4}}
    run = start_run(workdir, "run", plan=plan)
    run.wait_mark("held")
    os.kill(run.proc.pid, signal.SIGTERM)
    run.wait_for("the acknowledgement", lambda: acknowledged(run))
    run.open_gate()
    run.wait_mark("saving")  # rank 1 wrote part of step 4 and stalls
    t0 = time.monotonic()
    os.kill(run.proc.pid, signal.SIGTERM)
    code = run.finish(timeout=60)
    seconds = time.monotonic() - t0
    assert seconds < 30, f"{seconds:.0f} s to abort"
    err = run.stderr
    assert code == 128 + signal.SIGTERM, err
    no_process_left(run)
    assert lines_with(err, "zshard: aborted") == [
        "zshard: aborted by a second SIGTERM: every process of the run was killed; last committed "
        f"checkpoint {run.ckpt / 'step-00000003'} (intact); rerun the same command to resume"
    ], err
    assert not lines_with(err, "zshard: stopped")
    assert committed_step(run.ckpt) == 3
    assert (run.ckpt / "step-00000004").exists()  # half written...
    verify(run.ckpt)  # ...and invisible: the root resolves to step 3, which verifies
    return {"seconds": seconds}


def killed_worker(workdir: Path) -> dict[str, float]:
    """Rank 1 SIGKILLs itself in step 5: the run ends within ``dist.timeout_s`` (60 s) with one
    line naming rank 1, SIGKILL and the last committed checkpoint (step 3); no process left."""
    run = start_run(workdir, "run", plan={"kill": {"rank": 1, "call": 13}})
    run.wait_mark("killed")
    t0 = time.monotonic()
    code = run.finish(timeout=120)
    seconds = time.monotonic() - t0
    assert seconds < 60, f"{seconds:.0f} s to end after the kill (dist.timeout_s is 60)"
    err = run.stderr
    assert code == 1, err
    no_process_left(run)
    errors = lines_with(err, "zshard: error:")
    assert len(errors) == 1, err
    assert "training failed: rank 1 (local rank 1, pid" in errors[0]
    assert "was killed by SIGKILL" in errors[0]
    assert f"last committed checkpoint {run.ckpt / 'step-00000003'}" in errors[0]
    assert committed_step(run.ckpt) == 3
    return {"seconds": seconds}


def killed_worker_restarted(workdir: Path, reference: Reference) -> dict[str, float]:
    """As :func:`killed_worker` with ``--max-restarts 1``: one line names rank 1, SIGKILL and the
    checkpoint the restart resumes from (step 3); the run ends bitwise equal to ``reference()``."""
    run = start_run(workdir, "run", "--max-restarts", "1", plan={"kill": {"rank": 1, "call": 13}})
    run.wait_mark("killed")
    t0 = time.monotonic()
    code = run.finish()
    seconds = time.monotonic() - t0
    err = run.stderr
    assert code == 0, err
    no_process_left(run)
    step3 = run.ckpt / "step-00000003"
    restarts = lines_with(err, "restarting from the newest checkpoint")
    assert len(restarts) == 1, err
    assert "rank 1 (local rank 1, pid" in restarts[0] and "killed by SIGKILL" in restarts[0]
    assert f"restarting from the newest checkpoint, {step3} (restart 1 of 1" in restarts[0]
    assert committed_step(run.ckpt) == STEPS
    got, want = final_params(run.ckpt), reference()
    assert all(torch.equal(got[n], want[n]) for n in want), "not bitwise after restart"
    return {"seconds": seconds}


def killed_launcher(workdir: Path) -> dict[str, float]:
    """SIGKILL of the launcher (it cannot react): its agent and workers die with it
    (PR_SET_PDEATHSIG), and the next run takes over the root's lock."""
    run = start_run(workdir, "run", plan={"hold": HOLD_IN_STEP_4})
    run.wait_mark("held")
    run.proc.kill()
    t0 = time.monotonic()
    run.finish(timeout=30)
    deadline = time.monotonic() + 30
    while run.left_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    seconds = time.monotonic() - t0
    no_process_left(run)
    assert committed_step(run.ckpt) == 3
    verify(run.ckpt)
    return {"seconds": seconds}


def disk_full(workdir: Path, on_error: str) -> dict[str, float]:
    """Every write of rank 1 into one periodic save fails with ENOSPC.

    ``stop``: the save of step 6 fails; exit 1 with one line naming rank 1, the step directory,
    the cause and the last committed checkpoint (step 3, intact). ``continue``: the save of step
    4 (every 2 steps) fails; one warning, training goes on, step 6 and 8 are committed.
    """
    if on_error == "stop":
        run = start_run(workdir, "run", plan={"enospc": {"rank": 1, "step": 6}})
        code = run.finish()
        err = run.stderr
        assert code == 1, err
        no_process_left(run)
        errors = lines_with(err, "zshard: error:")
        assert len(errors) == 1, err
        step6, step3 = run.ckpt / "step-00000006", run.ckpt / "step-00000003"
        assert errors[0].startswith(
            f"zshard: error: rank 1: checkpoint step 6 ({step6}) failed: {step6}/"
        ), errors[0]
        assert "no space left on device" in errors[0]
        assert f"last committed checkpoint {step3}" in errors[0]
        assert committed_step(run.ckpt) == 3
        verify(step3)
        return {}
    run = start_run(
        workdir,
        "run",
        "--set",
        "checkpoint.on_error=continue",
        "--set",
        "checkpoint.every=2",
        plan={"enospc": {"rank": 1, "step": 4}},
    )
    assert run.finish() == 0, run.stderr
    no_process_left(run)
    warnings = lines_with(run.stdout, "zshard: warning:")
    assert len(warnings) == 1, run.stdout
    line = warnings[0][warnings[0].index("zshard: warning:") :]
    assert "checkpoint step 4" in line and "no space left on device" in line, line
    assert f"the last committed checkpoint is {run.ckpt / 'step-00000002'}" in line, line
    assert "training continues" in line and "next attempt at step 6" in line, line
    assert committed_step(run.ckpt) == STEPS
    assert not (run.ckpt / "step-00000004" / "manifest.json").exists()
    verify(run.ckpt)
    return {}


# key -> (the fault, what every run of it showed, the scenario)
SCENARIOS: dict[str, tuple[str, str, Callable[..., dict[str, float]]]] = {
    "sigterm": (
        "SIGTERM to `zshard train` during training",
        "step finished on every rank, its checkpoint committed and verified, one line, exit 75, "
        "no process left; rerun bitwise equal to an uninterrupted run",
        lambda d, ref: signal_stop(d, signal.SIGTERM, ref),
    ),
    "sigint": (
        "SIGINT (Ctrl-C) to `zshard train` during training",
        "step finished on every rank, its checkpoint committed and verified, one line, exit 75, "
        "no process left; rerun bitwise equal to an uninterrupted run",
        lambda d, ref: signal_stop(d, signal.SIGINT, ref),
    ),
    "preempt-exit": (
        "`checkpoint.preempt_signal` (SIGUSR2) with `on_signal: exit`",
        "stopped after the step without saving, one line naming the last committed checkpoint, "
        "exit 140, no process left",
        lambda d, ref: preempt_exit(d),
    ),
    "second-signal": (
        "a second SIGTERM while a rank is half-way through the stop's save",
        "every process killed at once, exit 143, one line; the last committed checkpoint intact "
        "and verified, the half-written step invisible",
        lambda d, ref: second_signal(d),
    ),
    "killed-worker": (
        "SIGKILL of one `zshard train` worker, no restarts",
        "run ended within dist.timeout_s with one line naming the rank, SIGKILL and the last "
        "committed checkpoint; no process left",
        lambda d, ref: killed_worker(d),
    ),
    "killed-worker-restarted": (
        "SIGKILL of one `zshard train` worker, `--max-restarts 1`",
        "one line naming the rank, SIGKILL and the checkpoint resumed from; the run finished "
        "bitwise equal to an uninterrupted run",
        killed_worker_restarted,
    ),
    "killed-launcher": (
        "SIGKILL of `zshard train` itself",
        "its agent and workers gone (PR_SET_PDEATHSIG); the last committed checkpoint verified",
        lambda d, ref: killed_launcher(d),
    ),
    "enospc-stop": (
        "ENOSPC during a periodic save (`on_error: stop`)",
        "exit 1 with one line naming the rank, the step directory and the cause; the previous "
        "checkpoint intact and verified",
        lambda d, ref: disk_full(d, "stop"),
    ),
    "enospc-continue": (
        "ENOSPC during a periodic save (`on_error: continue`)",
        "one warning line; training finished, the next saves committed and verified",
        lambda d, ref: disk_full(d, "continue"),
    ),
}


def stop_report(workdir: Path, runs: int) -> list[Any]:
    """Each scenario ``runs`` times, as :class:`tests.reliability._harness.Outcome`s."""
    from tests.reliability._harness import Outcome

    reference = start_reference(workdir / "reference")
    outcomes = []
    for key, (fault, shown, scenario) in SCENARIOS.items():
        out = Outcome(f"{fault} (2 ranks, fp32, ZeRO-1, tiny GPT)")
        t0 = time.monotonic()
        worst = 0.0
        for i in range(runs):
            d = workdir / f"{key}-{i}"
            d.mkdir(parents=True)
            facts = scenario(d, reference)
            worst = max(worst, facts.get("seconds", 0.0))
            out.runs += 1
            out.add(shown)
        if worst:
            out.notes.append(f"longest from the last trigger to the end of the run: {worst:.1f} s")
        out.seconds = time.monotonic() - t0
        outcomes.append(out)
    return outcomes
