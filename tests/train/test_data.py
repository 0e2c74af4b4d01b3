"""Tests for the built-in dataset and the world-size-independent sampler (pure tier)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zshard.errors import ConfigError
from zshard.train.data import (
    CharDataset,
    GlobalBatchSampler,
    collate,
    corpus_bytes,
    decode,
    encode,
    open_data,
)


def _reassemble(sampler: GlobalBatchSampler, step: int, world_size: int, micro: int) -> list[int]:
    """Concatenate every (accum_index, rank) micro batch in order."""
    out: list[int] = []
    for accum_index in range(sampler.grad_accum(world_size, micro)):
        for rank in range(world_size):
            out += sampler.micro_batch(step, rank, world_size, micro, accum_index)
    return out


# --- sampler -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_samples", "batch"), [(37, 5), (12, 4), (5, 8), (1, 3)])
def test_each_epoch_covers_every_sample_once(num_samples: int, batch: int) -> None:
    sampler = GlobalBatchSampler(num_samples, batch, seed=7)
    steps = -(-3 * num_samples // batch)  # enough steps for three whole epochs
    stream = [i for s in range(steps) for i in sampler.batch(s)]
    epochs = [stream[e * num_samples : (e + 1) * num_samples] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(num_samples))
    if num_samples > 3:
        assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_same_seed_same_order_other_seed_differs() -> None:
    a, b, c = (GlobalBatchSampler(100, 10, seed=s) for s in (3, 3, 4))
    assert [a.batch(s) for s in range(25)] == [b.batch(s) for s in range(25)]
    assert a.batch(0) != c.batch(0)
    # Random access needs no history: step 17 alone equals step 17 after walking there.
    assert GlobalBatchSampler(100, 10, seed=3).batch(17) == a.batch(17)


@settings(max_examples=60, deadline=None)
@given(
    num_samples=st.integers(1, 50),
    world_size=st.integers(1, 3),
    micro=st.integers(1, 4),
    accum=st.integers(1, 4),
    step=st.integers(0, 40),
    seed=st.integers(0, 2**31),
)
def test_micro_batches_reassemble_global_batch(
    num_samples: int, world_size: int, micro: int, accum: int, step: int, seed: int
) -> None:
    sampler = GlobalBatchSampler(num_samples, world_size * micro * accum, seed=seed)
    assert _reassemble(sampler, step, world_size, micro) == sampler.batch(step)


@pytest.mark.parametrize("step", [0, 1, 9])
def test_world_size_does_not_change_the_global_batch(step: int) -> None:
    sampler = GlobalBatchSampler(29, 12, seed=0)
    expected = sampler.batch(step)
    for world_size, micro in [(1, 12), (1, 3), (2, 2), (2, 6), (3, 4), (3, 1)]:
        assert _reassemble(sampler, step, world_size, micro) == expected, (world_size, micro)


def test_micro_batch_placement() -> None:
    sampler = GlobalBatchSampler(100, 12, seed=1)
    batch = sampler.batch(4)
    # world 3, micro 2: position p -> accum p // 6, rank (p % 6) // 2
    assert (
        sampler.micro_batch(4, rank=2, world_size=3, micro_batch_size=2, accum_index=1)
        == (batch[10:12])
    )


def test_divisibility_and_range_errors_name_the_numbers() -> None:
    sampler = GlobalBatchSampler(100, 12, seed=0)
    with pytest.raises(ConfigError, match=r"12 .*world_size 5 x micro_batch_size 2 = 10"):
        sampler.micro_batch(0, 0, 5, 2, 0)
    with pytest.raises(ConfigError, match="rank 3"):
        sampler.micro_batch(0, 3, 3, 2, 0)
    with pytest.raises(ConfigError, match="accum_index 2"):
        sampler.micro_batch(0, 0, 3, 2, 2)
    with pytest.raises(ConfigError, match="global_batch_size"):
        GlobalBatchSampler(10, 0)


def test_state_dict_round_trip() -> None:
    sampler = GlobalBatchSampler(50, 8, seed=11)
    state = sampler.state_dict()
    assert state == {"seed": 11, "global_batch_size": 8, "num_samples": 50}
    again = GlobalBatchSampler.from_state_dict(state)
    assert again.batch(13) == sampler.batch(13)
    with pytest.raises(ConfigError, match="seed"):
        GlobalBatchSampler.from_state_dict({"num_samples": 50, "global_batch_size": 8})


# --- dataset -------------------------------------------------------------------------------------


def test_windows_are_non_overlapping_and_shifted(tmp_path: Path) -> None:
    text = bytes(range(256)) * 4  # 1024 bytes, each value known from its position
    path = tmp_path / "t.txt"
    path.write_bytes(text)
    ds = CharDataset(path, seq_len=10, val_fraction=0.25)
    train_len = int(1024 * 0.75)
    assert len(ds) == (train_len - 1) // 10
    for i in (0, 1, len(ds) - 1, -1):
        x, y = ds[i]
        start = (i % len(ds)) * 10
        assert x.dtype == y.dtype == torch.int64
        assert x.tolist() == list(text[start : start + 10])
        assert y.tolist() == list(text[start + 1 : start + 11])
    with pytest.raises(IndexError):
        ds[len(ds)]
    val = CharDataset(path, seq_len=10, split="val", val_fraction=0.25)
    assert val[0][0].tolist() == list(text[train_len : train_len + 10])  # val = tail of the text


def test_collate_stacks(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(b"abcdefghijklmnopqrstuvwxyz" * 10)
    ds = CharDataset(path, seq_len=8)
    x, y = collate(ds, [3, 0, 3])
    assert x.shape == y.shape == (3, 8)
    assert torch.equal(x[0], ds[3][0]) and torch.equal(y[1], ds[0][1])


def test_too_short_text_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_bytes(b"tiny")
    with pytest.raises(ConfigError, match="seq_len"):
        CharDataset(path, seq_len=16)
    with pytest.raises(ConfigError, match="not found"):
        CharDataset(tmp_path / "missing.txt")


def test_shipped_corpus() -> None:
    raw = corpus_bytes()
    assert 200_000 < len(raw) < 1_500_000
    text = raw.decode("utf-8")
    assert "Gutenberg" not in text  # licence boilerplate stripped
    train, val = CharDataset(seq_len=64), CharDataset(seq_len=64, split="val")
    assert train.vocab_size == 256
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.07
    assert decode(train[0][0]).startswith("HAMLET")


def test_encode_decode_round_trip() -> None:
    assert decode(encode("To be, or not to be — that is")) == "To be, or not to be — that is"


def test_open_data_keeps_the_builtin_and_text_file_data(tmp_path: Path) -> None:
    train, val = open_data("builtin", seq_len=64)
    assert isinstance(train, CharDataset) and isinstance(val, CharDataset)
    assert train.source == CharDataset(seq_len=64).source and len(train) == len(
        CharDataset(seq_len=64)
    )
    path = tmp_path / "t.txt"
    path.write_bytes(b"abcdefghij" * 100)
    train, val = open_data(str(path), seq_len=8, vocab_size=256)
    assert isinstance(train, CharDataset) and train[0][0].tolist() == list(b"abcdefgh")
    with pytest.raises(ConfigError, match="not found"):
        open_data(str(tmp_path / "missing.txt"))


def test_collate_uses_a_datasets_own_batch_reader() -> None:
    class Batched:
        def __init__(self) -> None:
            self.calls: list[list[int]] = []

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            raise AssertionError("read one by one")

        def read_batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            self.calls.append(indices)
            t = torch.tensor(indices)[:, None].expand(-1, 4)
            return t, t + 1

    ds = Batched()
    x, y = collate(ds, (3, 1))  # type: ignore[arg-type]
    assert ds.calls == [[3, 1]] and x[:, 0].tolist() == [3, 1] and torch.equal(y, x + 1)
