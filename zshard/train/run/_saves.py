"""The training loop's saves: periodic ones under ``checkpoint.on_error``, and the last one.

A save commits last and atomically (the store's manifest), so a save that fails (disk full,
permission denied, an unreachable object store) never touches the checkpoints committed before
it. Every rank learns of the failure at the same point (the engine's save phases end with an
agreement among ranks; an async save's failure is re-raised by the next wait), so every rank
takes the same branch here:

- ``on_error: stop`` (default): raise :class:`SaveFailed`; the run ends with one line naming the
  step directory and the cause (the launcher adds the last committed checkpoint).
- ``on_error: continue``: keep training; the rank whose write failed reports it (one line, on
  stdout with the progress) at the next step, and the next interval saves again. The last save
  of a run (at its end, or when stopped) is never skipped: its failure always stops the run.
"""

from __future__ import annotations

import sys
from typing import Any

from zshard.errors import ZshardError
from zshard.store.root import join_url, step_dir_name
from zshard.train.config import CheckpointConfig


class SaveFailed(ZshardError):
    """A checkpoint save failed. A run failure (exit 1), not bad input."""

    def __init__(self, message: str, *, secondary: bool = False) -> None:
        super().__init__(message)
        self.secondary = secondary  # this rank only learnt that another rank failed


def _is_secondary(exc: BaseException) -> bool:
    # The engine's save phases raise this on the ranks whose own part went well.
    return type(exc) is ZshardError and "another rank failed" in str(exc)


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, ZshardError) else f"{type(exc).__name__}: {text}"


class Saves:
    """Saves of one training run into ``checkpoint.dir`` (``root``).

    Args:
        engine: the engine (``save``, ``checkpointer``, ``wait_for_save``, ``global_step``).
        cfg: the checkpoint section.
        last: the newest committed checkpoint of ``root`` this run knows (its resume point), or
            None.
    """

    def __init__(self, engine: Any, cfg: CheckpointConfig, last: str | None) -> None:
        assert cfg.dir
        self.engine, self.cfg, self.root = engine, cfg, cfg.dir
        self.last_url = last
        self.last_step: int | None = engine.global_step if last else None
        self._pending: tuple[int, str] | None = None  # an async save in flight
        self.failure: SaveFailed | None = None  # not reported yet (on_error: continue)

    def url(self, step: int) -> str:
        return join_url(self.root, step_dir_name(step))

    def periodic(self) -> None:
        """The save every ``checkpoint.every`` steps (async if configured)."""
        self._settle()
        step = self.engine.global_step
        try:
            url = self.engine.save(self.root)
        except (ZshardError, OSError) as e:
            self._failed(step, e)
            return
        if self.cfg.async_save:
            self._pending = (step, url)
        else:
            self._committed(step, url)

    def last(self) -> str:
        """The final save (synchronous), unless this step is committed already. Its failure
        raises :class:`SaveFailed` whatever ``on_error`` says: nothing would retry it."""
        self._settle()
        step = self.engine.global_step
        if self.last_step == step and self.last_url:
            return self.last_url
        try:
            url = self.engine.checkpointer.save(self.root, async_save=False)
        except (ZshardError, OSError) as e:
            raise self._error(step, e) from e
        self._committed(step, url)
        return url

    def settled(self) -> str | None:
        """Wait for an async save in flight; the newest checkpoint this run knows committed."""
        self._settle()
        return self.last_url

    def report(self, reporter: int | None, rank: int) -> None:
        """Show the failure held back under ``on_error: continue`` (on the agreed rank only)."""
        failure, self.failure = self.failure, None
        if failure is None or reporter != rank:
            return
        every = self.cfg.every
        nxt = f", next attempt at step {(self.engine.global_step // every + 1) * every}"
        last = f"the last committed checkpoint is {self.last_url}" if self.last_url else "none yet"
        from tqdm import tqdm  # why: writes around rank 0's progress bar

        tqdm.write(
            f"zshard: warning: {failure}; {last}; training continues (checkpoint.on_error: "
            f"continue){nxt if every else ''}",
            file=sys.stdout,
        )

    def failed_code(self) -> int:
        """For the ranks' agreement: 0 no failure, 1 another rank's, 2 this rank's own."""
        if self.failure is None:
            return 0
        return 1 if self.failure.secondary else 2

    # -- internals -------------------------------------------------------------------------

    def _settle(self) -> None:
        if self._pending is None:
            return
        step, url = self._pending
        self._pending = None
        try:
            self.engine.wait_for_save()
        except (ZshardError, OSError) as e:
            self._failed(step, e)
            return
        self._committed(step, url)

    def _committed(self, step: int, url: str) -> None:
        self.last_step, self.last_url = step, url

    def _error(self, step: int, exc: BaseException) -> SaveFailed:
        return SaveFailed(
            f"checkpoint step {step} ({self.url(step)}) failed: {_cause(exc)}; nothing of it "
            "was committed",
            secondary=_is_secondary(exc),
        )

    def _failed(self, step: int, exc: BaseException) -> None:
        error = self._error(step, exc)
        if self.cfg.on_error != "continue":
            raise error from exc
        self.failure = error


__all__ = ["SaveFailed", "Saves"]
