"""ZeRO++ in real gloo process groups: qgZ's hierarchical all-to-all against reduce-scatter, the
exact bytes of every collective, training with qwZ, hpZ, qgZ and all three on 4 ranks in 2 nodes,
fp16 overflow, resuming across world sizes, and two ``zshard train`` launchers as two nodes.

Nodes are simulated on one machine: a rank's ``LOCAL_WORLD_SIZE`` (and ``LOCAL_RANK``) say which
consecutive ranks form a node, which is all the engine (``Comm``, ``ZeroPP``) looks at; the
launcher test starts two real elastic agents (``--nnodes 2 --node-rank {0,1}``).

Training length: 30 steps of a 2-layer GPT (d_model 32, 8 sequences of 32 tokens per step) per
variant. The issue suggests 200; on 2 shared CPU cores (load average ~5) a step of 4 processes
takes about 0.5 s, so five variants x 200 steps would take about 8 minutes, while 30 steps take
about 80 s; by step 30 the loss has fallen from 5.5 to about 3.5 (the fast early phase, where a
systematic error from quantization would show).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.harness import REPO, free_port, run_cli, run_ranks, subprocess_env
from zshard.cli import main
from zshard.store.reader import CheckpointReader
from zshard.train.zero import record_nbytes

try:
    from tests.train import _zeropp_cases as cases
except ModuleNotFoundError:  # tests/train is not a package: pytest put it on sys.path
    import _zeropp_cases as cases  # type: ignore[no-redef]

pytestmark = pytest.mark.slow

STEPS = 30
BLOCK = 2048  # zero.quantization_block_size's default
LOSS_TOL = 0.02  # "within 2% of plain stage 3"


# -- qgZ's all-to-all --------------------------------------------------------------------------


@pytest.mark.parametrize(("world_size", "node_sizes"), [(2, [1, 2]), (3, [1, 3]), (4, [2, 1, 4])])
def test_hierarchical_all_to_all_equals_reduce_scatter(
    world_size: int, node_sizes: list[int]
) -> None:
    """Unquantized, the two hops give a reduce-scatter's sums (fp32 summation order aside);
    quantized, every element is within the sum of both hops' half steps. Node sizes: 2 nodes of
    1 and 1 of 2 (N=2); 3 nodes of 1 and 1 of 3 (N=3: two equal nodes are impossible); 2 nodes
    of 2, 4 of 1 and 1 of 4 (N=4)."""
    res = run_ranks(
        cases.check_hierarchical_reduce, world_size, (node_sizes, [1, 37, 200]), timeout=240
    )
    n = world_size
    for rank, out in enumerate(res):
        assert len(out) == len(node_sizes) * 3 * 5
        for key, r in out.items():
            lsz = int(key.split("-")[0][1:])
            bits = key.split("-")[-1]
            amax = r["amax"]
            if bits == "None":
                # Unquantized: fp32 sums of the same values in another order.
                assert r["max_err"] <= 4 * n * amax * 2**-24, (rank, key, r)
                if lsz in (1, n) and "float32" not in key:
                    assert r["equal"], (rank, key, r)  # bf16 values: every sum exact in fp32
                continue
            q = 127 if bits == "8" else 7
            # Hop 1: each of N values off by at most half its block's step (<= amax / q / 2);
            # hop 2 (nodes > 1 and ranks per node > 1): each node's partial sum, at most
            # L * amax * (1 + 1 / 2q), off by half of its step.
            nodes = n // lsz
            bound = n * amax / (2 * q)
            if nodes > 1 and lsz > 1:
                bound += nodes * lsz * amax * (1 + 1 / (2 * q)) / (2 * q)
            assert r["max_err"] <= bound * (1 + 1e-5), (rank, key, r, bound)
            if lsz in (1, n) and n > 1:
                # One quantized hop only: within N half steps of the global amax.
                assert r["max_err"] <= n * amax / (2 * q) * (1 + 1e-5), (rank, key, r)


# -- training on 4 ranks in 2 nodes ------------------------------------------------------------

N, L = 4, 2
M = N // L


SAVE_AT = 10  # the "all" variant's checkpoint for the resume test below


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every variant's run, and the "all" variant's checkpoint after step ``SAVE_AT``: one
    4-rank run serves every test of this module (training the variants is most of its time)."""
    ckpt = str(tmp_path_factory.mktemp("zeropp") / "zpp")
    calls = [
        (
            "train_variants",
            (L, list(cases.ZEROPP), STEPS, "fp32", STEPS - 1, ("all", SAVE_AT, ckpt)),
        ),
        ("check_fp16_overflow", (L,)),
    ]
    t0 = time.monotonic()
    res = run_ranks(cases.run_all, N, (calls,), timeout=600)
    ranks = [{"train_variants": r[0], "check_fp16_overflow": r[1]} for r in res]
    return {"ranks": ranks, "seconds": time.monotonic() - t0, "ckpt": ckpt}


def _expected_calls(variant: str, out: dict[str, Any]) -> tuple[list[Any], Counter[Any]]:
    """The gathers (in order) and the multiset of gradient collectives that ``variant``'s step
    must have counted, derived from each flat group's partition size and the micro-step marks."""
    zero = cases.ZEROPP[variant]
    qw, hpz, qg = (
        zero.get("quantized_weights", False),
        zero.get("hpz_partition_size", 1) > 1,
        zero.get("quantized_gradients", False),
    )
    parts, isz = out["partitions"], out["itemsize"]
    gathers: list[Any] = []
    seen: set[str] = set()
    for group, _kind, _, _ in out["calls"]:
        if group == "|":
            seen.clear()
            gathers.append(("|", "", 0, 0))
            continue
        if group is None:
            continue
        p = parts[group]
        full = N * p * isz
        if hpz and group in seen:  # the node's secondary partitions: inside the node
            gathers.append((group, "all_gather", full, 0))
        elif qw:
            b = N * record_nbytes(p, BLOCK, 8)
            gathers.append((group, "all_gather", b, b * (N - L) // N))
        else:
            gathers.append((group, "all_gather", full, full * (N - L) // N))
        seen.add(group)
    grads: Counter[Any] = Counter()
    for group in out["reduced"]:
        p = parts[group]
        if qg:
            hop1 = L * record_nbytes(M * p, BLOCK, 8)
            hop2 = M * record_nbytes(p, BLOCK, 8)
            grads[("all_to_all", hop1, 0)] += 1
            grads[("all_to_all", hop2, hop2 * (M - 1) // M)] += 1
        else:
            full = N * p * isz
            grads[("reduce_scatter", full, full * (N - L) // N)] += 1
    return gathers, grads


def test_every_collective_counts_its_exact_bytes(trained: dict[str, Any]) -> None:
    """Each collective of the last step, variant by variant, has exactly the bytes and
    cross-node bytes its kind implies: bf16/fp32 all-gathers of N*P elements, qwZ's N int8
    records, hpZ's node-only gathers after a module's first gather in a micro step, qgZ's two
    hops; and the engine's per-step counters are their sums."""
    for rank, res in enumerate(trained["ranks"]):
        for variant, out in res["train_variants"].items():
            gathers, grads = _expected_calls(variant, out)
            got_gathers = [c for c in out["calls"] if c[0] is not None]
            assert got_gathers == gathers, (rank, variant)
            got_grads = Counter(c[1:] for c in out["calls"] if c[0] is None)
            assert got_grads == grads, (rank, variant)
            # engine.stats() of the same (last) step: the sums, per kind.
            comm = out["stats"]["comm"]
            for kind in ("all_gather", "reduce_scatter", "all_to_all"):
                calls = [c for c in out["calls"] if c[1] == kind]
                assert comm[kind]["calls"] == len(calls), (variant, kind)
                assert comm[kind]["bytes"] == sum(c[2] for c in calls), (variant, kind)
                assert comm[kind]["cross_node_bytes"] == sum(c[3] for c in calls), (variant, kind)


def test_zeropp_cuts_cross_node_bytes(trained: dict[str, Any]) -> None:
    comm = {v: o["stats"]["comm"] for v, o in trained["ranks"][0]["train_variants"].items()}

    def cross(v: str, *kinds: str) -> int:
        return sum(comm[v][k]["cross_node_bytes"] for k in kinds)

    kinds = ("all_gather", "reduce_scatter", "all_to_all")
    # fp32 weights: qwZ's int8 gathers are a quarter of the bytes (plus one scale per block).
    assert comm["qwz"]["all_gather"]["bytes"] < 0.26 * comm["plain"]["all_gather"]["bytes"]
    # hpZ: every backward gather stays inside the node (and so do repeated forward gathers
    # of a tied module): less than half the cross-node gather bytes remain.
    assert cross("hpz", "all_gather") < 0.5 * cross("plain", "all_gather")
    assert comm["hpz"]["all_gather"]["bytes"] == comm["plain"]["all_gather"]["bytes"]
    # qgZ: int8 records of fp32 gradients, and only hop 2 crosses nodes.
    assert cross("qgz", "all_to_all") < 0.26 * cross("plain", "reduce_scatter") / 2
    assert comm["qgz"]["reduce_scatter"]["calls"] == 0
    assert cross("all", *kinds) < 0.25 * cross("plain", *kinds)


def test_each_variant_converges_like_plain_stage_3(trained: dict[str, Any]) -> None:
    res = trained["ranks"][0]["train_variants"]
    plain = res["plain"]["losses"]
    assert plain[-1] < plain[0] - 1.5, plain  # it learns: 5.5 -> about 3.5
    for variant in ("qwz", "hpz", "qgz", "all"):
        losses = res[variant]["losses"]
        assert len(losses) == STEPS
        for step, (a, b) in enumerate(zip(losses, plain)):
            assert abs(a - b) <= LOSS_TOL * b, (variant, step, a, b)
    # The whole test's processes, for the record (the issue asks for under ~2 minutes).
    print(f"5 variants x {STEPS} steps on {N} ranks: {trained['seconds']:.0f} s")


def test_hpz_alone_equals_plain_stage_3(trained: dict[str, Any]) -> None:
    for res in trained["ranks"]:
        plain, hpz = res["train_variants"]["plain"], res["train_variants"]["hpz"]
        np.testing.assert_allclose(hpz["losses"], plain["losses"], rtol=1e-6)
        assert hpz["master"].keys() == plain["master"].keys()
        for key in plain["master"]:
            np.testing.assert_allclose(
                hpz["master"][key], plain["master"][key], rtol=1e-5, atol=1e-6, err_msg=key
            )


def test_memory_report_counts_hpz_secondary_partitions(trained: dict[str, Any]) -> None:
    for res in trained["ranks"]:
        out = res["train_variants"]
        secondary = sum(N * p * 4 // L for p in out["hpz"]["partitions"].values())  # fp32
        assert out["hpz"]["memory"]["hpz_secondary"] == secondary
        assert out["all"]["memory"]["hpz_secondary"] == secondary
        assert out["plain"]["memory"]["hpz_secondary"] == 0
        assert out["qgz"]["memory"]["comm_buffers"] > out["plain"]["memory"]["comm_buffers"]
        assert out["all"]["stats"]["zeropp"] == {
            "node_size": L,
            "nodes": M,
            "quantized_weights": True,
            "hpz_partition_size": 2,
            "quantized_gradients": 8,
            "block": BLOCK,
        }


def test_fp16_overflow_still_skips_the_step(trained: dict[str, Any]) -> None:
    for res in trained["ranks"]:
        r = res["check_fp16_overflow"]
        assert r["stepped"] == [True, True, False, True]
        assert r["skipped"] == 1
        assert r["scales"][2] == r["scales"][1] / 2


# -- checkpoints: unchanged, any world size and stage ------------------------------------------


def test_resume_zeropp_as_plain_stage_3_at_another_world_size(
    tmp_path: Path, trained: dict[str, Any]
) -> None:
    """All three at 4 ranks in 2 nodes (the module's run), saved after step 10; the checkpoint
    resumed at 2 ranks as plain stage 3 and trained to step 20 continues the curve (within 2% of
    both the ZeRO++ run and a plain run at 2 ranks, step by step). The checkpoint holds
    full-precision partitions only, laid out as plain stage 3's."""
    steps, save_at = 20, SAVE_AT
    zpp, plain2 = trained["ckpt"], tmp_path / "plain2"
    a = trained["ranks"][0]["train_variants"]["all"]  # no scheduler: lr constant at any length
    reader = CheckpointReader.open(zpp)
    layout = reader.manifest.layout
    assert (reader.manifest.step, layout.world_size, layout.stage) == (save_at, N, 3)
    assert {t.kind for t in reader.manifest.tensors} == {"param", "exp_avg", "exp_avg_sq"}
    assert {arr.dtype for arr in reader.manifest.arrays} == {"float32"}
    resumed, straight = run_ranks(
        cases.run_all,
        2,
        (
            [
                ("train_and_save", (1, "plain", steps, 0, "", zpp)),
                ("train_and_save", (1, "plain", steps, save_at, str(plain2))),
            ],
        ),
        timeout=300,
    )[0]
    assert (resumed["start"], straight["start"]) == (save_at, 0)
    assert len(resumed["losses"]) == steps - save_at
    for i, loss in enumerate(resumed["losses"]):
        step = save_at + i
        for ref in (a["losses"][step], straight["losses"][step]):
            assert abs(loss - ref) <= LOSS_TOL * ref, (step, loss, ref)
    # Same samples in the same steps: the resumed run keeps falling like the others.
    assert np.mean(resumed["losses"][-5:]) < np.mean(a["losses"][:5]) - 1.0


# -- two launchers as two nodes ----------------------------------------------------------------

TINY = """
model: {name: gpt, args: {n_layer: 2, n_head: 2, d_model: 32}}
data: {name: builtin, seq_len: 32}
train: {steps: STEPS, micro_batch_size: 1, global_batch_size: 8, seed: 7, log_every: 1}
optimizer: {name: adamw, lr: 3.0e-3}
zero: {stage: 3, param_persistence_threshold: 0}
checkpoint: {dir: CKPT, every: 4, keep_last: 5}
"""


def _write(tmp: Path, name: str, ckpt: Path, steps: int) -> Path:
    path = tmp / name
    path.write_text(TINY.replace("STEPS", str(steps)).replace("CKPT", str(ckpt)))
    return path


def _losses(ckpt: Path) -> dict[int, float]:
    lines = (ckpt / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_two_launchers_are_two_nodes_and_resume_plain_stage_3(tmp_path: Path) -> None:
    """A plain stage-3 run on one node of 2 ranks (8 steps, a checkpoint every 4); then two
    ``zshard train --nnodes 2 --node-rank {0,1} --rdzv-endpoint 127.0.0.1:PORT`` launchers of
    2 ranks each resume its step-4 checkpoint with qwZ, hpZ and qgZ at world size 4: two nodes
    (LOCAL_WORLD_SIZE 2), collectives counted across them, and the curve continues the plain
    run's within 2%. Default collectives (gloo: built on all-reduce) here."""
    plain = tmp_path / "plain"
    cfg = _write(tmp_path, "plain.yaml", plain, 8)
    env = subprocess_env(OMP_NUM_THREADS="1")
    first = run_cli("train", cfg, "--nproc", "2", env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    zpp = tmp_path / "zpp"
    cfg2 = _write(tmp_path, "zpp.yaml", zpp, 8)
    port = free_port()
    sets = [
        "--set",
        "zero.quantized_weights=true",
        "--set",
        "zero.quantized_gradients=true",
        "--set",
        "zero.hpz_partition_size=2",
        "--set",
        f"checkpoint.resume={plain}/step-00000004",
    ]
    full_env = dict(env, PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "zshard.cli", "train", str(cfg2), "--nproc", "2"),
                *("--nnodes", "2", "--node-rank", str(node)),
                *("--rdzv-endpoint", f"127.0.0.1:{port}", *sets),
            ],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    reader = CheckpointReader.open(str(zpp))
    layout = reader.manifest.layout
    assert (reader.manifest.step, layout.world_size, layout.stage) == (8, 4, 3)
    records = [json.loads(x) for x in (zpp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 6, 7, 8]
    # Rank 0's node has ranks 0-1: half of a 4-rank all-reduce's traffic crosses nodes.
    assert all(r["comm_cross_node_bytes"] > 0 for r in records)
    assert all(r["comm_bytes"]["all_to_all"] > 0 for r in records)
    ref, got = _losses(plain), _losses(zpp)
    for step in (5, 6, 7, 8):
        assert abs(got[step] - ref[step]) <= LOSS_TOL * ref[step], (step, got, ref)


BAD = [
    (["--set", "zero.stage=2", "--set", "zero.quantized_weights=true"], "got stage 2"),
    (["--set", "zero.hpz_partition_size=4"], "4 exceeds the 2 ranks of a node"),
    (
        [
            "--nproc",
            "3",
            "--set",
            "zero.hpz_partition_size=2",
            "--set",
            "train.global_batch_size=6",
        ],
        "2 does not divide the world size 3",
    ),
]


def _check_one_line_exit_2(code: object, stderr: str, needle: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(re.escape(needle), lines[0]), stderr


@pytest.mark.parametrize(("args", "needle"), BAD)
def test_bad_zeropp_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    """The command's entry point in this process: a subprocess costs seconds of imports per
    case, and the test below runs the real command."""
    ckpt = tmp_path / "run"
    cfg = _write(tmp_path, "cfg.yaml", ckpt, 2)
    base = ["--nproc", "2"] if "--nproc" not in args else []
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["train", str(cfg), *base, *args])
    _check_one_line_exit_2(info.value.code, capsys.readouterr().err, needle)
    assert not ckpt.exists()


def test_bad_zeropp_input_through_the_command_is_one_line_exit_2(tmp_path: Path) -> None:
    args, needle = BAD[0]
    ckpt = tmp_path / "run"
    cfg = _write(tmp_path, "cfg.yaml", ckpt, 2)
    proc = run_cli("train", cfg, "--nproc", "2", *args, timeout=120)
    _check_one_line_exit_2(proc.returncode, proc.stderr, needle)
    assert not ckpt.exists()
