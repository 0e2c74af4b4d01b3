"""Token files: flat little-endian token ids (the nanoGPT / Megatron ``.bin`` layout).

One file or many (a list, a glob, or both) are read as one logical stream of tokens, in the order
given (each glob's matches sorted by name). Sample ``i`` is the window of ``seq_len + 1`` tokens
starting at token ``i * seq_len`` of that stream, so a window may straddle two files; samples are
addressed by global index exactly like :class:`~zshard.train.data.CharDataset`'s, and the
:class:`~zshard.train.data.GlobalBatchSampler` gives a resumed run the same samples in the same
steps whatever its world size.

Nothing holds the corpus:

- local files are memory-mapped (read-only, ``MADV_RANDOM``); the pages of each window are
  handed back to the kernel (``MADV_DONTNEED``) once the window is copied out, so the resident
  set does not grow as training walks a corpus larger than memory (the data stays in the page
  cache, which the kernel manages);
- other fsspec URLs (``s3://``, ``gs://``, ``memory://`` ...) are read by byte range, in blocks of
  ``block_bytes`` kept in a bounded LRU cache, with the blocks of one batch fetched concurrently
  and the next blocks read ahead in the background when access is sequential. Nothing is ever
  downloaded whole.

A sidecar ``<file>.json`` (written by ``zshard tokenize``) may record the dtype and the tokenizer's
vocabulary size; it is read for the first file only.

Token ids at or above the model's vocabulary are found without reading the whole corpus: a sample
of the stream is checked at start, and every window as it is read.
"""

from __future__ import annotations

import bisect
import glob
import json
import mmap
import os
import posixpath
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from zshard.errors import ConfigError, StorageError
from zshard.store.storage import Storage, is_remote, open_storage, translate_errors

DTYPES: dict[str, np.dtype[Any]] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DEFAULT_DTYPE = "uint16"
META_SUFFIX = ".json"  # sidecar of a token file: <file>.json
META_FORMAT = "zshard-tokens"

BLOCK_BYTES = 1 << 20  # remote reads: one ranged GET per block
CACHE_BLOCKS = 32  # remote reads: at most this many blocks in memory (plus read-ahead in flight)
READAHEAD_BLOCKS = 2  # remote reads: blocks fetched ahead of sequential access
FETCH_THREADS = 8  # remote reads: concurrent ranged GETs
SAMPLE_TOKENS = 1 << 16  # vocabulary check at start: the first tokens of the stream ...
SAMPLE_CHUNKS = 8  # ... and this many chunks spread over it ...
SAMPLE_CHUNK_TOKENS = 4096  # ... of this many tokens each
# Local reads give pages back in aligned spans at least as large as the kernel's fault-around
# (64 KiB by default), which maps neighbouring pages of the file on every fault.
_RELEASE_ALIGN = 1 << 20

PathSpec = str | Sequence[str]


@dataclass(frozen=True)
class TokenFile:
    """One file of the stream: a local absolute path or an fsspec URL, and its size."""

    url: str
    nbytes: int

    @property
    def local(self) -> bool:
        return not is_remote(self.url)


def _has_magic(path: str) -> bool:
    return any(c in path for c in "*?[")


def _entries(path: PathSpec | None, what: str) -> list[str]:
    if path is None or (not isinstance(path, str) and len(path) == 0) or path == "":
        raise ConfigError(f"{what}: no data files given; give a file, a glob or a list of them")
    entries = [path] if isinstance(path, str) else list(path)
    for e in entries:
        if not isinstance(e, str) or not e:
            raise ConfigError(f"{what}: expected a path, URL or glob, got {e!r}")
    return entries


def local_path(entry: str) -> str:
    """A local path of a plain path or ``file://`` URL, ``~`` expanded."""
    return os.path.expanduser(entry[len("file://") :] if entry.startswith("file://") else entry)


def list_files(path: PathSpec | None, what: str = "data.path") -> list[TokenFile]:
    """Every file named by ``path`` (a path/URL, a glob, or a list of them), in stream order.

    Raises ConfigError (one line, naming ``what`` and the entry) for a missing file, a directory
    and a glob that matches nothing; StorageError when a store cannot be reached.
    """
    out: list[TokenFile] = []
    for entry in _entries(path, what):
        out.extend(_expand_remote(entry, what) if is_remote(entry) else _expand_local(entry, what))
    return out


def _expand_local(entry: str, what: str) -> list[TokenFile]:
    path = local_path(entry)
    if _has_magic(path):
        matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not matches:
            raise ConfigError(f"{what}: {entry!r} matches no file")
    elif os.path.isdir(path):
        raise ConfigError(
            f"{what}: {entry!r} is a directory; give its files, e.g. "
            f"{posixpath.join(entry, '*.bin')!r}"
        )
    elif not os.path.isfile(path):
        raise ConfigError(f"{what}: {entry!r} not found")
    else:
        matches = [path]
    with translate_errors(entry):
        return [TokenFile(os.path.abspath(p), os.path.getsize(p)) for p in matches]


def _expand_remote(entry: str, what: str) -> list[TokenFile]:
    import fsspec

    with translate_errors(entry):
        fs, fspath = fsspec.core.url_to_fs(entry)
        if _has_magic(fspath):
            fs.invalidate_cache()  # listings cached in this process may predate the files
            found = fs.glob(fspath, detail=True)
            items = sorted(
                (p, int(info["size"]))
                for p, info in found.items()
                if info.get("type", "file") != "directory"
            )
            if not items:
                raise ConfigError(f"{what}: {entry!r} matches no file")
        else:
            fs.invalidate_cache(fspath)
            try:
                info = fs.info(fspath)
            except FileNotFoundError:
                raise ConfigError(f"{what}: {entry!r} not found") from None
            if info.get("type") == "directory":
                raise ConfigError(
                    f"{what}: {entry!r} is a directory; give its files, e.g. "
                    f"{posixpath.join(entry, '*.bin')!r}"
                )
            items = [(fspath, int(info["size"]))]
        return [TokenFile(fs.unstrip_protocol(p), size) for p, size in items]


def _split_url(url: str) -> tuple[str, str]:
    if is_remote(url):
        head, _, name = url.rstrip("/").rpartition("/")
        return head, name
    return os.path.dirname(url), os.path.basename(url)


def read_meta(file: TokenFile | str) -> dict[str, Any] | None:
    """The sidecar ``<file>.json`` of a token file (dtype, vocab_size, ...), or None."""
    url = file.url if isinstance(file, TokenFile) else file
    head, name = _split_url(url + META_SUFFIX)
    storage = open_storage(head)
    try:
        if not storage.exists(name):
            return None
        meta = json.loads(storage.read(name))
    except (StorageError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        return None
    return meta


def resolve_dtype(dtype: str | None, meta: dict[str, Any] | None, what: str) -> str:
    """The dtype of a token stream: the configured one, else the sidecar's, else uint16."""
    recorded = meta.get("dtype") if meta else None
    if dtype is None:
        dtype = recorded if recorded in DTYPES else DEFAULT_DTYPE
    if dtype not in DTYPES:
        raise ConfigError(f"data.dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if recorded in DTYPES and recorded != dtype:
        raise ConfigError(
            f"data.dtype is {dtype} but {what} was written as {recorded} (its {META_SUFFIX} "
            f"sidecar); set data.dtype: {recorded} or leave it out"
        )
    return dtype


# ---------------------------------------------------------------------------------------------
# Readers


class _LocalFile:
    """A memory-mapped token file; windows are copied out and their pages given back."""

    def __init__(self, path: str, dtype: np.dtype[Any]) -> None:
        self.path = path
        self.dtype = dtype
        self._mm: mmap.mmap | None = None
        self._arr: np.ndarray[Any, Any] | None = None

    def _open(self) -> np.ndarray[Any, Any]:
        with translate_errors(self.path), open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):
            mm.madvise(mmap.MADV_RANDOM)  # windows come in shuffled order: no read-around
        self._mm = mm
        self._arr = np.frombuffer(mm, dtype=self.dtype)
        return self._arr

    def read_into(self, start: int, stop: int, dest: np.ndarray[Any, Any]) -> None:
        """Tokens ``[start, stop)`` of this file into ``dest`` (widened on the copy)."""
        arr = self._arr if self._arr is not None else self._open()
        dest[:] = arr[start:stop]
        if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            lo = (start * self.dtype.itemsize) // _RELEASE_ALIGN * _RELEASE_ALIGN
            hi = stop * self.dtype.itemsize
            hi = min(-(-hi // _RELEASE_ALIGN) * _RELEASE_ALIGN, len(self._mm))
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        self._arr = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None


class _RemoteBlocks:
    """Ranged reads of remote token files through a bounded LRU cache of fixed-size blocks.

    Every method is called from the dataset's (one) consumer thread; only the fetches run on the
    pool, and their results are taken into the cache by the consumer.
    """

    def __init__(
        self,
        files: Sequence[TokenFile],
        block_bytes: int = BLOCK_BYTES,
        cache_blocks: int = CACHE_BLOCKS,
        readahead: int = READAHEAD_BLOCKS,
        threads: int = FETCH_THREADS,
    ) -> None:
        self.files = list(files)
        self.block_bytes = block_bytes
        self.cache_blocks = max(1, cache_blocks)
        self.readahead = readahead
        self.threads = threads
        self._storages: dict[str, Storage] = {}
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._inflight: dict[tuple[int, int], Future[bytes]] = {}
        # Read-ahead not yet claimed by a read, oldest first: bounded, the oldest dropped.
        self._ahead: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.max_ahead = 4 * max(1, readahead)
        self._pool: ThreadPoolExecutor | None = None
        self._last: tuple[int, int] | None = None
        self._lock = threading.Lock()  # storages are created from pool threads
        self.bytes_fetched = 0
        self.requests = 0

    def _storage(self, head: str) -> Storage:
        with self._lock:
            s = self._storages.get(head)
            if s is None:
                s = self._storages[head] = open_storage(head)
            return s

    def _fetch(self, key: tuple[int, int]) -> bytes:
        f = self.files[key[0]]
        start = key[1] * self.block_bytes
        stop = min(start + self.block_bytes, f.nbytes)
        head, name = _split_url(f.url)
        return self._storage(head).read_range(name, start, stop)

    def _submit(self, key: tuple[int, int], ahead: bool = False) -> None:
        if key in self._cache or key in self._inflight:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zshard-data")
        self._inflight[key] = self._pool.submit(self._fetch, key)
        if ahead:
            self._ahead[key] = None
            while len(self._ahead) > self.max_ahead:
                old, _ = self._ahead.popitem(last=False)
                future = self._inflight.pop(old, None)
                if future is not None:
                    future.cancel()  # a running fetch finishes and is dropped

    def _take(self, key: tuple[int, int]) -> bytes:
        block = self._cache.get(key)
        if block is not None:
            self._cache.move_to_end(key)
            return block
        self._ahead.pop(key, None)
        future = self._inflight.pop(key, None)
        block = self._fetch(key) if future is None else future.result()
        self.bytes_fetched += len(block)
        self.requests += 1
        self._cache[key] = block
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return block

    def keys(self, index: int, start: int, stop: int) -> range:
        """Block numbers of file ``index`` covering bytes ``[start, stop)``."""
        return range(start // self.block_bytes, (stop - 1) // self.block_bytes + 1)

    def prefetch(self, ranges: Sequence[tuple[int, int, int]]) -> None:
        """Start fetching the blocks of ``(file index, start byte, stop byte)`` ranges."""
        for index, start, stop in ranges:
            for b in self.keys(index, start, stop):
                self._submit((index, b))

    def read(self, index: int, start: int, stop: int) -> bytes:
        blocks = self.keys(index, start, stop)
        for b in blocks:
            self._submit((index, b))  # all of a straddling range in flight at once
        parts = [self._take((index, b)) for b in blocks]
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        base = blocks.start * self.block_bytes
        first, last = (index, blocks.start), (index, blocks.stop - 1)
        prev = self._last
        sequential = prev is not None and prev[0] == index and first[1] - prev[1] in (0, 1)
        if self.readahead and sequential:
            nblocks = -(-self.files[index].nbytes // self.block_bytes)
            for b in range(last[1] + 1, min(last[1] + 1 + self.readahead, nblocks)):
                self._submit((index, b), ahead=True)
        self._last = last
        return data[start - base : stop - base]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._inflight.clear()
        self._ahead.clear()
        self._cache.clear()


# ---------------------------------------------------------------------------------------------
# The dataset


class TokenDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Windows of ``seq_len + 1`` tokens of one or many token files read as one stream.

    Args:
        path: a file, URL or glob, or a list of them (read in the order given).
        seq_len: tokens per sample; sample ``i`` covers stream tokens
            ``[i * seq_len, (i + 1) * seq_len + 1)`` (targets shift by one).
        dtype: ``uint16`` or ``uint32``; None: the sidecar's, else uint16.
        vocab_size: the model's vocabulary; a token id at or above it is a ConfigError. None:
            not checked.
        what: the config key named in errors.
        block_bytes, cache_blocks, readahead: remote reads (see the module docstring).
    """

    def __init__(
        self,
        path: PathSpec | None,
        *,
        seq_len: int,
        dtype: str | None = None,
        vocab_size: int | None = None,
        what: str = "data.path",
        block_bytes: int = BLOCK_BYTES,
        cache_blocks: int = CACHE_BLOCKS,
        readahead: int = READAHEAD_BLOCKS,
    ) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
            raise ConfigError(f"data.seq_len must be a positive integer, got {seq_len!r}")
        if vocab_size is not None and (isinstance(vocab_size, bool) or vocab_size <= 0):
            raise ConfigError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.what = what
        self.files = list_files(path, what)
        self.meta = read_meta(self.files[0])
        self.dtype_name = resolve_dtype(dtype, self.meta, what)
        self.dtype = DTYPES[self.dtype_name]
        item = self.dtype.itemsize
        for f in self.files:
            if f.nbytes == 0:
                raise ConfigError(f"{what}: {f.url} is empty")
            if f.nbytes % item:
                raise ConfigError(
                    f"{what}: {f.url} has {f.nbytes} bytes, not a multiple of {item} "
                    f"({self.dtype_name}); wrong data.dtype, or a truncated file"
                )
        counts = [f.nbytes // item for f in self.files]
        self._starts = [0]
        for c in counts:
            self._starts.append(self._starts[-1] + c)
        self.num_tokens = self._starts[-1]
        self.seq_len = seq_len
        if self.num_tokens < seq_len + 1:
            raise ConfigError(
                f"{what}: {self.num_tokens} tokens in {len(self.files)} file(s), fewer than one "
                f"sample of data.seq_len + 1 = {seq_len + 1}; use more data or a smaller seq_len"
            )
        self._len = (self.num_tokens - 1) // seq_len
        self.vocab_size = vocab_size
        self.source_vocab_size: int | None = (self.meta or {}).get("vocab_size")
        self._block_args = (block_bytes, cache_blocks, readahead)
        self._local: dict[int, _LocalFile] = {}
        self._remote: _RemoteBlocks | None = None
        self._any_remote = any(not f.local for f in self.files)
        self.tokens_read = 0
        self.read_seconds = 0.0
        if vocab_size is not None:
            self.check_sample()

    # -- plumbing -------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # open maps and thread pools stay behind
        state["_local"], state["_remote"] = {}, None
        return state

    def close(self) -> None:
        for f in self._local.values():
            f.close()
        self._local.clear()
        if self._remote is not None:
            self._remote.close()
            self._remote = None

    def _remote_blocks(self) -> _RemoteBlocks:
        if self._remote is None:
            b, c, r = self._block_args
            self._remote = _RemoteBlocks(self.files, b, c, r)
        return self._remote

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(file index, first token, stop token)`` in each file for stream tokens
        ``[start, stop)``."""
        out = []
        i = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < stop:
            lo = self._starts[i]
            end = min(stop, self._starts[i + 1])
            out.append((i, pos - lo, end - lo))
            pos = end
            i += 1
        return out

    def _read_into(self, start: int, stop: int, dest: np.ndarray[Any, Any]) -> None:
        """Stream tokens ``[start, stop)`` into ``dest`` (int64), unchecked."""
        pos = 0
        for i, a, b in self._pieces(start, stop):
            f = self.files[i]
            part = dest[pos : pos + b - a]
            if f.local:
                reader = self._local.get(i)
                if reader is None:
                    reader = self._local[i] = _LocalFile(f.url, self.dtype)
                reader.read_into(a, b, part)
            else:
                item = self.dtype.itemsize
                raw = self._remote_blocks().read(i, a * item, b * item)
                part[:] = np.frombuffer(raw, dtype=self.dtype)
            pos += b - a

    def read_tokens(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        """Stream tokens ``[start, stop)`` as int64, checked against ``vocab_size``."""
        t0 = time.perf_counter()
        out = np.empty(stop - start, dtype=np.int64)
        self._read_into(start, stop, out)
        if self.vocab_size is not None and out.size and int(out.max()) >= self.vocab_size:
            self._raise_vocab(out, start)
        self.tokens_read += stop - start
        self.read_seconds += time.perf_counter() - t0
        return out

    def _raise_vocab(self, tokens: np.ndarray[Any, Any], start: int) -> None:
        assert self.vocab_size is not None
        k = int(np.argmax(tokens >= self.vocab_size))
        pos = start + k
        i = bisect.bisect_right(self._starts, pos) - 1
        hint = (
            f"the tokenizer's vocabulary is {self.source_vocab_size}; "
            if self.source_vocab_size
            else ""
        )
        raise ConfigError(
            f"{self.what}: token id {int(tokens[k])} (token {pos - self._starts[i]} of "
            f"{self.files[i].url}) is >= the model's vocabulary size {self.vocab_size}; "
            f"{hint}set model.args.vocab_size to cover it, or check data.dtype "
            f"({self.dtype_name})"
        )

    def check_sample(self) -> None:
        """Read the start of the stream and chunks spread over it; check every token id."""
        n = self.num_tokens
        spans = [(0, min(n, SAMPLE_TOKENS))]
        for k in range(1, SAMPLE_CHUNKS + 1):
            lo = min(n - 1, n * k // (SAMPLE_CHUNKS + 1))
            spans.append((lo, min(n, lo + SAMPLE_CHUNK_TOKENS)))
        before = (self.tokens_read, self.read_seconds)
        for lo, hi in spans:
            self.read_tokens(lo, hi)
        self.tokens_read, self.read_seconds = before  # not training reads

    # -- samples --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def _index(self, i: int) -> int:
        if not -self._len <= i < self._len:
            raise IndexError(f"sample {i} out of range for {self._len} samples")
        return i % self._len

    def window(self, i: int) -> np.ndarray[Any, Any]:
        """The ``seq_len + 1`` tokens of sample ``i`` (int64)."""
        start = self._index(i) * self.seq_len
        return self.read_tokens(start, start + self.seq_len + 1)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: int64 tensors of shape (seq_len,), with ``y[t] == x[t + 1]``."""
        w = torch.from_numpy(self.window(i))
        return w[:-1], w[1:]

    def _byte_ranges(self, indices: Sequence[int]) -> list[tuple[int, int, int]]:
        item = self.dtype.itemsize
        out = []
        for i in indices:
            start = self._index(i) * self.seq_len
            for f, a, b in self._pieces(start, start + self.seq_len + 1):
                if not self.files[f].local:
                    out.append((f, a * item, b * item))
        return out

    def prefetch(self, indices: Sequence[int]) -> None:
        """Start reading the samples at ``indices`` in the background (remote files only)."""
        ranges = self._byte_ranges(indices)
        if ranges:
            self._remote_blocks().prefetch(ranges)

    def read_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of shape (len(indices), seq_len); remote blocks are fetched concurrently."""
        t0 = time.perf_counter()
        if self._any_remote:
            self.prefetch(indices)
        n, width = len(indices), self.seq_len + 1
        out = np.empty((n, width), dtype=np.int64)
        starts = [self._index(i) * self.seq_len for i in indices]
        for row, start in enumerate(starts):
            self._read_into(start, start + width, out[row])
        if self.vocab_size is not None and n and int(out.max()) >= self.vocab_size:
            row = int(np.argmax((out >= self.vocab_size).any(axis=1)))
            self._raise_vocab(out[row], starts[row])
        self.tokens_read += n * width
        self.read_seconds += time.perf_counter() - t0
        w = torch.from_numpy(out)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def stats(self) -> dict[str, float]:
        """Tokens read for training so far, and the seconds spent reading them."""
        rate = self.tokens_read / self.read_seconds if self.read_seconds > 0 else 0.0
        return {
            "tokens_read": float(self.tokens_read),
            "read_seconds": self.read_seconds,
            "tokens_per_s": rate,
        }
