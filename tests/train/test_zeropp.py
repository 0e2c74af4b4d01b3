"""ZeRO++ without a process group: the block quantizer, its records, the configuration (YAML
and DeepSpeed keys), the node arithmetic and ``zshard estimate``'s hpZ memory."""

from __future__ import annotations

import math
import re

import pytest
import torch

from zshard.errors import ConfigError
from zshard.train.config import from_deepspeed, load_config
from zshard.train.models.stats import ModelStats
from zshard.train.report import EstimateInput, per_rank
from zshard.train.zero import Codec, ZeroPPOptions, check_zeropp, node_size, record_nbytes

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LENGTHS = (1, 2, 7, 63, 64, 65, 257, 1001)


def _values(rows: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random values over five decades, so blocks differ in scale, in ``dtype``'s range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * torch.logspace(-3, 2, n)
    return x.to(dtype)


def _roundtrip(
    x: torch.Tensor, bits: int, block: int, out_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    codec = Codec(bits, block)
    rows, n = x.shape
    rec = torch.empty(rows, codec.nbytes(n), dtype=torch.uint8)
    codec.encode(x, rec)
    out = torch.empty(rows, n, dtype=out_dtype)
    codec.decode(rec, n, out)
    return out, codec.step(rec, n)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [1, 16, 64])
def test_error_is_at_most_half_a_step_of_its_block(
    bits: int, dtype: torch.dtype, block: int
) -> None:
    for n in LENGTHS:
        x = _values(3, n, dtype, seed=n)
        got, step = _roundtrip(x, bits, block)
        err = (got - x.float()).abs()
        # Half a step, plus fp32 rounding of the division and the product (a few ulps of x).
        bound = step / 2 * (1 + 2**-20) + x.float().abs() * 2**-22
        assert bool((err <= bound).all()), (n, float((err / step).max()))
        # Each scale is its block's absmax / qmax.
        qmax = 127 if bits == 8 else 7
        padded = torch.nn.functional.pad(x.float().abs(), (0, -n % block))
        absmax = padded.view(3, -1, block).amax(-1)
        want = (absmax / qmax).repeat_interleave(block, dim=1)[:, :n]
        assert torch.equal(step, want)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dequantized_into_a_16_bit_dtype_adds_only_its_rounding(
    bits: int, dtype: torch.dtype
) -> None:
    x = _values(2, 1001, dtype, seed=1)
    got, step = _roundtrip(x, bits, 64, out_dtype=dtype)
    err = (got.float() - x.float()).abs()
    tiny = torch.finfo(dtype).smallest_normal
    bound = step / 2 * (1 + 2**-20) + got.float().abs() * torch.finfo(dtype).eps / 2 + tiny
    assert bool((err <= bound).all())


@pytest.mark.parametrize("bits", [8, 4])
def test_all_zero_blocks_are_exact_and_int4_packs_two_per_byte(bits: int) -> None:
    x = torch.zeros(2, 129)
    x[1, 64:] = torch.linspace(-1, 1, 65)  # row 1: one zero block, then values
    got, step = _roundtrip(x, bits, 64)
    assert torch.equal(got[0], torch.zeros(129))
    assert torch.equal(got[1, :64], torch.zeros(64))
    assert float(step[0].max()) == 0.0
    codec = Codec(bits, 64)
    values = 129 if bits == 8 else 65
    assert codec.nbytes(129) == record_nbytes(129, 64, bits) == -(-values // 4) * 4 + 4 * 3


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_non_finite_value_makes_its_block_non_finite_and_leaves_others(
    bits: int, bad: float
) -> None:
    """Without quantization an inf or NaN gradient reaches the reduced sum and the overflow
    check skips the step; quantized, its whole block dequantizes to NaN, which the same check
    sees. Other blocks are untouched."""
    x = _values(1, 200, torch.float16, seed=3)
    x[0, 70] = bad
    got, step = _roundtrip(x, bits, 64)
    assert bool(got[0, 64:128].isnan().all())
    ok = torch.cat([got[0, :64], got[0, 128:]])
    ref = torch.cat([x[0, :64], x[0, 128:]]).float()
    st = torch.cat([step[0, :64], step[0, 128:]])
    assert bool(ok.isfinite().all())
    assert bool(((ok - ref).abs() <= st / 2 * (1 + 2**-20) + ref.abs() * 2**-22).all())
    # The overflow verdict the optimizer step computes (Σ g² over the partition).
    assert not math.isfinite(float(torch.linalg.vector_norm(got) ** 2))


def test_fp16_overflow_to_inf_is_seen_after_the_roundtrip() -> None:
    x = torch.full((1, 64), 60000.0, dtype=torch.float16)
    x = x * 2  # overflows to inf in fp16, as a scaled fp16 gradient does
    got, _ = _roundtrip(x, 8, 64)
    assert not bool(got.isfinite().any())


def test_unquantized_codec_carries_the_values_exactly() -> None:
    for dtype in DTYPES:
        x = _values(3, 37, dtype)
        codec = Codec(None, 64, dtype)
        rec = torch.empty(3, codec.nbytes(37), dtype=torch.uint8)
        codec.encode(x, rec)
        out = torch.zeros(3, 37, dtype=torch.float32)
        codec.decode(rec, 37, out, accumulate=True)
        assert torch.equal(out, x.float())


def test_encode_reads_a_strided_view() -> None:
    """qgZ encodes a permutation of a flat buffer's chunks without copying it first."""
    flat = torch.arange(24, dtype=torch.float32)
    view = flat.view(2, 3, 4).transpose(0, 1)  # (3, 2, 4): rows of chunks {m*3 + l}
    codec = Codec(None, 8)
    rec = torch.empty(3, codec.nbytes(8), dtype=torch.uint8)
    codec.encode(view, rec)
    out = torch.empty(3, 8)
    codec.decode(rec, 8, out)
    assert torch.equal(out, view.reshape(3, 8))


# -- configuration ------------------------------------------------------------------------------


def test_yaml_keys_and_their_defaults() -> None:
    z = load_config({"zero": {"stage": 3}}).zero
    assert (z.quantized_weights, z.quantized_gradients, z.hpz_partition_size) == (False, False, 1)
    assert ZeroPPOptions.from_config(z) is None
    z = load_config(
        {
            "zero": {
                "stage": 3,
                "quantized_weights": True,
                "quantized_gradients": True,
                "quantized_gradients_bits": 4,
                "hpz_partition_size": 8,
                "quantization_block_size": 256,
            }
        }
    ).zero
    opts = ZeroPPOptions.from_config(z)
    assert opts == ZeroPPOptions(
        quantized_weights=True,
        quantized_gradients=True,
        gradient_bits=4,
        hpz_partition_size=8,
        block=256,
    )


@pytest.mark.parametrize(
    ("zero", "needle"),
    [
        (
            {"stage": 2, "quantized_weights": True},
            "zero.quantized_weights: ZeRO++ needs zero.stage 3",
        ),
        ({"stage": 1, "quantized_gradients": True}, "got stage 1"),
        ({"stage": 0, "hpz_partition_size": 2}, "zero.hpz_partition_size: ZeRO++ needs"),
        ({"stage": 3, "hpz_partition_size": 0}, "zero.hpz_partition_size"),
        ({"stage": 3, "quantization_block_size": 0}, "zero.quantization_block_size"),
        ({"stage": 3, "quantized_gradients_bits": 2}, "zero.quantized_gradients_bits"),
    ],
)
def test_bad_zeropp_options_are_config_errors(zero: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config({"zero": zero})


def test_stage_2_with_zeropp_off_is_fine() -> None:
    z = load_config({"zero": {"stage": 2, "hpz_partition_size": 1}}).zero
    assert z.hpz_partition_size == 1


def test_deepspeed_keys_map_without_a_warning() -> None:
    ds = {
        "train_batch_size": 8,
        "zero_optimization": {
            "stage": 3,
            "zero_quantized_weights": True,
            "zero_quantized_gradients": True,
            "zero_hpz_partition_size": 2,
        },
    }
    tree, notes = from_deepspeed(ds, world_size=4)
    assert notes == []
    z = load_config(tree).zero
    assert (z.quantized_weights, z.quantized_gradients, z.hpz_partition_size) == (True, True, 2)
    ds["zero_optimization"]["stage"] = 2
    tree, _ = from_deepspeed(ds, world_size=4)
    with pytest.raises(ConfigError, match="got stage 2"):
        load_config(tree)
    ds["zero_optimization"] = {"stage": 3, "zero_quantized_nontrainable_weights": True}
    with pytest.raises(ConfigError, match="zero_quantized_nontrainable_weights"):
        from_deepspeed(ds, world_size=4)


def test_node_size() -> None:
    opts = ZeroPPOptions(quantized_gradients=True)
    assert node_size(opts, 8, 4) == 4  # LOCAL_WORLD_SIZE
    assert node_size(ZeroPPOptions(hpz_partition_size=2), 8, 4) == 2
    with pytest.raises(ConfigError, match="3 does not divide the world size 8"):
        node_size(ZeroPPOptions(hpz_partition_size=3), 8, 4)
    with pytest.raises(ConfigError, match="8 exceeds the 4 ranks of a node"):
        node_size(ZeroPPOptions(hpz_partition_size=8), 8, 4)
    with pytest.raises(ConfigError, match="straddle"):
        node_size(ZeroPPOptions(hpz_partition_size=2), 6, 3)
    with pytest.raises(ConfigError, match="do not divide the world size"):
        node_size(opts, 6, 4)
    z = load_config({"zero": {"stage": 3, "hpz_partition_size": 4}}).zero
    check_zeropp(z, 8, 4)
    with pytest.raises(ConfigError, match="exceeds the 2 ranks"):
        check_zeropp(z, 4, 2)
    check_zeropp(load_config({"zero": {"stage": 3}}).zero, 3, 2)  # off: nothing to check


def test_estimate_reports_hpz_secondary_memory() -> None:
    stats = ModelStats.assumed(1_000_000_000, 16)
    plain = EstimateInput(model=stats, world_size=64, precision="bf16", stage=3)
    hpz = EstimateInput(
        model=stats,
        world_size=64,
        precision="bf16",
        stage=3,
        zeropp=ZeroPPOptions(hpz_partition_size=8),
    )
    a, b = per_rank(plain, 3), per_rank(hpz, 3)
    assert "hpz_secondary" not in a.buffers
    # 2Ψ/hpz bytes in bf16 (Ψ: the gathered modules; none is persistent here).
    assert b.buffers["hpz_secondary"] == math.ceil(stats.params / 8) * 2
    assert b.model_states == a.model_states
    assert per_rank(hpz, 2).buffers.get("hpz_secondary") is None
