"""Stopping a ``zshard train`` run: signals, the stop request, and the ranks' agreement.

Three kinds of process make a run (see ``_launch``): the launcher (``zshard train``), the elastic
agent (``torch.distributed.run``, started by ``_agent.py``) and the workers (``_loop``). Who does
what when the run is asked to stop:

- The **launcher** catches SIGINT, SIGTERM, SIGHUP and ``checkpoint.preempt_signal``. The first
  writes a *stop request* (``stop-request.json`` in the attempt's ``ZSHARD_ERROR_DIR``, a local
  directory every worker of this node reads); a second kills every process of the run at once.
- The **agent** does the same with signals sent to it directly (SLURM signals every task of a
  step; a user may ``kill`` it): the first writes the stop request, the second kills it (its
  workers die with it, below).
- A **worker** polls the stop request once per step and also catches those signals itself
  (the first sets a flag; the handlers are then reset, so a second one kills it at once, even
  inside a collective). Before each step the ranks all-reduce (MAX) the signal they saw, so every
  rank stops at the same step, even across nodes; then they save (``checkpoint.on_signal:
  save``) or not (``exit``), and local rank 0 writes ``stopped.json`` for the launcher.

No process outlives its parent: the agent and each worker ask the kernel for SIGKILL when their
parent dies (``PR_SET_PDEATHSIG``), then check their parent is still the one that started them
(it could have died before the request), so a SIGKILLed launcher takes the whole run with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from types import FrameType
from typing import Any

STOP_REQUEST_FILE = "stop-request.json"  # written by the launcher or the agent
STOPPED_FILE = "stopped.json"  # written by local rank 0 once it stopped (after saving)
LAUNCHER_PID_ENV = "ZSHARD_LAUNCHER_PID"  # the agent's expected parent
AGENT_PID_ENV = "ZSHARD_AGENT_PID"  # the workers' expected parent
PREEMPT_ENV = "ZSHARD_PREEMPT_SIGNAL"  # checkpoint.preempt_signal, for the agent
ERROR_DIR_ENV = "ZSHARD_ERROR_DIR"

# Exit code of `zshard train` stopped by a signal after committing a checkpoint: rerun the same
# command to resume. (EX_TEMPFAIL in sysexits.h: "try again later".) A run that ends on a signal
# without a new checkpoint (`checkpoint.on_signal: exit`, or a second signal) exits 128 + N.
EXIT_STOPPED = 75

BASE_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def stop_signals(preempt: str | None) -> tuple[signal.Signals, ...]:
    """SIGINT, SIGTERM, SIGHUP and the configured preemption signal (a name, e.g. SIGUSR1)."""
    extra = () if not preempt else (signal.Signals[preempt],)
    return tuple(dict.fromkeys(BASE_SIGNALS + extra))


def die_with_parent(expected_parent: int | None) -> None:
    """Ask for SIGKILL when the parent exits (Linux), then leave at once if it already has.

    ``expected_parent``: the pid that started this process (None: only set the death signal).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if expected_parent and os.getppid() != expected_parent:
        os._exit(1)  # our parent died before the request: we are an orphan already


def write_json_atomic(path: str, obj: dict[str, Any]) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def request_stop(error_dir: str, signum: int, source: str) -> None:
    """Ask the workers of this node to stop after their current step (idempotent)."""
    path = os.path.join(error_dir, STOP_REQUEST_FILE)
    if not os.path.exists(path):
        write_json_atomic(path, {"signal": signal_name(signum), "from": source})


class StopSignals:
    """A worker's view of stop requests: its own signal handlers and the launcher's request file.

    ``install`` sets the handlers (main thread only). :meth:`seen` is what this rank knows; the
    ranks agree with :func:`agree`.
    """

    def __init__(self, error_dir: str | None = None) -> None:
        self.error_dir = error_dir if error_dir is not None else os.environ.get(ERROR_DIR_ENV)
        self.signum = 0
        self._installed: list[signal.Signals] = []

    def install(self, signals: tuple[signal.Signals, ...] = BASE_SIGNALS) -> StopSignals:
        for sig in signals:
            if sig in self._installed:
                continue
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: requests come through the file only
                return self
            self._installed.append(sig)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        # The next one kills at once, even while this process waits inside a collective (a
        # Python handler would only run after it returned).
        for sig in self._installed:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, signal.SIG_DFL)

    def seen(self) -> int:
        """The signal this rank was asked to stop by (0: none yet)."""
        if self.signum or not self.error_dir:
            return self.signum
        path = os.path.join(self.error_dir, STOP_REQUEST_FILE)
        if os.path.exists(path):
            name = (read_json(path) or {}).get("signal", "SIGTERM")
            try:
                self.signum = int(signal.Signals[str(name)])
            except KeyError:
                self.signum = int(signal.SIGTERM)
        return self.signum


class SafeStream:
    """A worker's stdout that a vanished reader cannot turn into a crash: after a closed terminal
    (SIGHUP) or a killed pipe (``zshard train ... | tee log`` and Ctrl-C) the progress is dropped,
    and the stop can still save."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return int(self._stream.write(text))
            except (OSError, ValueError):
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self.broken = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@dataclass(frozen=True)
class Agreement:
    """What all ranks agreed on before a step."""

    signum: int  # 0: keep going; else stop now, by this signal
    reporter: int | None  # the rank that reports the last failed save (``on_error: continue``)


def agree(comm: Any, device: Any, signum: int, save_failed: int = 0) -> Agreement:
    """One small all-reduce (MAX) on every rank before each step: the stop signal any rank saw,
    and which rank reports a failed save: the lowest rank whose own write failed, else rank 0.

    ``save_failed``: 0 no failure held back, 1 another rank's failure, 2 this rank's own.
    """
    import torch  # why: the launcher imports this module too, and never needs torch
    import torch.distributed as dist

    rank, world = comm.rank, comm.world_size
    code = {0: 0, 1: 1}.get(save_failed, 2 * (world - rank))
    if world > 1:
        # On the engine's group but not through Comm: the engine's per-step traffic statistics
        # (metrics.jsonl) count the engine's collectives only.
        t = torch.tensor([signum, code], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=comm.group)
        signum, code = int(t[0].item()), int(t[1].item())
    reporter = None if code == 0 else 0 if code == 1 else world - code // 2
    return Agreement(signum, reporter)


def write_stopped(step: int, signum: int, checkpoint: str | None, on_signal: str) -> None:
    """Tell this node's launcher where the run stopped (local rank 0, after any save).

    ``checkpoint``: the newest checkpoint this run committed or resumed from (with
    ``on_signal: save``, the one of ``step`` unless no step was trained at all).
    """
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if not error_dir or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    write_json_atomic(
        os.path.join(error_dir, STOPPED_FILE),
        {
            "step": step,
            "signal": signal_name(signum),
            "checkpoint": checkpoint,
            "on_signal": on_signal,
        },
    )


__all__ = [
    "AGENT_PID_ENV",
    "BASE_SIGNALS",
    "ERROR_DIR_ENV",
    "EXIT_STOPPED",
    "LAUNCHER_PID_ENV",
    "PREEMPT_ENV",
    "STOPPED_FILE",
    "STOP_REQUEST_FILE",
    "Agreement",
    "SafeStream",
    "StopSignals",
    "agree",
    "die_with_parent",
    "read_json",
    "request_stop",
    "signal_name",
    "stop_signals",
    "write_json_atomic",
    "write_stopped",
]
