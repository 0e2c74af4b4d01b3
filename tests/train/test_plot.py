"""``zshard plot``: two runs' metrics into one valid PNG; bad inputs as one-line errors."""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest

from zshard.cli import main
from zshard.errors import InvalidArgumentError, OutputExistsError
from zshard.train.report import _plot as plot_mod
from zshard.train.report import load_run, plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir: Path, lr: float, speed: float) -> Path:
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(10, 210, 10):
        rec = {
            "step": step,
            "loss": 5.5 * math.exp(-step / 80) + 1.5,
            "lr": lr * min(1.0, step / 30),
            "tokens_per_s": speed + step % 30,
            "step_time_s": 0.5,
            "peak_rss_bytes": (900 + step) << 20,
        }
        if step % 50 == 0:
            rec["val_loss"] = rec["loss"] + 0.1
        lines.append(json.dumps(rec))
    path = run_dir / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    a = write_metrics(tmp_path / "run-a", 3e-3, 4000.0)
    b = write_metrics(tmp_path / "run-b", 1e-3, 3000.0)
    return a, b


def test_two_runs_make_a_valid_png(tmp_path: Path, runs: tuple[Path, Path]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    # A run directory and a metrics file: both name their run by the directory.
    drawn = plot_runs([str(runs[0].parent), str(runs[1])], str(out))
    assert [r.label for r in drawn] == ["run-a", "run-b"]
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 800 and height >= 600
    assert 20_000 < len(data) < 2_000_000
    with pytest.raises(OutputExistsError):
        plot_runs([str(runs[0])], str(out))
    plot_runs([str(runs[0])], str(out), overwrite=True)


def test_cli(tmp_path: Path, runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "cli.png"
    main(["plot", str(runs[0]), str(runs[1]), "-o", str(out)])  # returns: exit code 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {out} (2 run(s))" in capsys.readouterr().out


def test_records_are_read_and_checked(tmp_path: Path, runs: tuple[Path, Path]) -> None:
    run = load_run(str(runs[0]))
    steps, vals = run.series("val_loss")
    assert steps == [50.0, 100.0, 150.0, 200.0] and len(vals) == 4
    bad = tmp_path / "bad" / "metrics.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"step": 1, "loss": 2}\nnot json\n')
    with pytest.raises(InvalidArgumentError, match=r"metrics.jsonl:2"):
        load_run(str(bad))
    bad.write_text("")
    with pytest.raises(InvalidArgumentError, match="no metrics records"):
        load_run(str(bad))
    with pytest.raises(InvalidArgumentError, match=r"no metrics\.jsonl"):
        load_run(str(tmp_path))


@pytest.mark.parametrize(
    "args",
    [
        ["plot", "/nonexistent/run", "-o", "x.png"],
        ["plot", "RUN", "-o", "curves.gif"],
    ],
)
def test_bad_input_is_one_line_exit_2(
    args: list[str],
    runs: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [str(runs[0]) if a == "RUN" else a for a in args]
    args[-1] = str(tmp_path / args[-1])
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zshard: error:") and "\n" not in err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.gif"))


def test_missing_matplotlib_is_one_line(
    tmp_path: Path,
    runs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(runs[0]), "-o", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "zshard: error: install matplotlib (pip install zshard[plot])"
    assert not (tmp_path / "x.png").exists()
    assert plot_mod.MissingExtraError.__mro__[1].__name__ == "ZshardError"
