"""`zshard demo` never replaces its outputs without --overwrite: one line, exit 2, nothing
written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.harness import run_cli
from zshard.convert.demo import OUTPUTS, run_demo
from zshard.errors import OutputExistsError


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_demo_refuses_to_overwrite(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    work.mkdir()
    (work / "ckpt").mkdir()  # any one output is enough to refuse
    (work / "ckpt" / "keep.txt").write_text("mine")
    before = _snapshot(work)
    proc = run_cli("demo", "--workdir", str(work), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "already holds demo output (ckpt)" in lines[0]
    assert "--overwrite" in lines[0] and proc.stdout == ""
    assert _snapshot(work) == before  # nothing written


def test_demo_runs_fresh_then_needs_overwrite(tmp_path: Path) -> None:
    work = str(tmp_path / "demo")
    lines = list(run_demo(work, world_size=2, to=3))
    assert lines[-1] == "demo ok"
    assert sorted(os.listdir(work)) == sorted(OUTPUTS)
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        list(run_demo(work, world_size=2, to=3))
    assert list(run_demo(work, world_size=2, to=3, overwrite=True))[-1] == "demo ok"
