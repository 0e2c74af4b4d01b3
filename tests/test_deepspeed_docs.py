"""docs/deepspeed.md is generated from the DeepSpeed key rules: regenerating it must give the
committed file."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_deepspeed_docs", ROOT / "tools" / "gen_deepspeed_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deepspeed_docs_are_current() -> None:
    text = load_generator().render()
    committed = (ROOT / "docs" / "deepspeed.md").read_text(encoding="utf-8")
    assert text == committed, "docs/deepspeed.md is stale: run `python tools/gen_deepspeed_docs.py`"


def test_every_rule_is_a_row() -> None:
    from zshard.train.config import RULES

    text = load_generator().render()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == len(RULES)
