"""``zshard demo``: a round trip through every conversion on a generated model.

Generates transformer-shaped weights (fp32 and bf16, a tied embedding, odd shapes), writes them as
safetensors, imports them for N ranks, reshards to M, verifies every chunk, consolidates to bf16
and fp32, and checks the results bitwise against the originals.

Its outputs (:data:`OUTPUTS`, in ``workdir``) are never replaced unless ``overwrite``: the check
comes before anything is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from safetensors.torch import load_file, save_file

from zshard.convert.consolidate import consolidate
from zshard.convert.importer import import_safetensors
from zshard.convert.reshard import reshard
from zshard.convert.safetensors_io import TIES_METADATA_KEY
from zshard.errors import OutputExistsError, ZshardError
from zshard.store.reader import CheckpointReader
from zshard.store.verify import verify


def generated_model(
    seed: int = 0, d: int = 96, layers: int = 3, vocab: int = 257
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"embed.weight": torch.randn(vocab, d, generator=g)}
    for i in range(layers):
        p = f"blocks.{i}"
        sd[f"{p}.attn.qkv.weight"] = torch.randn(3 * d, d, generator=g)
        sd[f"{p}.attn.proj.weight"] = torch.randn(d, d, generator=g).to(torch.bfloat16)
        sd[f"{p}.mlp.fc.weight"] = torch.randn(4 * d, d, generator=g)
        sd[f"{p}.mlp.fc.bias"] = torch.randn(4 * d, generator=g)
        sd[f"{p}.ln.weight"] = torch.ones(d)
    sd["final.scale"] = torch.tensor(0.5)
    sd["step_count"] = torch.tensor([7], dtype=torch.int64)
    return sd


OUTPUTS = ("generated.safetensors", "ckpt", "model-keep.safetensors", "model-bf16.safetensors")


def existing_outputs(workdir: str) -> list[str]:
    """The demo outputs already in ``workdir``."""
    return [name for name in OUTPUTS if os.path.lexists(os.path.join(workdir, name))]


def run_demo(
    workdir: str, world_size: int = 4, to: int = 3, *, overwrite: bool = False
) -> Iterator[str]:
    """The demo, one progress line at a time (a generator: nothing runs until iterated)."""
    found = existing_outputs(workdir)
    if found and not overwrite:
        raise OutputExistsError(
            f"{workdir} already holds demo output ({', '.join(found)}); pass --overwrite to "
            "replace it, or choose another --workdir"
        )
    os.makedirs(workdir, exist_ok=True)
    src = os.path.join(workdir, "generated.safetensors")
    root = os.path.join(workdir, "ckpt")
    sd = generated_model()
    # lm_head shares the embedding: stored once, the alias recorded as transformers expects.
    save_file(
        sd, src, metadata={"format": "pt", TIES_METADATA_KEY: '{"lm_head.weight": "embed.weight"}'}
    )
    n = sum(t.numel() for t in sd.values())
    yield f"generated {len(sd)} tensors, {n} parameters -> {src}"
    ref = import_safetensors(src, root, world_size, overwrite=overwrite)
    yield f"imported for {world_size} ranks -> {ref.url}"
    ref2 = reshard(ref.url, to, overwrite=overwrite)
    yield f"resharded {world_size} -> {to} ranks -> {ref2.url}"
    report = verify(ref2.url, all_faults=True)
    if not report.ok:
        raise ZshardError(f"verify found faults: {report.faults[0]}")
    yield f"verified {report.chunks} chunks ({report.bytes_read} bytes), no faults"
    reader = CheckpointReader.open(ref2.url)
    for entry in reader.manifest.tensors:
        got = reader.read_torch(entry.name, entry.kind).reshape(entry.shape)
        if not torch.equal(got, sd[entry.name]):
            raise ZshardError(f"demo: {entry.name} changed in the round trip")
    for dtype in ("keep", "bf16"):
        out = os.path.join(workdir, f"model-{dtype}.safetensors")
        consolidate(ref2.url, out, dtype=dtype, overwrite=overwrite)
        loaded = load_file(out)
        for name, t in sd.items():
            want = t if dtype == "keep" or not t.is_floating_point() else t.to(torch.bfloat16)
            if not torch.equal(loaded[name], want):
                raise ZshardError(f"demo: consolidated {name} ({dtype}) differs")
        yield f"consolidated ({dtype}) -> {out}: bitwise equal to the source"
    yield "demo ok"
