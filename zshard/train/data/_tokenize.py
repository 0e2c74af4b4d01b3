"""Text to token files: a local Hugging Face dataset tokenized once with a local tokenizer.

Input (nothing is downloaded; a name that is not a local path is refused):

- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``split``
  picks from a ``DatasetDict``);
- any other directory, read by ``datasets.load_dataset(dir)`` (data files, split by file name);
- files or globs: ``.json``/``.jsonl`` (one document per record), ``.txt`` (lines, kept with
  their line breaks: the text as written), ``.csv``, ``.parquet``, ``.arrow`` (optionally
  compressed: ``.gz``, ``.bz2``, ``.xz``, ``.zst``).

The tokenizer is a local directory saved by ``save_pretrained`` (``tokenizer.json`` is read
with the ``tokenizers`` library; a directory without one, with transformers'
``AutoTokenizer(local_files_only=True)``), or a ``tokenizer.json`` file. Documents are encoded
without added special tokens and, for record-shaped inputs (not ``.txt`` lines), each is followed
by the tokenizer's end-of-sequence token when it has one.

Output: one token file (``uint16`` if the vocabulary fits, else ``uint32``, or as asked) and its
sidecar ``<file>.json`` (dtype, vocabulary size, counts, the fingerprint of inputs and
tokenizer). Writing is atomic and resumable: tokens go to ``<file>.tmp-resume`` with a progress
record beside it, saved every few MB after an fsync; a run that stops is continued by the next
from its last record, and the file appears under its final name (then its sidecar) only once
whole. The sidecar is what marks a token file complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from zshard.errors import ConfigError, OutputExistsError
from zshard.store.storage import is_remote, open_storage, translate_errors
from zshard.train.data._tokenizer import INSTALL_HINT, Tokenizer, load_tokenizer, pick_dtype
from zshard.train.data._tokens import (
    DTYPES,
    META_FORMAT,
    META_SUFFIX,
    PathSpec,
    _entries,
    _has_magic,
    local_path,
)

FORMAT_VERSION = 1
BATCH_DOCS = 1000  # documents per encode_batch call
SAVE_EVERY_BYTES = 8 << 20  # a progress record at least this often (after an fsync)
PARTIAL_SUFFIX = ".tmp-resume"
CACHE_DIR = ".zshard-tokens"  # next to the data, for data name hf_dataset

_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


# ---------------------------------------------------------------------------------------------
# Text sources


@dataclass(frozen=True)
class Inputs:
    """Local inputs of a tokenization: one dataset directory, or files of one kind."""

    directory: str | None
    files: tuple[str, ...]
    builder: str | None  # for files: json, text, csv, parquet, arrow

    def fingerprint(self) -> list[Any]:
        paths = self.files
        if self.directory is not None:
            paths = tuple(
                sorted(
                    os.path.join(d, n)
                    for d, _, names in os.walk(self.directory)
                    for n in names
                    if CACHE_DIR not in d
                )
            )
        out = []
        for p in paths:
            st = os.stat(p)
            out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
        return out

    @property
    def first(self) -> str:
        return self.directory if self.directory is not None else self.files[0]


def _builder(path: str) -> str | None:
    name = path.lower()
    for suffix in _COMPRESSED:
        name = name.removesuffix(suffix)
    return _BUILDERS.get(os.path.splitext(name)[1])


def resolve_inputs(path: PathSpec | None, what: str = "data.path") -> Inputs:
    """Check that the inputs exist locally and are of one readable kind."""
    entries = _entries(path, what)
    for e in entries:
        if is_remote(e):
            raise ConfigError(
                f"{what}: {e!r} is a URL; tokenizing reads local files or a local dataset "
                "directory (nothing is downloaded)"
            )
    if len(entries) == 1 and os.path.isdir(local_path(entries[0])):
        return Inputs(os.path.abspath(local_path(entries[0])), (), None)
    files: list[str] = []
    for e in entries:
        p = local_path(e)
        if _has_magic(p):
            import glob

            matches = sorted(m for m in glob.glob(p, recursive=True) if os.path.isfile(m))
            if not matches:
                raise ConfigError(f"{what}: {e!r} matches no file")
            files += matches
        elif os.path.isdir(p):
            raise ConfigError(f"{what}: {e!r} is a directory; give one directory alone, or files")
        elif not os.path.isfile(p):
            raise ConfigError(f"{what}: {e!r} not found")
        else:
            files.append(p)
    found = {f: _builder(f) for f in files}
    bad = next((f for f, kind in found.items() if kind is None), None)
    if bad is not None:
        raise ConfigError(
            f"{what}: cannot tell the format of {bad!r}; expected .json, .jsonl, .txt, .csv, "
            ".parquet or .arrow files, or a dataset directory"
        )
    kinds = {kind for kind in found.values() if kind is not None}
    if len(kinds) > 1:
        raise ConfigError(f"{what}: files of different kinds ({', '.join(sorted(kinds))})")
    for f in files:
        if os.path.getsize(f) == 0:
            raise ConfigError(f"{what}: {f} is empty")
    return Inputs(None, tuple(os.path.abspath(f) for f in files), kinds.pop())


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return datasets


class TextSource:
    """The documents of one split of local inputs, read in order, resumable by count."""

    def __init__(
        self,
        inputs: Inputs,
        split: str,
        text_field: str,
        what: str,
        keys: tuple[str, str] = ("data.split", "data.text_field"),
    ) -> None:
        self.split_key, self.field_key = keys
        self.inputs = inputs
        self.split = split
        self.text_field = text_field
        self.what = what
        self.num_rows: int | None = None
        self.separate_documents = inputs.builder != "text"  # .txt lines keep their newlines
        ds = self._open()
        self._ds = ds
        columns = getattr(ds, "column_names", None)
        if not columns:
            try:
                first = next(iter(ds.take(1)))
            except StopIteration:
                raise ConfigError(f"{what}: split {split!r} of {inputs.first} is empty") from None
            columns = list(first)
        if text_field not in columns:
            raise ConfigError(
                f"{self.field_key}: no field {text_field!r} in {inputs.first} (split {split!r}); "
                f"its fields are {', '.join(map(str, columns))}"
            )

    def _open(self) -> Any:
        ds_lib = _datasets()
        inputs, split, what = self.inputs, self.split, self.what
        d = inputs.directory
        try:
            if d is not None and os.path.isfile(os.path.join(d, "dataset_dict.json")):
                dd = ds_lib.load_from_disk(d)
                if split not in dd:
                    raise ConfigError(
                        f"{self.split_key}: no split {split!r} in {d}; it has {', '.join(dd)}"
                    )
                ds = dd[split]
            elif d is not None and os.path.isfile(os.path.join(d, "state.json")):
                ds = ds_lib.load_from_disk(d)
            elif d is not None:
                ds = ds_lib.load_dataset(d, split=split, streaming=True)
            else:
                kwargs: dict[str, Any] = {}
                if inputs.builder == "text":
                    kwargs["keep_linebreaks"] = True
                ds = ds_lib.load_dataset(
                    inputs.builder,
                    data_files={split: list(inputs.files)},
                    split=split,
                    streaming=True,
                    **kwargs,
                )
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"{what}: cannot read split {split!r} of {inputs.first}: "
                f"{' '.join(str(exc).split())[:300]}"
            ) from None
        if hasattr(ds, "__len__"):
            self.num_rows = len(ds)
        return ds

    def batches(self, skip: int, size: int | None = None) -> Iterator[list[str]]:
        """Lists of up to ``size`` texts, starting after the first ``skip`` documents."""
        ds, field = self._ds, self.text_field
        size = size or BATCH_DOCS
        if self.num_rows is not None:  # an Arrow dataset: random access
            for start in range(skip, self.num_rows, size):
                yield self._texts(ds[start : start + size][field])
            return
        stream = ds.skip(skip) if skip else ds
        for batch in stream.iter(batch_size=size):
            yield self._texts(batch[field])

    def _texts(self, values: list[Any]) -> list[str]:
        out = []
        for v in values:
            if v is None:
                v = ""
            if not isinstance(v, str):
                raise ConfigError(
                    f"{self.field_key}: field {self.text_field!r} of {self.inputs.first} holds "
                    f"{type(v).__name__}, not text"
                )
            out.append(v)
        return out


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class TokenizeResult:
    out: str
    tokens: int
    documents: int
    dtype: str
    vocab_size: int
    resumed_from: int  # documents already done by an earlier, interrupted run (0: fresh)
    cached: bool = False  # an existing complete file was reused


def fingerprint(inputs: Inputs, split: str, text_field: str, tok: Tokenizer, dtype: str) -> str:
    key = {
        "version": FORMAT_VERSION,
        "inputs": inputs.fingerprint(),
        "split": split,
        "text_field": text_field,
        "tokenizer": tok.fingerprint,
        "eos": tok.eos_id,
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _write_json(path: str, data: dict[str, Any]) -> None:
    """``data`` as JSON at local ``path``, published whole and durably by the store's atomic
    write (temporary name, fsync, rename, fsync of the directory)."""
    head, name = os.path.split(path)
    open_storage(head).write_atomic(name, json.dumps(data).encode())


def complete_meta(out: str, fp: str | None = None) -> dict[str, Any] | None:
    """The sidecar of a complete local token file (matching ``fp`` if given), else None."""
    try:
        with open(out + META_SUFFIX, encoding="utf-8") as f:
            meta = json.load(f)
        size = os.path.getsize(out)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        return None
    if fp is not None and meta.get("fingerprint") != fp:
        return None
    dtype = meta.get("dtype")
    if dtype not in DTYPES or size != int(meta.get("tokens", -1)) * DTYPES[dtype].itemsize:
        return None
    return meta


def _tokenize_into(
    partial: str,
    source: TextSource,
    tok: Tokenizer,
    dtype: str,
    fp: str,
    progress: bool,
    desc: str,
) -> tuple[int, int, int]:
    """Tokenize ``source`` into ``partial`` (continuing a matching earlier run); returns
    ``(tokens, documents, documents done before this run)``. No tokens at all is a ConfigError."""
    from tqdm import tqdm

    np_dtype = DTYPES[dtype]
    item = np_dtype.itemsize
    state_path = partial + ".json"
    docs = tokens = 0
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        if state.get("fingerprint") == fp and os.path.getsize(partial) >= state["tokens"] * item:
            docs, tokens = int(state["docs"]), int(state["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        docs = tokens = 0
    resumed = docs
    eos = tok.eos_id if source.separate_documents else None
    limit = np.iinfo(np_dtype).max
    mode = "r+b" if docs else "wb"
    with open(partial, mode) as f:
        f.truncate(tokens * item)
        f.seek(tokens * item)
        unsaved = 0
        bar = tqdm(
            total=source.num_rows,
            initial=docs,
            desc=desc,
            unit="doc",
            disable=not progress or not sys.stderr.isatty(),
            file=sys.stderr,
        )
        with bar:
            for texts in source.batches(docs):
                ids = tok.encode_batch(texts)
                if eos is not None:
                    for seq in ids:
                        seq.append(eos)
                flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
                if flat.size and int(flat.max()) > limit:
                    raise ConfigError(
                        f"token id {int(flat.max())} does not fit {dtype}; use uint32"
                    )
                f.write(flat.astype(np_dtype).tobytes())
                docs += len(texts)
                tokens += int(flat.size)
                unsaved += int(flat.size) * item
                bar.update(len(texts))
                bar.set_postfix(tokens=tokens)
                if unsaved >= SAVE_EVERY_BYTES:
                    f.flush()
                    os.fsync(f.fileno())
                    _write_json(state_path, {"fingerprint": fp, "docs": docs, "tokens": tokens})
                    unsaved = 0
        f.flush()
        os.fsync(f.fileno())
    if tokens == 0:
        _discard(partial)
        raise ConfigError(
            f"{source.what}: no tokens in split {source.split!r} of {source.inputs.first}"
        )
    return tokens, docs, resumed


def _meta(
    fp: str, dtype: str, tok: Tokenizer, tokens: int, docs: int, source: TextSource
) -> dict[str, Any]:
    return {
        "format": META_FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id if source.separate_documents else None,
        "tokens": tokens,
        "documents": docs,
        "tokenizer": tok.path,
        "source": source.inputs.first,
        "split": source.split,
        "text_field": source.text_field,
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def tokenize(
    inputs: PathSpec,
    out: str,
    *,
    tokenizer: str,
    dtype: str | None = None,
    text_field: str = "text",
    split: str = "train",
    overwrite: bool = False,
    progress: bool = True,
) -> TokenizeResult:
    """Tokenize local text ``inputs`` into the token file ``out`` (a path or fsspec URL) and its
    sidecar ``out.json``. Resumes an interrupted run of the same inputs and tokenizer.

    Everything is checked before anything is written: inputs, tokenizer, dtype, split, text
    field, and that ``out`` does not exist (unless ``overwrite``).
    """
    what = "INPUT"
    src = resolve_inputs(inputs, what)
    tok = load_tokenizer(tokenizer, "--tokenizer")
    dtype = pick_dtype(dtype, tok.vocab_size, "--dtype")
    remote = is_remote(out)
    if not out or out.endswith("/"):
        raise ConfigError(f"OUT: expected a file name, got {out!r}")
    head, _, name = out.rstrip("/").rpartition("/") if remote else ("", "", "")
    if remote:
        storage = open_storage(head)
        exists = storage.exists(name) or storage.exists(name + META_SUFFIX)
    else:
        out = os.path.abspath(local_path(out))
        exists = os.path.exists(out) or os.path.exists(out + META_SUFFIX)
        if os.path.isdir(out):
            raise ConfigError(f"OUT: {out} is a directory; give a file name such as {out}/x.bin")
    if exists and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    source = TextSource(src, split, text_field, what, ("--split", "--text-field"))
    fp = fingerprint(src, split, text_field, tok, dtype)
    if remote:
        spool = os.path.join(tempfile.gettempdir(), "zshard-tokenize")
        os.makedirs(spool, exist_ok=True)
        partial = os.path.join(
            spool, hashlib.sha256(out.encode()).hexdigest()[:16] + ".bin" + PARTIAL_SUFFIX
        )
    else:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        partial = out + PARTIAL_SUFFIX
    tokens, docs, resumed = _tokenize_into(
        partial, source, tok, dtype, fp, progress, f"tokenize {os.path.basename(out)}"
    )
    meta = _meta(fp, dtype, tok, tokens, docs, source)
    if remote:
        _upload(partial, head, name, meta)
    else:
        _publish(partial, out, meta)
    _discard(partial)
    return TokenizeResult(out, tokens, docs, dtype, tok.vocab_size, resumed)


def _publish(partial: str, out: str, meta: dict[str, Any]) -> None:
    """The finished local ``partial`` under its name ``out``, then its sidecar."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(out + META_SUFFIX)  # a stale sidecar must never describe the new file
    os.replace(partial, out)
    _write_json(out + META_SUFFIX, meta)  # last: the sidecar marks it complete


def _discard(partial: str) -> None:
    for p in (partial, partial + ".json"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)


def _upload(partial: str, head: str, name: str, meta: dict[str, Any]) -> None:
    storage = open_storage(head)
    with translate_errors(head, name):
        if storage.exists(name + META_SUFFIX):
            storage.remove_tree(name + META_SUFFIX)
    stream = storage.open_stream(name)
    try:
        with open(partial, "rb") as f:
            while block := f.read(8 << 20):
                stream.write(block)
        stream.commit()
    except BaseException:
        stream.abort()
        raise
    storage.write_atomic(name + META_SUFFIX, json.dumps(meta).encode())


def cached_tokens(
    path: PathSpec | None,
    *,
    tokenizer: str,
    split: str = "train",
    text_field: str = "text",
    dtype: str | None = None,
    cache: str | None = None,
    progress: bool = True,
    what: str = "data.path",
) -> str:
    """The token file of ``path``'s ``split``, tokenized on first use into a cache next to the
    data (``<parent>/.zshard-tokens/``, or ``cache``). Processes that ask at once (the ranks of
    one node) wait on a file lock while the first one tokenizes; a stopped run resumes."""
    src = resolve_inputs(path, what)
    tok = load_tokenizer(tokenizer, "data.tokenizer")
    dtype = pick_dtype(dtype, tok.vocab_size, "data.dtype")
    fp = fingerprint(src, split, text_field, tok, dtype)
    if cache is not None and is_remote(cache):
        raise ConfigError(f"data.cache: {cache!r} is a URL; give a local directory")
    directory = (
        os.path.abspath(local_path(cache))
        if cache
        else os.path.join(os.path.dirname(src.first.rstrip("/")), CACHE_DIR)
    )
    stem = os.path.basename(src.first.rstrip("/")).split(".")[0] or "data"
    out = os.path.join(directory, f"{stem}-{split}-{fp[:16]}.bin")
    if complete_meta(out, fp) is not None:
        return out
    source = TextSource(src, split, text_field, what)  # checks split and field before writing
    with translate_errors(directory):
        os.makedirs(directory, exist_ok=True)
    with _file_lock(out + ".lock"):
        if complete_meta(out, fp) is not None:  # another process finished it meanwhile
            return out
        partial = out + PARTIAL_SUFFIX
        tokens, docs, _ = _tokenize_into(
            partial, source, tok, dtype, fp, progress, f"tokenize {stem} ({split})"
        )
        _publish(partial, out, _meta(fp, dtype, tok, tokens, docs, source))
        _discard(partial)
    return out


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: one process at a time is the user's job
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
