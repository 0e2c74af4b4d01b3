"""The shared tail of the doc generators: write the generated page, or with ``--check`` fail if
the committed one differs (so a test or CI can tell a stale page from a current one)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def write_or_check(
    out: Path, render: Callable[[], str], tool: str, description: str, argv: list[str] | None
) -> int:
    """Parse ``--check``, then write ``render()`` to ``out`` or compare it; the exit code."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help=f"fail if {out.name} is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = out.read_text(encoding="utf-8") if out.exists() else ""
        if current != text:
            print(f"{out} is out of date; run python tools/{tool}", file=sys.stderr)
            return 1
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0
