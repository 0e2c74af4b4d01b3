"""The ``zshard`` command line: a thin layer over library functions.

Exit codes: 0 success, 1 failure (e.g. ``verify`` found corruption), 2 bad input — always one
line on stderr, no traceback, nothing written.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import click
import typer

from zshard.errors import ZshardError

app = typer.Typer(
    name="zshard",
    help="Sharded training state for PyTorch: train with ZeRO 0-3, and import, inspect, verify, "
    "reshard and consolidate checkpoints on local disks or any fsspec URL (s3://, memory://).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output.")]


@contextlib.contextmanager
def progress_bar(total: int, desc: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A tqdm bar in bytes (rate and ETA) on stderr; silent with --quiet or off a terminal."""
    from tqdm import tqdm

    disable = quiet or not sys.stderr.isatty()
    with tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=disable
    ) as bar:
        yield bar.update


def _nbytes(reader: Any) -> int:
    return sum(t.nbytes for t in reader.manifest.tensors)


@app.command("import")
def import_(
    src: Annotated[
        str,
        typer.Argument(
            help="A .safetensors file or a directory with model.safetensors.index.json."
        ),
    ],
    ckpt_root: Annotated[str, typer.Argument(help="Checkpoint root to write into (path or URL).")],
    world_size: Annotated[
        int, typer.Option("--world-size", "-n", help="Ranks to lay the checkpoint out for.")
    ],
    stage: Annotated[int, typer.Option(help="ZeRO stage recorded in the layout (0-3).")] = 1,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Import safetensors weights as a committed checkpoint (state kind `param`)."""
    from zshard.convert.importer import find_sources, import_safetensors

    sources, _ = find_sources(src)
    total = sum(s.entry.end - s.entry.begin for s in sources)
    with progress_bar(total, "import", quiet) as tick:
        ref = import_safetensors(
            src, ckpt_root, world_size, stage, overwrite=overwrite, progress=tick
        )
    typer.echo(
        f"imported {len(sources)} tensors ({total} bytes) into {ref.url} for {world_size} ranks"
    )


@app.command()
def inspect(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint root (uses latest) or step directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Show step, layout, tensors (name, kind, shape, dtype, bytes) and totals."""
    from zshard.convert.inspect import summarize

    info = summarize(ckpt)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"checkpoint  {info['url']}")
    typer.echo(
        f"step {info['step']}  world size {info['world_size']}  stage {info['stage']}  "
        f"format v{info['format_version']}  created {info['created'] or '-'}"
    )
    rows = [
        (t["name"], t["kind"], "x".join(map(str, t["shape"])) or "()", t["dtype"], str(t["bytes"]))
        for t in info["tensors"]
    ]
    header = ("name", "kind", "shape", "dtype", "bytes")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for r in [header, *rows]:
        typer.echo(
            "  ".join(
                c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
        )
    for kind, tot in info["totals"]["by_kind"].items():
        typer.echo(f"total {kind}: {tot['tensors']} tensors, {tot['bytes']} bytes")
    typer.echo(f"total: {info['totals']['tensors']} tensors, {info['totals']['bytes']} bytes")
    for alias, target in info["ties"].items():
        typer.echo(f"tied: {alias} -> {target}")


@app.command()
def verify(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint root (uses latest) or step directory.")],
    all_faults: Annotated[
        bool, typer.Option("--all", help="Keep going and count every fault.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Read every chunk and check crc32c and manifest consistency (exit 1 on any fault)."""
    from zshard.store.reader import CheckpointReader
    from zshard.store.verify import verify as run_verify

    reader = CheckpointReader.open(ckpt)
    with progress_bar(_nbytes(reader), "verify", quiet) as tick:
        report = run_verify(ckpt, all_faults=all_faults, progress=tick)
    if report.ok:
        typer.echo(f"ok: {report.url}: {report.chunks} chunks, {report.bytes_read} bytes verified")
        return
    for fault in report.faults:
        typer.echo(f"fault: {fault}", err=True)
    typer.echo(f"{len(report.faults)} fault(s) in {report.url}", err=True)
    raise typer.Exit(1)


@app.command()
def reshard(
    ckpt: Annotated[
        str, typer.Argument(help="Checkpoint root or step directory (default: here).")
    ] = ".",
    to: Annotated[int, typer.Option("--to", help="World size to lay the checkpoint out for.")] = 0,
    out: Annotated[
        str | None, typer.Option(help="Write under this root instead of next to the source.")
    ] = None,
    stage: Annotated[int | None, typer.Option(help="ZeRO stage to record (default: keep).")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Rewrite a checkpoint for another world size, bitwise, every state kind included."""
    from zshard.convert.reshard import reshard as run_reshard
    from zshard.errors import InvalidArgumentError
    from zshard.store.reader import CheckpointReader

    if to < 1:
        raise InvalidArgumentError(f"--to must be a positive world size, got {to}")
    reader = CheckpointReader.open(ckpt)
    with progress_bar(_nbytes(reader), "reshard", quiet) as tick:
        ref = run_reshard(ckpt, to, out=out, stage=stage, overwrite=overwrite, progress=tick)
    typer.echo(
        f"resharded {reader.url} ({reader.manifest.layout.world_size} ranks) -> {ref.url} ({to} ranks)"
    )


@app.command()
def consolidate(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint root (uses latest) or step directory.")],
    out: Annotated[
        str, typer.Argument(help="OUT.safetensors for one file, else a directory of shards.")
    ],
    dtype: Annotated[
        str, typer.Option(help="fp32, fp16, bf16, or keep (each tensor's stored dtype).")
    ] = "fp32",
    max_shard_size: Annotated[
        str, typer.Option(help="Largest output file, e.g. 5GB, 500MB.")
    ] = "5GB",
    include_optimizer: Annotated[
        bool, typer.Option(help="Also write optimizer state as optimizer.<kind>.<name>.")
    ] = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write consolidated safetensors weights (fp32 master weights where present)."""
    from zshard.convert.consolidate import consolidate as run_consolidate
    from zshard.convert.consolidate import select
    from zshard.store.reader import CheckpointReader

    reader = CheckpointReader.open(ckpt)
    total = sum(t.nbytes for t in select(reader, dtype, include_optimizer))
    with progress_bar(total, "consolidate", quiet) as tick:
        files = run_consolidate(
            ckpt,
            out,
            dtype=dtype,
            max_shard_size=max_shard_size,
            include_optimizer=include_optimizer,
            overwrite=overwrite,
            progress=tick,
        )
    typer.echo(f"wrote {total} bytes to {out} ({len(files)} file(s))")


@app.command()
def demo(
    workdir: Annotated[str, typer.Option(help="Where to write the demo files.")] = "demo-output",
    world_size: Annotated[int, typer.Option(help="Ranks to import for.")] = 4,
    to: Annotated[int, typer.Option(help="Ranks to reshard to.")] = 3,
) -> None:
    """Round-trip a generated model: import -> reshard -> verify -> consolidate -> compare."""
    from zshard.convert.demo import run_demo

    for line in run_demo(workdir, world_size, to):
        typer.echo(line)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: turn bad input into one line on stderr and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except ZshardError as e:
        typer.echo(f"zshard: error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError:
        sys.exit(0)
    except click.UsageError as e:
        cmd = f" {e.ctx.info_name}" if e.ctx and e.ctx.parent else ""
        typer.echo(f"zshard: error: {e.format_message()} (see zshard{cmd} --help)", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        typer.echo("zshard: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("zshard: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        # `zshard inspect ... | head`: the reader left; not an error worth a traceback.
        with contextlib.suppress(Exception):
            sys.stderr.close()
        os._exit(0)


if __name__ == "__main__":
    main()
