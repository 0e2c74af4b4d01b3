"""Stopping `zshard train`: a signal to the launcher, a second signal, a dead worker, a SIGKILLed
launcher, a failed save. Each scenario (``_stop_runs``) runs real launchers, agents and workers
and asserts as it goes: exit code, one line, the committed checkpoints, ``zshard verify``, no
process of the run left, and for a stop the rerun's parameters equal an uninterrupted run's,
bitwise."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.train import _stop_runs as runs
from zshard.errors import ConfigError
from zshard.train.config import CheckpointConfig


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[runs.Reference]:
    """The parameters after an uninterrupted run of ``runs.STEPS`` steps: the run starts here,
    in the background, and the first test that compares with it waits for it."""
    wait = runs.start_reference(tmp_path_factory.mktemp("reference"))
    yield wait
    # Never leave the run behind, even if every test that needed it failed before asking.
    with contextlib.suppress(AssertionError):
        wait()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_the_step_and_the_rerun_resumes_bitwise(
    tmp_path: Path, reference: runs.Reference, sig: signal.Signals
) -> None:
    runs.signal_stop(tmp_path, sig, reference)


@pytest.mark.slow
def test_the_preempt_signal_with_on_signal_exit_stops_without_saving(tmp_path: Path) -> None:
    runs.preempt_exit(tmp_path)


@pytest.mark.slow
def test_a_second_signal_aborts_mid_save_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    runs.second_signal(tmp_path)


@pytest.mark.slow
def test_a_killed_worker_ends_the_run_naming_the_rank(tmp_path: Path) -> None:
    runs.killed_worker(tmp_path)


@pytest.mark.slow
def test_a_killed_worker_with_max_restarts_resumes_from_the_last_checkpoint(
    tmp_path: Path, reference: runs.Reference
) -> None:
    runs.killed_worker_restarted(tmp_path, reference)


@pytest.mark.slow
def test_a_killed_launcher_takes_its_agent_and_workers_along(tmp_path: Path) -> None:
    runs.killed_launcher(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_disk_full_during_a_periodic_save(tmp_path: Path, on_error: str) -> None:
    runs.disk_full(tmp_path, on_error)


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [("SIGUSR1", "SIGUSR1"), ("usr2", "SIGUSR2"), ("none", None), (None, None)],
)
def test_preempt_signal_names(given: str | None, stored: str | None) -> None:
    assert CheckpointConfig(preempt_signal=given).preempt_signal == stored


def test_bad_stop_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"checkpoint\.preempt_signal"):
        CheckpointConfig(preempt_signal="SIGKILL")
    with pytest.raises(ConfigError, match=r"checkpoint\.on_signal"):
        CheckpointConfig(on_signal="pause")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"checkpoint\.on_error"):
        CheckpointConfig(on_error="ignore")  # type: ignore[arg-type]
