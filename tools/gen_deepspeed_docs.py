"""Generate docs/deepspeed.md from the DeepSpeed key rules, so the table never drifts from the code.

Run from the repository root after changing the key table (``zshard/train/config/_ds_table*.py``)::

    python tools/gen_deepspeed_docs.py           # rewrite docs/deepspeed.md
    python tools/gen_deepspeed_docs.py --check   # exit 1 if docs/deepspeed.md is out of date

Every row comes from ``zshard.train.config.RULES`` (the data the mapping code dispatches on).
``tests/test_deepspeed_docs.py`` regenerates the text in memory and compares it with the
committed file.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tools._docgen import write_or_check  # noqa: E402

OUT = ROOT / "docs" / "deepspeed.md"

INTRO = """\
# DeepSpeed configs in zshard

`zshard train CONFIG.yaml --deepspeed-config ds_config.json` (or `deepspeed: ds_config.json` in
the YAML) reads a DeepSpeed JSON config. **Every DeepSpeed key gets one of three treatments**:

- **honoured**: zshard does what DeepSpeed does with it, either through the zshard key in the
  third column or because zshard always behaves that way (for some keys only with the values
  listed first: other values are refused or warned about, as the row says);
- **refused**: the run does not start; one line names the key and what zshard supports instead,
  and the exit code is 2;
- **warning**: accepted, and named in one warning line at start-up, only for keys that cannot
  change the training result (logging, monitors, profilers, speed and memory knobs).

A key that is not in this table is refused. `"auto"` (the Hugging Face Trainer convention) leaves
a key to zshard: its zshard default, or the value the zshard YAML sets; the warning line says
what each `"auto"` became. Precedence, lowest first: zshard defaults < the DeepSpeed config <
keys set in the zshard YAML < `--set`; every DeepSpeed value the YAML overrides is named in the
warning line too. The semantics are DeepSpeed 0.19's: fp16 loss scaling is DeepSpeed's
`DynamicLossScaler` step for step, the schedules are DeepSpeed's formulas on DeepSpeed's clock,
the optimizers default as DeepSpeed's classes do. This file is generated from the mapping code
(`python tools/gen_deepspeed_docs.py`); a test keeps it current.

| DeepSpeed key | treatment | zshard key | notes |
|---|---|---|---|
"""


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def render() -> str:
    from zshard.train.config import RULES

    rows = []
    for rule in RULES.values():
        zshard = f"`{rule.zshard}`" if rule.zshard else ""
        note = "; ".join(x for x in (rule.note, rule.caveat) if x)
        rows.append(
            f"| `{rule.key}` | {_cell(rule.doc_treatment())} | {_cell(zshard)} | {_cell(note)} |"
        )
    return INTRO + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    return write_or_check(OUT, render, "gen_deepspeed_docs.py", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
