"""``zshard ls``: committed checkpoints from their manifests, the latest marked, incomplete
directories only on request, and bad roots as one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import write_checkpoint
from zshard.cli import app, main
from zshard.convert.listing import list_checkpoints
from zshard.errors import CheckpointNotFoundError, NotACheckpointError

STATE = {
    "param": {
        "w": torch.zeros(10, 3, dtype=torch.bfloat16),
        "b": torch.zeros(5, dtype=torch.bfloat16),
    },
    "exp_avg": {"w": torch.zeros(10, 3), "b": torch.zeros(5)},
}
TENSOR_BYTES = (30 + 5) * 2 + (30 + 5) * 4  # logical bytes: bf16 params, fp32 state


@pytest.fixture
def root(tmp_path: Path) -> str:
    r = str(tmp_path / "run")
    write_checkpoint(r, 100, STATE, 2, stage=1)
    write_checkpoint(r, 200, STATE, 3, stage=2)
    os.makedirs(os.path.join(r, "step-00000300", "data"))  # a save that died before commit
    return r


def test_lists_committed_checkpoints_from_their_manifests(root: str) -> None:
    listing = list_checkpoints(root)
    rows = listing.checkpoints
    assert [(c.step, c.name) for c in rows] == [(100, "step-00000100"), (200, "step-00000200")]
    assert [(c.world_size, c.stage) for c in rows] == [(2, 1), (3, 2)]
    assert all(c.bytes == TENSOR_BYTES and c.tensors == 4 and c.created for c in rows)
    assert [c.latest for c in rows] == [False, True]
    assert listing.latest == "step-00000200"
    assert listing.incomplete == ["step-00000300"]


def test_latest_marks_what_latest_resolves_to(root: str) -> None:
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step-00000100\n")  # stale pointer: readers use the newest committed step
    assert list_checkpoints(root).latest == "step-00000200"


def test_table_and_all(root: str) -> None:
    runner = CliRunner()
    out = runner.invoke(app, ["ls", root]).output
    lines = out.splitlines()
    assert any(line.startswith("*") and "step-00000200" in line for line in lines)
    assert any("step-00000100" in line and not line.startswith("*") for line in lines)
    assert "1 incomplete directory not shown (--all)" in out
    assert "step-00000300" not in out
    out = runner.invoke(app, ["ls", root, "--all"]).output
    assert "incomplete (not a checkpoint" in out and "step-00000300" in out


def test_json(root: str) -> None:
    result = CliRunner().invoke(app, ["ls", root, "--json", "--all"])
    doc = json.loads(result.output)
    assert doc["latest"] == "step-00000200"
    assert [c["step"] for c in doc["checkpoints"]] == [100, 200]
    first = doc["checkpoints"][0]
    assert {"name", "step", "created", "bytes", "world_size", "stage", "latest"} <= set(first)
    assert doc["incomplete"] == ["step-00000300"]
    plain = json.loads(CliRunner().invoke(app, ["ls", root, "--json"]).output)
    assert "incomplete" not in plain


def test_a_bad_manifest_does_not_hide_the_others(root: str) -> None:
    with open(os.path.join(root, "step-00000100", "manifest.json"), "wb") as f:
        f.write(b"garbage")
    rows = list_checkpoints(root).checkpoints
    assert rows[0].error and "manifest" in rows[0].error
    assert rows[1].bytes == TENSOR_BYTES
    out = CliRunner().invoke(app, ["ls", root]).output
    assert "unreadable" in out


def test_memory_url(memory_root: str) -> None:
    write_checkpoint(memory_root, 7, STATE, 1)
    assert [c.step for c in list_checkpoints(memory_root).checkpoints] == [7]


def test_bad_roots(tmp_path: Path, root: str) -> None:
    with pytest.raises(CheckpointNotFoundError):
        list_checkpoints(str(tmp_path / "missing"))
    with pytest.raises(NotACheckpointError, match="list its parent"):
        list_checkpoints(os.path.join(root, "step-00000100"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotACheckpointError, match="not a checkpoint root"):
        list_checkpoints(str(tmp_path / "empty"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotACheckpointError):
        list_checkpoints(str(tmp_path / "file"))


def test_only_incomplete_is_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "step-00000001").mkdir()
    listing = list_checkpoints(str(tmp_path))
    assert listing.checkpoints == [] and listing.latest is None
    out = CliRunner().invoke(app, ["ls", str(tmp_path)]).output
    assert "no committed checkpoints" in out


def test_cli_bad_root_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["ls", str(tmp_path / "missing")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zshard: error:") and "\n" not in err
