"""`zshard train` under worker failures: a worker SIGKILLed mid-save and then mid-step with
``--max-restarts 2`` restarts the group from the newest committed checkpoint and ends bitwise
equal to an uninterrupted run; a run at 3 ranks killed mid-step resumes at 2 ranks within fp32
noise. While a run holds its checkpoint root, a second ``zshard train`` on it is refused."""

from __future__ import annotations

import pytest

from tests.harness import write_tiny_config
from tests.reliability._harness import elastic_runs
from zshard.cli import main

pytestmark = pytest.mark.slow


def test_killed_workers_restart_resume_exactly_and_hold_the_root(tmp_path, capsys):
    refused: list[str] = []

    def second_run(ckpt: str, launcher_pid: int) -> None:
        cfg = write_tiny_config(tmp_path / "second.yaml", ckpt)
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(["train", str(cfg), "--nproc", "2"])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1, err
        assert "is in use by run" in err[0] and f"pid {launcher_pid}" in err[0], err[0]
        refused.append(err[0])

    out = elastic_runs(str(tmp_path), during_restart=second_run)
    assert out.runs == 2 and len(refused) == 1
