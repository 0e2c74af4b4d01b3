"""The ``zshard`` command line: a thin layer over library functions.

Exit codes: 0 success, 1 failure (e.g. ``verify`` found corruption), 2 bad input — always one
line on stderr, no traceback, nothing written.

Each command imports what it runs inside its function: torch and the training and conversion
code take seconds to import, and ``zshard --help`` or a bad argument should not wait for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer

from zshard.configs import DEFAULT as DEFAULT_CONFIG
from zshard.configs import names as config_names
from zshard.errors import ZshardError

try:  # recent typer runs on its own copy of click, whose exceptions are not click's
    from typer._click import exceptions as click_exceptions
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

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

        def tick(n: int) -> None:
            bar.update(n)

        yield tick


def _nbytes(reader: Any) -> int:
    return sum(t.nbytes for t in reader.manifest.tensors)


TrustPickle = Annotated[
    bool,
    typer.Option(
        help="Allow full unpickling of DeepSpeed/DCP files that a weights-only load refuses "
        "(can run code from the file: only for checkpoints you trust)."
    ),
]
Tag = Annotated[
    str | None, typer.Option(help="DeepSpeed tag to read (default: the one in 'latest').")
]


@app.command("import")
def import_(
    src: Annotated[
        str,
        typer.Argument(
            help="A .safetensors file, a directory with model.safetensors.index.json, a "
            "DeepSpeed checkpoint (save or tag directory) or a torch.distributed.checkpoint "
            "directory (auto-detected)."
        ),
    ],
    ckpt_root: Annotated[str, typer.Argument(help="Checkpoint root to write into (path or URL).")],
    world_size: Annotated[
        int, typer.Option("--world-size", "-n", help="Ranks to lay the checkpoint out for.")
    ],
    stage: Annotated[
        int | None,
        typer.Option(help="ZeRO stage recorded in the layout (0-3; default: DeepSpeed's, else 1)."),
    ] = None,
    tag: Tag = None,
    trust_pickle: TrustPickle = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Import weights (state kind `param`) or DeepSpeed/DCP training state (fp32 `master`,
    optimizer state, step counters) as a committed checkpoint."""
    from zshard.convert.importer import import_source
    from zshard.convert.sources import open_source

    source = open_source(src, tag=tag, trust_pickle=trust_pickle)
    total = sum(t.nbytes for t in source.tensors)
    if stage is None:
        stage = int(getattr(source, "zero_stage", 1))
    with progress_bar(total, "import", quiet) as tick:
        ref = import_source(
            source, ckpt_root, world_size, stage, overwrite=overwrite, progress=tick
        )
    typer.echo(
        f"imported {len(source.tensors)} tensors ({total} bytes, {source.format}) into "
        f"{ref.url} for {world_size} ranks"
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
    before = reader.manifest.layout.world_size
    typer.echo(f"resharded {reader.url} ({before} ranks) -> {ref.url} ({to} ranks)")


@app.command()
def consolidate(
    ckpt: Annotated[
        str,
        typer.Argument(
            help="Checkpoint root (uses latest) or step directory, or a DeepSpeed or "
            "torch.distributed.checkpoint directory (auto-detected)."
        ),
    ],
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
    tag: Tag = None,
    trust_pickle: TrustPickle = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Write consolidated safetensors weights (fp32 master weights where present)."""
    from zshard.convert.consolidate import consolidate as run_consolidate
    from zshard.convert.consolidate import open_checkpoint, select

    source = open_checkpoint(ckpt, tag=tag, trust_pickle=trust_pickle)
    total = sum(t.nbytes for t in select(source, dtype, include_optimizer))
    with progress_bar(total, "consolidate", quiet) as tick:
        files = run_consolidate(
            ckpt,
            out,
            dtype=dtype,
            max_shard_size=max_shard_size,
            include_optimizer=include_optimizer,
            overwrite=overwrite,
            progress=tick,
            source=source,
        )
    typer.echo(f"wrote {total} bytes to {out} ({len(files)} file(s))")


@app.command()
def train(
    config: Annotated[
        str,
        typer.Argument(
            help="Training configuration: a YAML file, or a built-in config's name "
            f"({', '.join(config_names())})."
        ),
    ],
    nproc: Annotated[
        int | None, typer.Option(help="Worker processes on this node (default: GPUs, else 2).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override a key by dotted path: --set zero.stage=3 (repeatable)."
        ),
    ] = None,
    nnodes: Annotated[
        str, typer.Option(help="Number of nodes, or MIN:MAX for elastic runs.")
    ] = "1",
    node_rank: Annotated[
        int | None, typer.Option(help="This node's rank (static rendezvous).")
    ] = None,
    rdzv_endpoint: Annotated[
        str | None, typer.Option(help="HOST:PORT of the rendezvous (default 127.0.0.1:free port).")
    ] = None,
    max_restarts: Annotated[
        int, typer.Option(help="Restart the worker group this often after a failure.")
    ] = 0,
    deepspeed_config: Annotated[
        str | None,
        typer.Option(
            "--deepspeed-config",
            help="DeepSpeed JSON config to start from (keys in the YAML and --set win).",
        ),
    ] = None,
) -> None:
    """Train with ZeRO stages 0-3 on N worker processes (torch.distributed.run).

    On SIGINT (Ctrl-C), SIGTERM, SIGHUP or checkpoint.preempt_signal (default SIGUSR1), every
    rank finishes its step, then a checkpoint of it is committed (checkpoint.on_signal: save,
    the default; exit: none); a second signal aborts at once, keeping the last committed
    checkpoint. No process of the run outlives this command.

    Exit codes: 0 done; 1 training failed (one line: the rank, its signal or error, the last
    committed checkpoint); 2 bad input; 75 stopped by a signal after committing a checkpoint
    (rerun the same command to resume); 128+N ended by signal N without a new checkpoint.
    """
    from zshard.configs import resolve
    from zshard.train.run import LaunchConfig, launch

    opts = LaunchConfig(
        nproc=nproc,
        nnodes=nnodes,
        node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint,
        max_restarts=max_restarts,
        overrides=list(set_ or []),
        deepspeed_config=deepspeed_config,
    )
    code = launch(resolve(config), opts)
    if code:
        raise typer.Exit(code)


@app.command()
def init(
    name: Annotated[
        str,
        typer.Argument(
            help=f"Built-in config to start from: {', '.join(config_names())}. A file name "
            "here (my.yaml) is taken as OUT, with the default config."
        ),
    ] = DEFAULT_CONFIG,
    out: Annotated[
        str | None,
        typer.Argument(help="YAML file to write (default: NAME.yaml here; a directory: inside)."),
    ] = None,
    overwrite: Overwrite = False,
) -> None:
    """Write a built-in training config to a YAML file to edit, and show how to train with it."""
    import shlex

    from zshard.configs import looks_like_path, write_starter

    if out is None and name not in config_names() and looks_like_path(name):
        name, out = DEFAULT_CONFIG, name  # `zshard init my.yaml`
    path = write_starter(name, out, overwrite=overwrite)
    shown = name.removesuffix(".yaml").removesuffix(".yml")
    typer.echo(f"wrote {path} (the built-in config {shown!r})")
    typer.echo(f"next: edit it, then run  zshard train {shlex.quote(path)}")


@app.command()
def demo(
    workdir: Annotated[str, typer.Option(help="Where to write the demo files.")] = "demo-output",
    world_size: Annotated[int, typer.Option(help="Ranks to import for.")] = 4,
    to: Annotated[int, typer.Option(help="Ranks to reshard to.")] = 3,
    overwrite: Overwrite = False,
) -> None:
    """Round-trip a generated model: import -> reshard -> verify -> consolidate -> compare."""
    from zshard.convert.demo import run_demo

    for line in run_demo(workdir, world_size, to, overwrite=overwrite):
        typer.echo(line)


@app.command()
def estimate(
    config: Annotated[
        str | None,
        typer.Argument(
            help="Training configuration (a YAML file or a built-in name); its model is counted "
            "on `meta`."
        ),
    ] = None,
    params: Annotated[
        str | None, typer.Option(help="Parameter count instead of a CONFIG: 7.5e9, 7B, 350M.")
    ] = None,
    world_size: Annotated[
        int | None,
        typer.Option("--world-size", "-n", help="Ranks (default with CONFIG: GPUs, else 2)."),
    ] = None,
    stage: Annotated[
        int | None, typer.Option(help="The stage you plan (default: the CONFIG's zero.stage).")
    ] = None,
    precision: Annotated[
        str | None, typer.Option(help="fp32, bf16 or fp16 (default: the CONFIG's, else bf16).")
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="With --params: adamw (default), adam, or sgd (momentum).")
    ] = None,
    layers: Annotated[
        int | None,
        typer.Option(help="With --params: layers, to size stage-3 buffers (default: guessed)."),
    ] = None,
    offload_optimizer: Annotated[
        bool,
        typer.Option("--offload-optimizer", help="Optimizer state and fp32 master off the rank."),
    ] = False,
    offload_param: Annotated[
        bool,
        typer.Option("--offload-param", help="Stage 3: the parameter partition off the rank."),
    ] = False,
    memory_per_rank: Annotated[
        str | None,
        typer.Option(help="Memory of one rank: 16GB, 16GiB, bytes (default: this machine's)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a CONFIG key: --set model.args.n_layer=24."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Per-rank memory of model states for ZeRO stages 0-3, and the lowest stage that fits."""
    from zshard.configs import resolve
    from zshard.train.report import build_input, render
    from zshard.train.report import estimate as run_estimate

    inp = build_input(
        config=None if config is None else resolve(config),
        params=params,
        world_size=world_size,
        stage=stage,
        precision=precision,
        optimizer=optimizer,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        memory_per_rank=memory_per_rank,
        layers=layers,
        overrides=list(set_ or []),
    )
    est = run_estimate(inp)
    if as_json:
        typer.echo(json.dumps(est.to_json(), indent=2))
        return
    for line in render(est):
        typer.echo(line)


@app.command("ls")
def ls_(
    root: Annotated[str, typer.Argument(help="Checkpoint root (path or URL).")],
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="Also list incomplete (uncommitted) directories.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """List committed checkpoints: step, created, size, world size, stage; `*` marks latest."""
    from zshard.convert.listing import list_checkpoints, render

    listing = list_checkpoints(root)
    if as_json:
        typer.echo(json.dumps(listing.to_json(show_all), indent=2))
        return
    for line in render(listing, show_all):
        typer.echo(line)


@app.command()
def plot(
    runs: Annotated[
        list[str], typer.Argument(help="Run directories (with metrics.jsonl) or metrics files.")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Image to write: .png, .svg or .pdf.")],
    overwrite: Overwrite = False,
) -> None:
    """Plot loss, learning rate, throughput and memory of one or more runs (needs matplotlib)."""
    from zshard.train.report import plot_runs

    drawn = plot_runs(runs, out, overwrite=overwrite)
    typer.echo(f"wrote {out} ({len(drawn)} run(s))")


@app.command()
def tokenize(
    input_: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            help="Local text: a dataset directory (save_to_disk, or data files), or .json/.jsonl/"
            ".txt/.csv/.parquet files or a quoted glob of them.",
        ),
    ],
    out: Annotated[
        str, typer.Argument(help="Token file to write (path or URL); its sidecar is OUT.json.")
    ],
    tokenizer: Annotated[
        str,
        typer.Option(help="Local tokenizer: a save_pretrained directory or a tokenizer.json."),
    ],
    dtype: Annotated[
        str | None,
        typer.Option(help="uint16 or uint32 (default: uint16 if the vocabulary fits)."),
    ] = None,
    text_field: Annotated[str, typer.Option(help="Field holding the text.")] = "text",
    split: Annotated[str, typer.Option(help="Split to tokenize.")] = "train",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Tokenize local text into a flat token file for `data: {name: tokens}` (resumable; nothing
    is downloaded)."""
    from zshard.train.data import tokenize as run_tokenize

    res = run_tokenize(
        input_,
        out,
        tokenizer=tokenizer,
        dtype=dtype,
        text_field=text_field,
        split=split,
        overwrite=overwrite,
        progress=not quiet,
    )
    resumed = f", resumed after {res.resumed_from} documents" if res.resumed_from else ""
    typer.echo(
        f"wrote {res.tokens} tokens ({res.documents} documents, {res.dtype}, vocabulary "
        f"{res.vocab_size}{resumed}) to {res.out}"
    )


def one_line(message: str) -> str:
    """Fold a message onto one line: pipelines and users read errors one line at a time."""
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> None:
    """Console entry point: turn bad input into one line on stderr and exit code 2."""
    try:
        # Without standalone mode click returns the code of a command's `typer.Exit(code)`
        # (verify's exit 1, an interrupt's 130) instead of exiting with it.
        code = app(args=argv, standalone_mode=False)
    except ZshardError as e:
        typer.echo(f"zshard: error: {one_line(str(e))}", err=True)
        sys.exit(2)
    except click_exceptions.NoArgsIsHelpError as e:
        typer.echo(e.format_message())  # the help text: `zshard` alone asks for it
        sys.exit(0)
    except click_exceptions.UsageError as e:
        cmd = f" {e.ctx.info_name}" if e.ctx and e.ctx.parent else ""
        typer.echo(f"zshard: error: {e.format_message()} (see zshard{cmd} --help)", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
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
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
