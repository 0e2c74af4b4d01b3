"""The launcher's side of a run's processes: start one attempt, forward signals, leave no orphan.

An attempt's elastic agent starts in a session of its own (``start_new_session``), so a Ctrl-C
in the terminal (SIGINT to the foreground process group) reaches the launcher alone, which then
decides for the whole run (see ``_stop``): its first SIGINT, SIGTERM, SIGHUP or preemption signal
becomes a stop request that every worker reads before its next step; a second kills every process
of the run at once (SIGKILL: the last committed checkpoint stays as it was, since a checkpoint
exists only once its manifest is committed). The launcher records the run's processes while they
run (its descendants; torch starts each worker in a session of its own, so no process group holds
them all) and returns only when none is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from types import FrameType
from typing import IO, Any

import psutil

from zshard.train.run._stop import LAUNCHER_PID_ENV, request_stop, signal_name, stop_signals

POLL_S = 0.1  # how often the launcher looks at its run: signals, new processes, exit


class ProcessTree:
    """The processes of one attempt: its agent and every descendant seen while it ran."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, float] = {}  # pid -> create time (a recycled pid is not ours)
        self.scan()

    def scan(self) -> None:
        try:
            root = psutil.Process(self.root)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            with contextlib.suppress(psutil.Error):
                self.seen.setdefault(p.pid, p.create_time())

    def alive(self) -> list[psutil.Process]:
        out = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    def kill(self) -> None:
        """SIGKILL the agent first (its workers then die of PR_SET_PDEATHSIG), then the rest."""
        self.scan()
        procs = sorted(self.alive(), key=lambda p: p.pid != self.root)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()

    def finish(self, grace_s: float = 10.0) -> list[int]:
        """Wait until no process of the attempt is left (SIGKILL after ``grace_s``); returns the
        pids that had to be killed."""
        deadline = time.monotonic() + grace_s
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.02)
        killed = []
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
                killed.append(p.pid)
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.wait(5)
        return killed


class RunSignals:
    """The launcher's handlers for the stop signals, for the life of the run (all attempts).

    A handler only records the signal: the launcher's loop acts on it (:meth:`act`), between two
    looks at its run, so nothing runs inside an arbitrary frame of the main thread.
    """

    def __init__(self, preempt: str | None, on_signal: str, saves: bool) -> None:
        self.signals = stop_signals(preempt)
        self.on_signal = on_signal
        self.saves = saves  # a checkpoint.dir is set
        self.received: list[int] = []
        self.handled = 0
        self.aborted = 0  # the signal that aborted the run, if any
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> RunSignals:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread: the caller handles signals
                break
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, previous)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    @property
    def first(self) -> int:
        """The first stop signal received (0: none)."""
        return self.received[0] if self.received else 0

    def act(self, error_dir: str, tree: ProcessTree | None) -> None:
        """Turn new signals into a stop request (the first) or the end of the run (a second)."""
        while self.handled < len(self.received):
            signum = self.received[self.handled]
            self.handled += 1
            if self.handled == 1:
                request_stop(error_dir, signum, "launcher")
                # A closed terminal (SIGHUP) must not turn a graceful stop into a crash.
                with contextlib.suppress(OSError, ValueError):
                    print(self._acknowledge(signum), file=sys.stderr, flush=True)
            elif not self.aborted:
                self.aborted = signum
                if tree is not None:
                    tree.kill()

    def _acknowledge(self, signum: int) -> str:
        name = signal_name(signum)
        what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else f"{name} received"
        again = "press Ctrl-C again" if signum == signal.SIGINT else f"send {name} again"
        if not self.saves:
            then = "then exiting (no checkpoint.dir: nothing is saved)"
        elif self.on_signal == "save":
            then = "then saving a checkpoint"
        else:
            then = "then exiting without saving (checkpoint.on_signal: exit)"
        return f"zshard: {what}: finishing the current step, {then}; {again} to abort at once"


def run_attempt(
    cmd: list[str],
    env: Mapping[str, str],
    stderr: IO[bytes],
    signals: RunSignals,
    error_dir: str,
) -> int:
    """Run one attempt's agent in its own session until it and all its descendants are gone;
    returns its exit code (negative: killed by that signal)."""
    env = {**env, LAUNCHER_PID_ENV: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=env, stderr=stderr, start_new_session=True)
    tree = ProcessTree(proc.pid)
    try:
        while True:
            signals.act(error_dir, tree)
            try:
                code = proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                tree.scan()
    except BaseException:
        tree.kill()  # an error in the launcher itself: leave nothing behind
        proc.wait()
        raise
    finally:
        tree.finish()
    signals.act(error_dir, None)  # a signal during the last poll: no process left to act on
    return code


__all__ = ["POLL_S", "ProcessTree", "RunSignals", "run_attempt"]
