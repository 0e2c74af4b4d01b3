"""``zshard estimate``: the ZeRO paper's memory formula, the recommendation, the CLI, and the
estimate against the engine's own tensor accounting (``Engine.memory_report``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.harness import run_ranks
from zshard.cli import app, main
from zshard.errors import ZshardError
from zshard.train.models import GPT, GPTConfig, num_params
from zshard.train.report._estimate import (
    EstimateInput,
    ModelStats,
    build_input,
    estimate,
    from_config,
    parse_count,
    parse_memory,
    per_rank,
)

PSI, N = 7_500_000_000, 64  # the ZeRO paper's Figure 1: 7.5B parameters on 64 GPUs


def inp(**kw: object) -> EstimateInput:
    params = int(kw.pop("params", PSI))  # type: ignore[call-overload]
    kw.setdefault("world_size", N)
    return EstimateInput(model=ModelStats.assumed(params), **kw)  # type: ignore[arg-type]


def gb(n: int) -> float:
    return round(n / 1e9, 1)


def test_paper_figure_1_mixed_precision_adam() -> None:
    est = estimate(inp(precision="bf16"))
    per = est.to_json()["per_rank_bytes"]
    assert [gb(per[s]) for s in "0123"] == [120.0, 31.4, 16.6, 1.9]
    assert per["0"] == 16 * PSI
    assert per["1"] == 4 * PSI + 12 * PSI // N
    assert per["2"] == 2 * PSI + 14 * PSI // N
    assert per["3"] == 16 * PSI // N


def test_fp32_adam_has_no_master_copy() -> None:
    est = estimate(inp(precision="fp32"))
    per = [s.model_states for s in est.stages]
    assert per == [16 * PSI, 8 * PSI + 8 * PSI // N, 4 * PSI + 12 * PSI // N, 16 * PSI // N]
    assert est.stages[0].optimizer == 8 * PSI  # exp_avg + exp_avg_sq, no fp32 master


@pytest.mark.parametrize(
    ("precision", "momentum", "k"),
    [("bf16", True, 8), ("fp16", False, 4), ("fp32", True, 4), ("fp32", False, 0)],
)
def test_sgd_state_bytes(precision: str, momentum: bool, k: int) -> None:
    i = inp(precision=precision, optimizer="sgd", momentum=momentum, world_size=4, params=1000)
    assert i.k == k
    assert per_rank(i, 0).optimizer == k * 1000
    assert per_rank(i, 1).optimizer == k * 250


def test_partitions_round_up() -> None:
    i = inp(params=10, world_size=3, precision="bf16")
    s3 = per_rank(i, 3)
    assert (s3.params, s3.grads, s3.optimizer) == (2 * 4, 2 * 4, 12 * 4)


def test_offload_removes_optimizer_state_and_stage3_params() -> None:
    base = estimate(inp())
    off = estimate(inp(offload_optimizer=True, offload_param=True))
    for s in range(4):
        assert off.stages[s].optimizer == 0
        assert off.stages[s].offloaded >= base.stages[s].optimizer
    assert off.stages[2].params == base.stages[2].params  # offload_param is stage 3 only
    assert off.stages[3].params == 0
    assert off.stages[3].model_states == 2 * math.ceil(PSI / N)  # only the grad partition


def test_buffers() -> None:
    """What the engine allocates: the update scratch (512K elements, fp32, twice for bf16 grads);
    2 gradient-bucket slots at stage 2; 2 all-gather slots at stages 1-2 with native (NCCL)
    collectives, none with gloo's all-reduce ones (in place); stage 3's module slots (native).
    """
    scratch = {"update_scratch": (1 << 19) * 4 * 2}
    for mode in ("allreduce", "native"):
        i = inp(reduce_bucket_size=1000, allgather_bucket_size=500, prefetch=2, collectives=mode)
        b = [per_rank(i, s).buffers for s in range(4)]
        gather = {"allgather_bucket": 2 * (500 // N * N) * 2} if mode == "native" else {}
        assert b[0] == scratch
        assert b[1] == {**scratch, **gather}
        assert b[2] == {**scratch, "reduce_bucket": 2 * 1000 * 2, **gather}
        largest = i.model.largest_module
        part = math.ceil(largest / N)  # the slot is padded to N partitions (+ NCCL's output)
        # gloo all-reduces each module gradient where autograd left it: no slots.
        slots = {"module_grad": 2 * part * (N + 1) * 2} if mode == "native" else {}
        assert b[3] == {**scratch, "gathered_modules": 3 * largest * 2, **slots}
    # One rank communicates nothing: no communication buffers.
    assert per_rank(inp(world_size=1), 1).buffers == scratch


def test_recommendation_is_lowest_stage_that_fits() -> None:
    def rec(mem: str) -> int | None:
        return estimate(inp(memory_per_rank=parse_memory(mem))).recommended_stage

    assert rec("200GB") == 0
    assert rec("40GB") == 1
    assert rec("20GB") == 2
    assert rec("16GiB") == 2  # 17.2 GB: stage 2 needs 16.8 GB with its buckets
    assert rec("16GB") == 3
    assert rec("1GB") is None
    tight = estimate(inp(memory_per_rank=parse_memory("3GB")))
    need = tight.min_world_size_stage3()
    assert need is not None and need > N
    assert estimate(inp(world_size=need, memory_per_rank=parse_memory("3GB"))).fits(3)


def test_parse_sizes_and_counts() -> None:
    assert parse_memory("16GB") == 16 * 10**9
    assert parse_memory("16GiB") == 16 * 2**30
    assert parse_memory("16 gib") == 16 * 2**30
    assert parse_memory("80G") == 80 * 10**9
    assert parse_memory("17179869184") == 2**34
    assert parse_count("7.5e9") == parse_count("7.5B") == PSI
    assert parse_count("350M") == 350 * 10**6
    assert parse_count("1_000") == 1000
    for bad in ("", "16XB", "GB", "-1", "0"):
        with pytest.raises(ZshardError):
            parse_memory(bad)
    for bad in ("seven", "7.5Q", "0"):
        with pytest.raises(ZshardError):
            parse_count(bad)


def write_config(tmp_path: Path, **zero: object) -> Path:
    cfg = {
        "model": {"name": "gpt", "args": {"n_layer": 2, "n_head": 2, "d_model": 32}},
        "data": {"seq_len": 16},
        "precision": "bf16",
        "zero": {"stage": 2, **zero},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_mode_counts_the_model_on_meta(tmp_path: Path) -> None:
    path = write_config(tmp_path, param_persistence_threshold=1000)
    i = build_input(
        config=str(path),
        params=None,
        world_size=4,
        stage=None,
        precision=None,
        optimizer=None,
        offload_optimizer=False,
        offload_param=False,
        memory_per_rank="1GB",
        layers=None,
    )
    want = num_params(GPT(GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=32)))
    assert i.model.params == i.model.trainable == want
    assert i.model.counted and i.stage == 2 and i.precision == "bf16"
    assert i.model.largest_module == 256 * 32  # the token embedding (tied to the LM head)
    assert 0 < i.model.persistent < want  # LayerNorms stay whole at stage 3
    assert estimate(i).to_json()["per_rank_bytes"]["0"] == 16 * want


def run_cli(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(app, ["estimate", *args, "--json"])
    assert result.exit_code == 0, result.output
    out: dict[str, object] = json.loads(result.output)
    return out


def test_cli_json_shape(tmp_path: Path) -> None:
    out = run_cli("--params", "7.5B", "--world-size", "64", "--memory-per-rank", "16GB")
    assert {"params", "world_size", "precision", "per_rank_bytes", "buffer_bytes"} <= set(out)
    assert {"total_bytes", "recommended_stage"} <= set(out)
    assert out["params"] == PSI and out["world_size"] == N and out["precision"] == "bf16"
    for key in ("per_rank_bytes", "buffer_bytes", "total_bytes"):
        table = out[key]
        assert isinstance(table, dict) and sorted(table) == ["0", "1", "2", "3"]
    assert out["recommended_stage"] == 3
    out = run_cli(str(write_config(tmp_path)), "-n", "2", "--memory-per-rank", "1GiB")
    assert out["recommended_stage"] == 0 and out["stage"] == 2


def test_cli_table() -> None:
    result = CliRunner().invoke(
        app, ["estimate", "--params", "7.5e9", "-n", "64", "--memory-per-rank", "20GB"]
    )
    assert result.exit_code == 0, result.output
    assert "120.0 GB" in result.output and "31.4 GB" in result.output
    assert "recommended: stage 2" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["estimate"],
        ["estimate", "--params", "7B"],  # no world size
        ["estimate", "--params", "lots", "-n", "2"],
        ["estimate", "--params", "7B", "-n", "2", "--memory-per-rank", "much"],
        ["estimate", "--params", "7B", "-n", "2", "--precision", "fp8"],
        ["estimate", "--params", "7B", "-n", "0"],
        ["estimate", "/nonexistent/cfg.yaml", "-n", "2"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zshard: error:") and "\n" not in err


# -- against the engine's tensor accounting --------------------------------------------------------


def _config(stage: int, precision: str) -> dict[str, object]:
    return {
        "model": {"name": "gpt", "args": {"n_layer": 2, "n_head": 2, "d_model": 32}},
        "data": {"seq_len": 16},
        "precision": precision,
        "zero": {"stage": stage, "param_persistence_threshold": 0},
        "train": {"micro_batch_size": 2},
        "dist": {"backend": "gloo", "device": "cpu"},
    }


def _measure(rank: int, world_size: int, cases: list[tuple[int, str]]) -> list[dict[str, int]]:
    import torch.distributed as dist

    from zshard.train import initialize, load_config
    from zshard.train.models import make_model

    if world_size > 1:
        # One group for every engine: engines join it instead of each creating (and tearing
        # down) their own on the same port.
        dist.init_process_group("gloo")
    out = []
    for stage, precision in cases:
        cfg = load_config(_config(stage, precision))
        args = _model_args(cfg)
        engine = initialize(None, cfg, model_factory=lambda a=args: make_model("gpt", **a).model)
        x = torch.randint(0, 256, (2, 16))
        engine.backward(engine(x, x))
        engine.step()
        out.append(engine.memory_report())
        engine.close()
    return out


def _model_args(cfg: object) -> dict[str, object]:
    args = dict(cfg.model.args)  # type: ignore[attr-defined]
    args.setdefault("seq_len", cfg.data.seq_len)  # type: ignore[attr-defined]
    return args


def _estimated(stage: int, precision: str, world_size: int) -> tuple[int, int]:
    """Estimated model-state bytes, and the number of flat groups (each pads separately)."""
    from zshard.train.config import load_config

    i = from_config(load_config(_config(stage, precision)), world_size)
    groups = len(i.model.gathered_modules) if stage == 3 else 1
    return per_rank(i, stage).model_states, groups


def test_matches_memory_report_world_size_1() -> None:
    cases = [(s, p) for s in range(4) for p in ("fp32", "bf16")]
    for (stage, precision), report in zip(cases, _measure(0, 1, cases)):
        assert report["total"] == _estimated(stage, precision, 1)[0], (stage, precision, report)


@pytest.mark.slow
def test_matches_memory_report_world_size_2() -> None:
    cases = [(1, "bf16"), (2, "bf16"), (3, "bf16"), (3, "fp32")]
    reports = run_ranks(_measure, world_size=2, args=(cases,), timeout=120)
    for rank_reports in reports:
        for (stage, precision), report in zip(cases, rank_reports):
            want, groups = _estimated(stage, precision, 2)
            # Each flat group pads to a multiple of the world size: < 2 elements per rank, at
            # most 16 bytes each (param, grad, master, exp_avg, exp_avg_sq).
            slack = groups * 2 * 16
            assert abs(report["total"] - want) <= slack, (stage, precision, report, want)
