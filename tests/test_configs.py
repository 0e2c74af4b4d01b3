"""Built-in configs (``zshard.configs``): resolving a CONFIG argument, and ``zshard init``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import snapshot
from tests.harness import run_cli
from zshard import configs
from zshard.errors import ConfigError
from zshard.train.config import load_config

REPO = Path(__file__).resolve().parent.parent


zshard = run_cli


def assert_one_line_error(r: subprocess.CompletedProcess[str], words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("zshard: error: ") and words in lines[0], lines[0]
    assert r.stdout == ""


# -- resolve --------------------------------------------------------------------------------------


def test_names_lists_the_shipped_yaml_files() -> None:
    assert "tiny" in configs.names()
    assert configs.names() == sorted(configs.names())


@pytest.mark.parametrize("arg", ["tiny", "tiny.yaml", "tiny.yml"])
def test_resolve_a_name_gives_the_packaged_file(arg: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no file of that name here
    path = configs.resolve(arg)
    assert os.path.isabs(path) and os.path.isfile(path)
    assert Path(path) == Path(configs.__file__).parent / "tiny.yaml"


def test_resolve_an_existing_file_is_returned_as_given(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "mine.yaml").write_text("train: {steps: 1}\n")
    (tmp_path / "tiny").write_text("train: {steps: 2}\n")  # a file wins over a built-in name
    monkeypatch.chdir(tmp_path)
    assert configs.resolve("mine.yaml") == "mine.yaml"
    assert configs.resolve("tiny") == "tiny"
    full = str(tmp_path / "mine.yaml")
    assert configs.resolve(full) == full


@pytest.mark.parametrize("arg", ["nope", "nope.yaml", "examples/nope.yaml", "sub/tiny", ""])
def test_resolve_unknown_raises_one_line_config_error(
    arg: str, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        configs.resolve(arg)
    message = str(info.value)
    assert "\n" not in message
    assert repr(arg) in message and "built-in configs: " in message
    assert all(name in message for name in configs.names())


@pytest.mark.parametrize("name", configs.names())
def test_every_builtin_config_loads(name: str) -> None:
    cfg = load_config(configs.resolve(name))
    assert cfg.train.steps > 0


def test_examples_tiny_is_the_packaged_tiny() -> None:
    # A checkout keeps examples/tiny.yaml for `make demo` and the README: the same bytes.
    packaged = (Path(configs.__file__).parent / "tiny.yaml").read_bytes()
    assert (REPO / "examples" / "tiny.yaml").read_bytes() == packaged


# -- zshard init ----------------------------------------------------------------------------------


def test_init_writes_a_loadable_config_and_says_what_next(tmp_path: Path) -> None:
    r = zshard("init", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    written = tmp_path / "tiny.yaml"
    assert "zshard train tiny.yaml" in r.stdout
    text = written.read_text()
    assert text.startswith("# Written by `zshard init tiny`")
    packaged = Path(configs.resolve("tiny")).read_text()
    assert text.endswith(packaged)
    assert yaml.safe_load(text) == yaml.safe_load(packaged)
    assert load_config(str(written)) == load_config(configs.resolve("tiny"))


@pytest.mark.parametrize(
    ("args", "out"),
    [
        (["tiny", "runs/my-run.yaml"], "runs/my-run.yaml"),  # parents created
        (["my.yaml"], "my.yaml"),  # a file name alone is OUT, with the default config
        (["tiny.yaml"], "tiny.yaml"),
    ],
)
def test_init_to_a_named_file(tmp_path: Path, args: list[str], out: str) -> None:
    r = zshard("init", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"zshard train {out}" in r.stdout
    assert load_config(str(tmp_path / out)).train.steps > 0


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text("keep me\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tiny.yaml").write_text("keep me too\n")
    before = snapshot(str(tmp_path))
    for args in (["init"], ["init", "tiny", "tiny.yaml"], ["init", "tiny", "out"]):
        r = zshard(*args, cwd=tmp_path)
        assert_one_line_error(r, "--overwrite")
        assert snapshot(str(tmp_path)) == before
    r = zshard("init", "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert load_config(str(tmp_path / "tiny.yaml")).train.steps > 0


def test_init_unknown_name_writes_nothing(tmp_path: Path) -> None:
    r = zshard("init", "nope", cwd=tmp_path)
    assert_one_line_error(r, "'nope'")
    assert "built-in configs: tiny" in r.stderr
    assert list(tmp_path.iterdir()) == []


# -- train and estimate take a built-in name --------------------------------------------------


def test_train_unknown_config_is_one_line_exit_2(tmp_path: Path) -> None:
    r = zshard("train", "nope", cwd=tmp_path)
    assert_one_line_error(r, "built-in configs: tiny")
    assert list(tmp_path.iterdir()) == []


def test_estimate_takes_a_builtin_name(tmp_path: Path) -> None:
    r = zshard("estimate", "tiny", "-n", "2", "--memory-per-rank", "16GB", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    est = json.loads(r.stdout)
    assert est["params"] > 0 and est["stage"] == 2  # tiny.yaml's model and zero.stage
