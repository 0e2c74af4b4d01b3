"""Token files and tokenized Hugging Face datasets as training data (``data: tokens`` and
``data: hf_dataset``), the ``zshard tokenize`` command, and the vocabulary checks.

Pure tests build corpora of a few thousand tokens with numpy, a tiny BPE tokenizer with the
``tokenizers`` library (saved as a ``PreTrainedTokenizerFast`` directory) and tiny json/text
datasets: nothing is downloaded (a guard fails any connection outside 127.0.0.0/8). The S3 tests
use the moto server on 127.0.0.1 from tests/conftest.py. The few ``slow`` tests run ``zshard
train`` on 2-3 CPU processes with a 1-layer GPT.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import textwrap
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.harness import TINY_GPT, run_cli, run_cli_together, subprocess_env
from zshard.errors import ConfigError
from zshard.store.reader import CheckpointReader
from zshard.train.config import load_config
from zshard.train.data import (
    GlobalBatchSampler,
    TokenDataset,
    check_data,
    collate,
    load_tokenizer,
    open_data,
    read_ahead,
    tokenize,
)
from zshard.train.data import _tokenize as tokenize_module

# --- helpers -----------------------------------------------------------------------------------


def write_tokens(path: Path, ids: np.ndarray, dtype: str = "uint16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.asarray(ids).astype(dtype).tobytes())
    return path


def make_corpus(
    root: Path, sizes=(700, 37, 1300), *, vocab: int = 256, seed: int = 0, dtype: str = "uint16"
) -> tuple[list[Path], np.ndarray]:
    """Token files ``part-<i>.bin`` of ``sizes`` random ids below ``vocab``; also their concat."""
    rng = np.random.default_rng(seed)
    files, parts = [], []
    for i, n in enumerate(sizes):
        ids = rng.integers(0, vocab, n)
        files.append(write_tokens(root / f"part-{i}.bin", ids, dtype))
        parts.append(ids)
    return files, np.concatenate(parts)


def expected_window(stream: np.ndarray, i: int, seq_len: int) -> np.ndarray:
    return stream[i * seq_len : (i + 1) * seq_len + 1]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any connection outside 127.0.0.0/8: tokenizing must not download anything."""
    real = socket.socket.connect

    def connect(self: socket.socket, address: object) -> None:
        host = str(address[0]) if isinstance(address, tuple) else "127.0.0.1"
        if not (host.startswith("127.") or host in ("::1", "localhost")):
            raise AssertionError(f"tried to reach {address!r}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


DOCS = [f"the quick brown fox {i} jumps over the lazy dog, number {i * 7}." for i in range(120)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny byte-level BPE tokenizer (vocabulary 300, ``<eos>`` = 1) saved by
    ``PreTrainedTokenizerFast.save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(DOCS, trainer)
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(str(out))
    return str(out)


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return path


def expected_ids(tokenizer_dir: str, docs: list[str], eos: bool = True) -> np.ndarray:
    tok = load_tokenizer(tokenizer_dir)
    out: list[int] = []
    for ids in tok.encode_batch(docs):
        out += ids + ([tok.eos_id] if eos and tok.eos_id is not None else [])
    return np.array(out)


# --- token files -------------------------------------------------------------------------------


def test_windows_follow_one_stream_across_files(tmp_path: Path) -> None:
    files, stream = make_corpus(tmp_path)
    ds = TokenDataset([str(f) for f in files], seq_len=16)
    assert ds.num_tokens == len(stream) == 2037
    assert len(ds) == (len(stream) - 1) // 16
    for i in range(len(ds)):  # windows straddling part-0/1/2 included
        x, y = ds[i]
        want = expected_window(stream, i, 16)
        assert x.dtype == y.dtype == torch.int64
        assert x.tolist() == want[:-1].tolist() and y.tolist() == want[1:].tolist()
    assert ds[-1][0].tolist() == ds[len(ds) - 1][0].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]
    x, y = collate(ds, [5, 0, 5, 43])
    assert x.shape == y.shape == (4, 16)
    for row, i in enumerate([5, 0, 5, 43]):
        assert torch.equal(x[row], ds[i][0]) and torch.equal(y[row], ds[i][1])
    ds.close()


def test_globs_and_lists_keep_the_given_order(tmp_path: Path) -> None:
    files, stream = make_corpus(tmp_path, sizes=(100, 200, 300))
    a = TokenDataset(str(tmp_path / "part-*.bin"), seq_len=8)
    assert [f.url for f in a.files] == [str(f) for f in files]  # sorted by name
    b = TokenDataset([str(files[2]), str(tmp_path / "part-[01].bin")], seq_len=8)
    assert [f.url for f in b.files] == [str(files[2]), str(files[0]), str(files[1])]
    reordered = np.concatenate([stream[300:], stream[:300]])
    assert b.window(3).tolist() == expected_window(reordered, 3, 8).tolist()
    c = TokenDataset(f"file://{files[0]}", seq_len=8)
    assert c.window(0).tolist() == stream[:9].tolist()


def test_uint32_and_the_sidecar_dtype(tmp_path: Path) -> None:
    ids = np.arange(70_000, 70_500)
    path = write_tokens(tmp_path / "big.bin", ids, "uint32")
    assert TokenDataset(str(path), seq_len=10, dtype="uint32").window(2).tolist() == list(
        range(70_020, 70_031)
    )
    # uint16 reads the same bytes as twice the tokens: the caller's choice, not detectable...
    assert TokenDataset(str(path), seq_len=10).num_tokens == 1000
    # ... unless a sidecar says what the file is.
    (tmp_path / "big.bin.json").write_text(
        json.dumps({"format": "zshard-tokens", "dtype": "uint32", "vocab_size": 70_500})
    )
    ds = TokenDataset(str(path), seq_len=10)
    assert ds.dtype_name == "uint32" and ds.num_tokens == 500
    with pytest.raises(ConfigError, match="written as uint32"):
        TokenDataset(str(path), seq_len=10, dtype="uint16")


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing", "not found"),
        ("empty", "is empty"),
        ("odd", "not a multiple of 2 (uint16)"),
        ("glob", "matches no file"),
        ("directory", "is a directory"),
        ("short", "fewer than one sample of data.seq_len + 1 = 65"),
        ("nothing", "no data files given"),
    ],
)
def test_bad_token_files_are_config_errors(tmp_path: Path, case: str, needle: str) -> None:
    good = str(write_tokens(tmp_path / "good.bin", np.arange(50)))
    path: str | list[str] = {
        "missing": str(tmp_path / "nope.bin"),
        "glob": str(tmp_path / "*.tokens"),
        "directory": str(tmp_path),
        "short": good,
        "nothing": [],
    }.get(case, str(tmp_path / "bad.bin"))
    if case == "empty":
        (tmp_path / "bad.bin").write_bytes(b"")
    if case == "odd":
        (tmp_path / "bad.bin").write_bytes(b"\x01\x00\x02")
    with pytest.raises(ConfigError, match=re.escape(needle)) as exc:
        TokenDataset(path, seq_len=64)
    assert "\n" not in str(exc.value)


def test_a_token_id_beyond_the_vocabulary_is_found_at_start(tmp_path: Path) -> None:
    ids = np.arange(1000) % 200
    ids[10] = 4000
    path = write_tokens(tmp_path / "t.bin", ids)
    TokenDataset(str(path), seq_len=8)  # unchecked without a vocabulary
    with pytest.raises(
        ConfigError,
        match=r"token id 4000 \(token 10 of .*t\.bin\) is >= the model's vocabulary size 256",
    ):
        TokenDataset(str(path), seq_len=8, vocab_size=256)


def test_a_token_id_beyond_the_vocabulary_is_found_when_its_window_is_read(tmp_path: Path) -> None:
    # 200k tokens: the start-up sample (the first 64k, then 8 chunks of 4k) misses position 100k.
    ids = np.arange(200_000) % 250
    ids[100_000] = 300
    files = [
        write_tokens(tmp_path / "a.bin", ids[:150_000]),
        write_tokens(tmp_path / "b.bin", ids[150_000:]),
    ]
    ds = TokenDataset([str(f) for f in files], seq_len=100, vocab_size=256)  # the sample is clean
    ds.window(0)
    ds.window(1998)  # in b.bin
    with pytest.raises(ConfigError, match=r"token id 300 \(token 100000 of .*a\.bin\).* 256"):
        ds.window(1000)  # tokens 100000..100100
    with pytest.raises(ConfigError, match="300"):
        collate(ds, [3, 999])  # window 999 ends at token 100000


def test_rss_does_not_grow_with_a_2gb_corpus(tmp_path: Path) -> None:
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.truncate(2 << 30)  # sparse: no real 2 GB write
    ds = TokenDataset(str(path), seq_len=2048, vocab_size=50_304)  # the start-up check reads too
    proc = psutil.Process()
    sampler = GlobalBatchSampler(len(ds), 8, seed=0)
    collate(ds, sampler.batch(0))  # warm up imports and allocator
    before = proc.memory_info().rss
    for step in range(1, 26):  # 200 windows spread over the whole file
        x, _ = collate(ds, sampler.batch(step))
        assert x.shape == (8, 2048)
    growth = proc.memory_info().rss - before
    assert ds.num_tokens == 1 << 30 and len(ds) > 500_000
    assert growth < 50 << 20, f"RSS grew {growth / 2**20:.1f} MiB over 200 windows"
    # Walking 256 MiB of the file: the mapped pages are given back as it goes (without that,
    # RSS grows by the 256 MiB read).
    before = proc.memory_info().rss
    for k in range(256):
        ds.read_tokens(k << 19, (k + 1) << 19)  # 1 MiB each
    growth = proc.memory_info().rss - before
    assert growth < 50 << 20, f"RSS grew {growth / 2**20:.1f} MiB over a 256 MiB walk"
    ds.close()


# --- S3 ----------------------------------------------------------------------------------------


def upload(bucket: str, files: list[Path], prefix: str = "corpus") -> list[str]:
    import fsspec

    fs = fsspec.filesystem("s3")
    urls = []
    for f in files:
        url = f"{bucket}/{prefix}/{f.name}"
        fs.pipe(url, f.read_bytes())
        urls.append(url)
    return urls


@pytest.mark.s3
def test_s3_reads_the_same_samples_as_local_files(tmp_path: Path, s3_bucket: str) -> None:
    files, stream = make_corpus(tmp_path, sizes=(3000, 111, 5000))
    upload(s3_bucket, files)
    local = TokenDataset(str(tmp_path / "part-*.bin"), seq_len=32, vocab_size=256)
    # Small blocks: windows straddle blocks and files, and the cache (4 blocks) evicts.
    remote = TokenDataset(
        f"{s3_bucket}/corpus/part-*.bin",
        seq_len=32,
        vocab_size=256,
        block_bytes=256,
        cache_blocks=4,
    )
    assert [f.url for f in remote.files] == [f"{s3_bucket}/corpus/part-{i}.bin" for i in range(3)]
    assert len(remote) == len(local) and remote.num_tokens == len(stream)
    sampler = GlobalBatchSampler(len(local), 12, seed=3)
    for step in (0, 13, 29, 41):  # shuffled batches, past one epoch
        for rank, world in ((0, 2), (1, 2), (2, 3)):
            a = 12 // (2 * world) - 1
            read_ahead(remote, sampler, step, a, rank, world, 2)  # the next two, in the background
            idx = sampler.micro_batch(step, rank, world, 2, a)
            xl, yl = collate(local, idx)
            xr, yr = collate(remote, idx)
            assert torch.equal(xl, xr) and torch.equal(yl, yr)
    for i in [*range(80, 110), len(local) - 1]:  # sequential (read-ahead), across both files
        assert torch.equal(remote[i][0], local[i][0])
    blocks = remote._remote
    assert blocks is not None and len(blocks._cache) <= 4 and len(blocks._ahead) <= blocks.max_ahead
    remote.close()


@pytest.mark.s3
def test_s3_bad_inputs(tmp_path: Path, s3_bucket: str) -> None:
    upload(s3_bucket, [write_tokens(tmp_path / "odd.bin", np.arange(5), "uint8")])
    with pytest.raises(ConfigError, match="matches no file"):
        TokenDataset(f"{s3_bucket}/corpus/*.tokens", seq_len=4)
    with pytest.raises(ConfigError, match="not found"):
        TokenDataset(f"{s3_bucket}/corpus/missing.bin", seq_len=4)
    with pytest.raises(ConfigError, match="not a multiple of 2"):
        TokenDataset(f"{s3_bucket}/corpus/odd.bin", seq_len=4)


# --- config ------------------------------------------------------------------------------------


def test_data_config_keys(tmp_path: Path) -> None:
    cfg = load_config(
        {
            "data": {
                "name": "tokens",
                "path": ["a.bin", "b/*.bin"],
                "val_path": "v.bin",
                "seq_len": 64,
            }
        }
    )
    assert cfg.data.path == ("a.bin", "b/*.bin") and cfg.data.val_path == "v.bin"
    assert load_config(cfg.to_dict()).data == cfg.data
    assert load_config({}, ["data.name=tokens", "data.path=x.bin"]).data.path == "x.bin"
    legacy = load_config({"data": {"name": str(tmp_path / "t.txt")}})
    assert legacy.data.name.endswith("t.txt") and legacy.data.path is None
    bad = [
        ({"name": "tokens"}, "data.path: data name 'tokens' needs a path"),
        ({"name": "hf_dataset", "path": "d"}, "data.tokenizer"),
        ({"name": "builtin", "path": "x.bin"}, "data.path: not used with data name 'builtin'"),
        ({"name": "tokens", "path": "x", "val_split": "test"}, "data.val_split: not used"),
        ({"name": "tokens", "path": "x", "dtype": "int8"}, "data.dtype: expected one of auto"),
        ({"name": "builtin", "dtype": "uint32"}, "data.dtype: not used"),
        ({"name": "tokens", "path": ["x", 3]}, "data.path: expected a path"),
        ({"name": "tokens", "path": []}, "data.path"),
        ({"name": "tokens", "path": "x", "text_field": ""}, "data.text_field"),
    ]
    for data, needle in bad:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
            load_config({"data": data})


def test_model_vocabulary_comes_from_the_tokenizer_or_the_sidecar(
    tmp_path: Path, tokenizer_dir: str
) -> None:
    data = str(tmp_path / "d.jsonl")
    cfg = load_config({"data": {"name": "hf_dataset", "path": data, "tokenizer": tokenizer_dir}})
    assert cfg.model_kwargs()["vocab_size"] == 300
    explicit = load_config(
        {
            "model": {"name": "gpt", "args": {"vocab_size": 512}},
            "data": {"name": "hf_dataset", "path": data, "tokenizer": tokenizer_dir},
        }
    )
    assert explicit.model_kwargs()["vocab_size"] == 512
    path = write_tokens(tmp_path / "t.bin", np.arange(100))
    assert (
        "vocab_size"
        not in load_config({"data": {"name": "tokens", "path": str(path)}}).model_kwargs()
    )
    (tmp_path / "t.bin.json").write_text(
        json.dumps({"format": "zshard-tokens", "vocab_size": 1000})
    )
    assert (
        load_config({"data": {"name": "tokens", "path": str(path)}}).model_kwargs()["vocab_size"]
        == 1000
    )
    hf = load_config(
        {
            "model": {"name": "hf", "args": {"config": {"model_type": "llama"}}},
            "data": {"name": "tokens", "path": str(path)},
        }
    )
    assert hf.model_kwargs()["vocab_size"] == 1000
    builtin = load_config({})
    assert "vocab_size" not in builtin.model_kwargs()


def test_build_checks_the_data_against_the_models_vocabulary(tmp_path: Path) -> None:
    from zshard.train.run._loop import build

    path = write_tokens(tmp_path / "t.bin", np.arange(2000) % 300)
    cfg = load_config(
        {
            "model": {"name": "gpt", "args": {"n_layer": 1}},
            "data": {"name": "tokens", "path": str(path), "seq_len": 16},
        }
    )
    with pytest.raises(ConfigError, match=r"token id 256 .* vocabulary size 256"):
        build(cfg)
    (tmp_path / "t.bin.json").write_text(json.dumps({"format": "zshard-tokens", "vocab_size": 300}))
    factory, train, val = build(cfg)  # the sidecar sizes the model
    assert factory().tok_emb.num_embeddings == 300
    assert len(train) == 1999 // 16 and val is None
    with pytest.raises(ConfigError, match=r"byte value .* >= the model's vocabulary size 100"):
        build(load_config({"model": {"name": "gpt", "args": {"vocab_size": 100, "n_layer": 1}}}))


def test_build_tokenizes_an_hf_dataset_and_sizes_the_model_from_its_tokenizer(
    tmp_path: Path, tokenizer_dir: str, no_network: None
) -> None:
    from zshard.train.run._loop import build

    write_jsonl(tmp_path / "d.jsonl", DOCS)
    cfg = load_config(
        {
            "model": {"name": "gpt", "args": {"n_layer": 1, "n_head": 2, "d_model": 32}},
            "data": {
                "name": "hf_dataset",
                "path": str(tmp_path / "d.jsonl"),
                "tokenizer": tokenizer_dir,
                "val_split": "train",
                "seq_len": 16,
            },
        }
    )
    factory, train, val = build(cfg)
    assert factory().tok_emb.num_embeddings == 300
    assert isinstance(train, TokenDataset) and train.vocab_size == 300
    assert val is not None and len(val) == len(train)
    x, _ = collate(train, [0, 1])
    assert x.shape == (2, 16) and int(x.max()) < 300


# --- tokenizing --------------------------------------------------------------------------------


def test_tokenize_writes_ids_and_a_sidecar(
    tmp_path: Path, tokenizer_dir: str, no_network: None
) -> None:
    src = write_jsonl(tmp_path / "docs" / "d.jsonl", DOCS)
    out = tmp_path / "out" / "d.bin"
    res = tokenize(str(src), str(out), tokenizer=tokenizer_dir, progress=False)
    want = expected_ids(tokenizer_dir, DOCS)
    got = np.fromfile(out, dtype="<u2")
    assert got.tolist() == want.tolist() and res.tokens == len(want) and res.documents == 120
    meta = json.loads((tmp_path / "out" / "d.bin.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 300 and meta["eos_id"] == 1
    assert meta["tokens"] == len(want)
    assert sorted(os.listdir(tmp_path / "out")) == ["d.bin", "d.bin.json"]  # no temporaries
    # The written file trains as `data: tokens`, its vocabulary from the sidecar.
    ds = TokenDataset(str(out), seq_len=8, vocab_size=meta["vocab_size"])
    assert ds.window(0).tolist() == want[:9].tolist()
    res32 = tokenize(
        str(src), str(tmp_path / "d32.bin"), tokenizer=tokenizer_dir, dtype="uint32", progress=False
    )
    assert np.fromfile(tmp_path / "d32.bin", dtype="<u4").tolist() == want.tolist()
    assert res32.dtype == "uint32"


def test_tokenize_resumes_after_an_interruption(
    tmp_path: Path, tokenizer_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    out = tmp_path / "d.bin"
    monkeypatch.setattr(tokenize_module, "BATCH_DOCS", 10)
    monkeypatch.setattr(tokenize_module, "SAVE_EVERY_BYTES", 1)  # a progress record per batch
    real = tokenize_module.TextSource.batches

    def interrupted(self, skip, size=None):  # type: ignore[no-untyped-def]
        for k, batch in enumerate(real(self, skip, size)):
            if k == 5:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(tokenize_module.TextSource, "batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenize(str(src), str(out), tokenizer=tokenizer_dir, progress=False)
    assert not out.exists() and (tmp_path / "d.bin.tmp-resume").exists()
    monkeypatch.setattr(tokenize_module.TextSource, "batches", real)
    res = tokenize(str(src), str(out), tokenizer=tokenizer_dir, progress=False)
    assert res.resumed_from == 50 and res.documents == 120
    assert np.fromfile(out, dtype="<u2").tolist() == expected_ids(tokenizer_dir, DOCS).tolist()
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.bin.json", "d.jsonl"]


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    """``zshard ARGS`` in this process (the console entry point): exit code, stdout, stderr."""
    from zshard.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_tokenize_command(
    tmp_path: Path, tokenizer_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = write_jsonl(tmp_path / "d.jsonl", DOCS, field="body")
    out = tmp_path / "o.bin"
    # As users run it, once: a subprocess through the console entry point.
    r = run_cli(
        "tokenize", src, out, "--tokenizer", tokenizer_dir, "--text-field", "body", timeout=180
    )
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "120 documents" in r.stdout and "vocabulary 300" in r.stdout
    first = out.read_bytes()
    assert first == expected_ids(tokenizer_dir, DOCS).astype("<u2").tobytes()
    before = sorted(os.listdir(tmp_path))
    tok = ("--tokenizer", tokenizer_dir)
    for args, needle in [
        ((src, out, *tok, "--text-field", "body"), "already exists; pass --overwrite"),
        ((src, out, *tok, "--overwrite"), "--text-field: no field 'text'"),
        ((src, out, *tok, "--dtype", "int8", "--overwrite"), "--dtype: expected one of"),
        ((tmp_path / "none-*.jsonl", tmp_path / "x.bin", *tok), "matches no file"),
        ((src, tmp_path / "x.bin", "--tokenizer", tmp_path / "no-tok"), "no tokenizer at"),
    ]:
        code, _, err = cli(capsys, "tokenize", *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert sorted(os.listdir(tmp_path)) == before and out.read_bytes() == first
    code, stdout, _ = cli(
        capsys, "tokenize", src, out, *tok, "--text-field", "body", "--overwrite", "-q"
    )
    assert code == 0 and "wrote" in stdout and out.read_bytes() == first


# --- hf_dataset --------------------------------------------------------------------------------


def test_hf_dataset_is_tokenized_once_into_a_cache_next_to_the_data(
    tmp_path: Path, tokenizer_dir: str, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "corpus"
    write_jsonl(data / "train-a.jsonl", DOCS[:70])
    write_jsonl(data / "train-b.jsonl", DOCS[70:100])
    write_jsonl(tmp_path / "val.jsonl", DOCS[100:])
    kwargs = {
        "name": "hf_dataset",
        "path": str(data / "train-*.jsonl"),
        "val_path": str(tmp_path / "val.jsonl"),
        "tokenizer": tokenizer_dir,
        "seq_len": 8,
        "progress": False,
    }
    train, val = open_data(**kwargs, vocab_size=300)
    want = expected_ids(tokenizer_dir, DOCS[:100])
    assert isinstance(train, TokenDataset) and isinstance(val, TokenDataset)
    assert train.num_tokens == len(want) and train.window(3).tolist() == want[24:33].tolist()
    assert val.num_tokens == len(expected_ids(tokenizer_dir, DOCS[100:]))
    cache = data / ".zshard-tokens"
    assert cache.is_dir() and train.files[0].url.startswith(str(cache))
    # A second open reuses the cache: nothing is tokenized again.
    monkeypatch.setattr(tokenize_module, "_tokenize_into", None)
    train2, _ = open_data(**kwargs, vocab_size=300)
    assert train2.files[0].url == train.files[0].url
    check_data(**kwargs, vocab_size=300)
    with pytest.raises(ConfigError, match=r"token id .* >= the model's vocabulary size 100"):
        open_data(**kwargs, vocab_size=100)


def test_hf_dataset_directories_splits_and_text_files(
    tmp_path: Path, tokenizer_dir: str, no_network: None
) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": DOCS[:90]}),
            "test": datasets.Dataset.from_dict({"content": DOCS[90:]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    common = {
        "name": "hf_dataset",
        "path": str(tmp_path / "saved"),
        "tokenizer": tokenizer_dir,
        "text_field": "content",
        "seq_len": 8,
        "progress": False,
    }
    train, val = open_data(**common, val_split="test")
    assert train.num_tokens == len(expected_ids(tokenizer_dir, DOCS[:90]))
    assert val is not None and val.num_tokens == len(expected_ids(tokenizer_dir, DOCS[90:]))
    with pytest.raises(ConfigError, match=r"data.split: no split 'dev' in .*; it has train, test"):
        open_data(**{**common, "split": "dev"})
    with pytest.raises(
        ConfigError, match=r"data.text_field: no field 'text' .* its fields are content"
    ):
        open_data(**{**common, "text_field": "text"})
    # .txt: lines with their line breaks, no end-of-sequence between them.
    (tmp_path / "t.txt").write_text("\n".join(DOCS[:20]) + "\n")
    txt, _ = open_data(
        name="hf_dataset",
        path=str(tmp_path / "t.txt"),
        tokenizer=tokenizer_dir,
        seq_len=8,
        progress=False,
    )
    lines = [d + "\n" for d in DOCS[:20]]
    assert txt.num_tokens == len(expected_ids(tokenizer_dir, lines, eos=False))
    with pytest.raises(ConfigError, match="is a URL"):
        open_data(name="hf_dataset", path="s3://bucket/x.jsonl", tokenizer=tokenizer_dir)
    with pytest.raises(ConfigError, match="cannot tell the format"):
        (tmp_path / "x.dat").write_text("x")
        open_data(name="hf_dataset", path=str(tmp_path / "x.dat"), tokenizer=tokenizer_dir)


# --- training runs (multi-process) -------------------------------------------------------------

TOKENS_CONFIG = """
model: {model}
data: {{name: tokens, path: {path}, val_path: {val}, seq_len: 32}}
train: {{steps: 6, micro_batch_size: 2, global_batch_size: 12, seed: 3, log_every: 1,
        eval_every: 3}}
optimizer: {{name: adamw, lr: 1.0e-3, weight_decay: 0.1}}
scheduler: {{name: cosine, warmup_steps: 2}}
precision: fp32
zero: {{stage: 1}}
checkpoint: {{dir: {ckpt}, every: 3, keep_last: 5}}
"""


def token_corpus(root: Path) -> None:
    """Three shards (a window straddles each boundary) + validation, ids < 300, sidecar 300."""
    make_corpus(root, sizes=(1500, 45, 2600), vocab=300, seed=5)
    (root / "part-0.bin.json").write_text(
        json.dumps({"format": "zshard-tokens", "dtype": "uint16", "vocab_size": 300})
    )
    write_tokens(root / "val.bin", np.random.default_rng(6).integers(0, 300, 700))


def write_cfg(path: Path, ckpt: Path, data_path: str, val: str) -> Path:
    path.write_text(
        textwrap.dedent(TOKENS_CONFIG).format(model=TINY_GPT, path=data_path, val=val, ckpt=ckpt)
    )
    return path


def train(cfg: Path, *args: str, env: dict[str, str] | None = None) -> None:
    r = run_cli("train", cfg, *args, env=env, timeout=300)
    assert r.returncode == 0, r.stderr


def train_together(*runs: tuple[Path, list[str]]) -> None:
    """:func:`train` of each (config, arguments), side by side (``run_cli_together``)."""
    done = run_cli_together(*(["train", cfg, *args] for cfg, args in runs), timeout=300)
    for code, err in done:
        assert code == 0, err


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    r = CheckpointReader.open(str(ckpt))
    kind = "master" if any(t.kind == "master" for t in r.manifest.tensors) else "param"
    return {
        t.name: r.read_torch(t.name, kind).reshape(t.shape).clone()
        for t in r.manifest.tensors
        if t.kind == kind
    }


def losses(ckpt: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (ckpt / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def token_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two runs at world size 2 on the local multi-file corpus, made side by side: 6 steps on
    the shards named one by one, and 3 steps on the same shards by one glob. Returns (corpus dir,
    the 6-step checkpoint root, the 3-step one)."""
    root = tmp_path_factory.mktemp("tokens-run")
    token_corpus(root / "data")
    ckpt, three = root / "straight", root / "three"
    cfg = write_cfg(
        root / "straight.yaml",
        ckpt,
        f"[{root}/data/part-0.bin, '{root}/data/part-[12].bin']",
        f"{root}/data/val.bin",
    )
    cfg3 = write_cfg(
        root / "three.yaml", three, f"'{root}/data/part-*.bin'", f"{root}/data/val.bin"
    )
    train_together((cfg, ["--nproc", "2"]), (cfg3, ["--nproc", "2", "--set", "train.steps=3"]))
    return root / "data", ckpt, three


@pytest.fixture(scope="module")
def straight_run(token_runs: tuple[Path, Path, Path]) -> tuple[Path, Path]:
    """6 steps at world size 2 on the local multi-file corpus: (corpus dir, checkpoint root)."""
    data, straight, _ = token_runs
    return data, straight


@pytest.mark.slow
def test_resume_at_another_world_size_on_token_files(
    tmp_path: Path, token_runs: tuple[Path, Path, Path]
) -> None:
    data, straight, three = token_runs
    ckpt = tmp_path / "resumed"
    shutil.copytree(three, ckpt)  # 3 steps at world size 2 on the shards by glob
    cfg = write_cfg(tmp_path / "cfg.yaml", ckpt, f"'{data}/part-*.bin'", f"{data}/val.bin")
    train(cfg, "--nproc", "3")  # 12 = 2 x 3 x 2: the same global batch at 3 ranks
    r = CheckpointReader.open(str(ckpt))
    assert (r.manifest.step, r.manifest.layout.world_size) == (6, 3)
    a, b = params(straight), params(ckpt)
    assert a["tok_emb.weight"].shape == (300, 32)  # the sidecar's vocabulary
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert losses(ckpt) == pytest.approx(losses(straight), rel=1e-5)
    records = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert [("val_loss" in x) for x in records] == [False, False, True, False, False, True]


@pytest.mark.slow
@pytest.mark.s3
def test_training_from_s3_matches_local_files(
    tmp_path: Path, straight_run: tuple[Path, Path], s3_bucket: str, moto_endpoint: str
) -> None:
    data, straight = straight_run
    upload(s3_bucket, sorted(data.glob("*.bin")) + sorted(data.glob("*.json")))
    ckpt = tmp_path / "from-s3"
    cfg = write_cfg(
        tmp_path / "cfg.yaml",
        ckpt,
        f"'{s3_bucket}/corpus/part-*.bin'",
        f"{s3_bucket}/corpus/val.bin",
    )
    env = subprocess_env(FSSPEC_S3_ENDPOINT_URL=moto_endpoint)
    train(cfg, "--nproc", "2", "--set", "train.steps=3", env=env)
    a = params(straight / "step-00000003")
    b = params(ckpt)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # same world size: bitwise
    assert losses(ckpt) == losses(straight)[:3]


@pytest.mark.slow
def test_bad_data_fails_with_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = write_cfg(
        tmp_path / "cfg.yaml", tmp_path / "run", f"'{tmp_path}/nothing-*.bin'", f"{tmp_path}/v.bin"
    )
    r = run_cli("train", cfg, "--nproc", "2", timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "matches no file" in lines[0], r.stderr
