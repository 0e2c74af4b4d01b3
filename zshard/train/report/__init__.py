"""Reports about runs: ``zshard estimate`` (per-rank memory of stages 0-3 before anything runs)
and ``zshard plot`` (curves from ``metrics.jsonl``)."""

from zshard.train.report._estimate import (
    Estimate,
    EstimateInput,
    build_input,
    estimate,
    from_config,
    human_bytes,
    parse_memory,
    per_rank,
    render,
)
from zshard.train.report._plot import MissingExtraError, Run, load_run, plot_runs

__all__ = [
    "Estimate",
    "EstimateInput",
    "MissingExtraError",
    "Run",
    "build_input",
    "estimate",
    "from_config",
    "human_bytes",
    "load_run",
    "parse_memory",
    "per_rank",
    "plot_runs",
    "render",
]
