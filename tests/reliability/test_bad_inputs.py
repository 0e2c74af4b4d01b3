"""One table of bad inputs across every command and the training configuration: each gives
exit code 2, exactly one line on stderr (``zshard: error: ...`` with the expected words), no
traceback, nothing on stdout, and changes no file.

The catalogues of tests/test_cli.py (store and conversion commands) and
tests/train/test_launch.py (training configurations) are reused as they are, and extended here
with the commands they do not cover (train options, estimate, ls, plot), locked roots and bad
environment settings. The cases run in-process through ``zshard.cli.main`` (the console entry
point), so the whole table takes seconds; the subprocess runs of the original tables stay in
their own files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import save_file

from tests.conftest import awkward_state_dict, snapshot
from tests.harness import write_tiny_config
from tests.reliability._harness import forge_lock
from tests.test_cli import BAD as CLI_BAD
from tests.test_cli import TIES, _bad_workspace
from tests.train.test_launch import BAD_CONFIGS
from zshard.cli import main
from zshard.convert.importer import import_safetensors
from zshard.convert.safetensors_io import TIES_METADATA_KEY

# (argv, cwd relative to the workspace, words the one line must contain, extra environment)
Case = tuple[list[str], str, str, dict[str, str]]

TABLE: dict[str, Case] = {f"cli: {k}": (a, cwd, w, {}) for k, (a, cwd, w) in CLI_BAD.items()}
TABLE.update(
    {
        f"config: {needle} ({i})": (["train", f"badcfg{i}.yaml", "--nproc", "2"], ".", needle, {})
        for i, (_, needle) in enumerate(BAD_CONFIGS)
    }
)
TABLE.update(
    {
        # train: options and files
        "train missing config": (["train", "nope.yaml"], ".", "does not exist", {}),
        "train --nproc 0": (["train", "good.yaml", "--nproc", "0"], ".", "--nproc", {}),
        "train --max-restarts -1": (
            ["train", "good.yaml", "--max-restarts", "-1"], ".", "--max-restarts", {},
        ),
        "train --set without =": (
            ["train", "good.yaml", "--set", "zero.stage"], ".", "dotted.key=value", {},
        ),
        "train --set unknown key": (["train", "good.yaml", "--set", "bogus.x=1"], ".", "bogus", {}),
        "train --set bad value": (
            ["train", "good.yaml", "--set", "zero.stage=9"], ".", "zero.stage", {},
        ),
        "train missing deepspeed config": (
            ["train", "good.yaml", "--deepspeed-config", "nope.json"], ".", "nope.json", {},
        ),
        "train --nproc not a number": (
            ["train", "good.yaml", "--nproc", "two"], ".", "--nproc", {},
        ),
        "train into a locked root": (["train", "good.yaml", "--nproc", "2"], ".", "in use by", {}),
        # estimate
        "estimate nothing to count": (["estimate"], ".", "exactly one", {}),
        "estimate both config and --params": (
            ["estimate", "good.yaml", "--params", "7B"], ".", "exactly one", {},
        ),
        "estimate --params without world size": (
            ["estimate", "--params", "7B"], ".", "--world-size", {},
        ),
        "estimate bad --params": (["estimate", "--params", "lots", "-n", "2"], ".", "lots", {}),
        "estimate --world-size 0": (
            ["estimate", "--params", "7B", "-n", "0"], ".", "--world-size", {},
        ),
        "estimate --stage 4": (["estimate", "--params", "7B", "-n", "2", "--stage", "4"], ".",
                               "--stage", {}),
        "estimate --precision fp8": (
            ["estimate", "--params", "7B", "-n", "2", "--precision", "fp8"], ".", "--precision", {},
        ),
        "estimate --optimizer lion": (
            ["estimate", "--params", "7B", "-n", "2", "--optimizer", "lion"], ".", "lion", {},
        ),
        "estimate bad memory size": (
            ["estimate", "--params", "7B", "-n", "2", "--memory-per-rank", "lots"], ".", "memory",
            {},
        ),
        "estimate --layers 0": (
            ["estimate", "--params", "7B", "-n", "2", "--layers", "0"], ".", "--layers", {},
        ),
        "estimate missing config": (["estimate", "nope.yaml"], ".", "does not exist", {}),
        # ls
        "ls missing root": (["ls", "nope"], ".", "no such checkpoint root", {}),
        "ls a file": (["ls", "src.safetensors"], ".", "is a file", {}),
        "ls a step directory": (["ls", "ckpt/step-00000000"], ".", "not a checkpoint root", {}),
        "ls not a root": (["ls", "notckpt"], ".", "not a checkpoint root", {}),
        "ls without root": (["ls"], ".", "Missing argument", {}),
        # plot
        "plot missing run": (["plot", "nope", "-o", "x.png"], ".", "no such run", {}),
        "plot bad extension": (["plot", "run", "-o", "x.gif"], ".", ".png", {}),
        "plot without --out": (["plot", "run"], ".", "--out", {}),
        "plot existing output": (["plot", "run", "-o", "exists.png"], ".", "--overwrite", {}),
        "plot malformed metrics": (["plot", "badrun", "-o", "y.png"], ".", "not a JSON object", {}),
        # writes into a root another run holds
        "import into a locked root, even with --overwrite": (
            ["import", "src.safetensors", "locked", "-n", "2", "--overwrite"], ".", "in use by",
            {},
        ),
        "reshard next to a locked source": (
            ["reshard", "locked", "--to", "3"], ".", "in use by", {},
        ),
        # environment
        "bad ZSHARD_RETRIES": (
            ["inspect", "memory://nothing"], ".", "ZSHARD_RETRIES", {"ZSHARD_RETRIES": "many"},
        ),
        "bad ZSHARD_RETRY_BASE_S": (
            ["inspect", "memory://nothing"], ".", "ZSHARD_RETRY_BASE_S",
            {"ZSHARD_RETRY_BASE_S": "-1"},
        ),
        "bad ZSHARD_LOCK_TIMEOUT_S": (
            ["import", "src.safetensors", "fresh", "-n", "2"], ".", "ZSHARD_LOCK_TIMEOUT_S",
            {"ZSHARD_LOCK_TIMEOUT_S": "soon"},
        ),
    }
)  # fmt: skip


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """Every input of the table, laid out once; each case runs on a copy."""
    tmp = tmp_path_factory.mktemp("bad")
    sd = awkward_state_dict(7)
    save_file(sd, str(tmp / "src.safetensors"),
              metadata={"format": "pt", TIES_METADATA_KEY: json.dumps(TIES)})  # fmt: skip
    import_safetensors(str(tmp / "src.safetensors"), str(tmp / "ckpt"), 2)
    _bad_workspace(tmp)
    ckpt = tmp / "trainrun"
    for i, (text, _) in enumerate(BAD_CONFIGS):
        body = text.replace("CKPT", str(ckpt)).replace("NOWHERE", str(tmp / "nowhere"))
        (tmp / f"badcfg{i}.yaml").write_text(body)
    write_tiny_config(tmp / "good.yaml", tmp / "lockedrun")
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    (tmp / "badrun").mkdir()
    (tmp / "badrun" / "metrics.jsonl").write_text("not json\n")
    (tmp / "exists.png").write_bytes(b"keep me")
    import_safetensors(str(tmp / "src.safetensors"), str(tmp / "locked"), 2)
    return tmp


@pytest.mark.parametrize("case", list(TABLE))
def test_bad_input(case, template, monkeypatch, capsys):
    # One workspace for the whole table: every case must leave it byte for byte as it was, so
    # sharing it costs nothing and a case that writes fails right there.
    argv, cwd, words, env = TABLE[case]
    ws = template
    # Roots held by another live run on this host (the pytest process's parent).
    for root in ("locked", "lockedrun"):
        forge_lock(str(ws / root), pid=os.getppid())
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(ws / cwd)
    before = snapshot(str(ws))
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr()
    assert info.value.code == 2, (case, info.value.code, err.err)
    lines = err.err.splitlines()
    assert len(lines) == 1, err.err
    assert lines[0].startswith("zshard: error: ") and words in lines[0], lines[0]
    assert "Traceback" not in err.err and err.out == ""
    assert snapshot(str(ws)) == before


def test_the_table_covers_every_command():
    commands = {argv[0] for argv, *_ in TABLE.values() if argv}
    assert {"import", "inspect", "verify", "reshard", "consolidate", "train", "estimate", "ls",
            "plot"} <= commands  # fmt: skip
    assert len(TABLE) >= 30
