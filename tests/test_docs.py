"""docs/cli.md is generated from the typer app: regenerating it must give the committed file."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_cli_docs", ROOT / "tools" / "gen_cli_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_docs_are_current() -> None:
    text = load_generator().render()
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert text == committed, "docs/cli.md is stale: run `python tools/gen_cli_docs.py`"


def test_every_command_is_documented() -> None:
    import typer.main

    from zshard.cli import app

    text = load_generator().render()
    for name in typer.main.get_command(app).commands:  # type: ignore[attr-defined]
        assert f"## zshard {name}\n" in text
