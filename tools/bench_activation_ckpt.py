"""Activation memory and step time with and without activation checkpointing (small, CPU).

    python tools/bench_activation_ckpt.py            # a Markdown table on stdout (< 1 min)

Models: the built-in GPT (4 layers, d_model 128, the ``tiny`` config's size) and a Hugging Face
Llama built from a config (4 layers, hidden 128, 4 heads, 2 KV heads), both on batches of
8 x 128 tokens in fp32, one process. **Activation memory** is the bytes autograd saves for
backward during one forward (counted with ``torch.autograd.graph.saved_tensors_hooks``: exact
and independent of the allocator); the model's parameters and gradients are not in it. **Step
time** is forward + backward, the median of 7 after 2 warm-ups, with
``torch.set_num_threads(1)``. Checkpointing is applied as ``zshard train`` applies
``train.activation_checkpointing`` (``zshard.train.models.apply_activation_checkpointing``).
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from zshard.train.models import GPT, GPTConfig, apply_activation_checkpointing  # noqa: E402

BATCH, SEQ, VOCAB = 8, 128, 256


def saved_bytes(model: Any, x: torch.Tensor, y: torch.Tensor) -> int:
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, y)
    return total[0]


def step_ms(model: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    times = []
    for i in range(9):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(x, y).backward()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def models() -> list[tuple[str, Any]]:
    torch.manual_seed(0)
    out: list[tuple[str, Any]] = [
        ("built-in GPT", GPT(GPTConfig(vocab_size=VOCAB, seq_len=SEQ, n_layer=4, d_model=128)))
    ]
    try:
        from zshard.train.models import make_model

        llama = {
            "model_type": "llama",
            "vocab_size": VOCAB,
            "hidden_size": 128,
            "intermediate_size": 344,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": SEQ,
        }
        out.append(("HF Llama (from a config)", make_model("hf", config=llama).model))
    except Exception as e:  # transformers missing: the GPT rows only
        print(f"skipping the HF model: {e}", file=sys.stderr)
    return out


def main() -> int:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    y = torch.roll(x, -1, 1)
    rows = []
    for name, base in models():
        base.train()
        for label, spec in (
            ("off", False),
            ("first 2 of 4 blocks", {"number_checkpoints": 2}),
            ("every block", True),
        ):
            model = copy.deepcopy(base)
            apply_activation_checkpointing(model, spec)
            mem = saved_bytes(model, x, y)
            rows.append((name, label, mem, step_ms(model, x, y)))
    load = os.getloadavg()[0]
    print("| model | checkpointing | activation memory | step time (fwd+bwd) |")
    print("|---|---|---|---|")
    base_mem: dict[str, int] = {}
    for name, label, mem, ms in rows:
        base_mem.setdefault(name, mem)
        share = f" ({mem / base_mem[name]:.0%})" if mem != base_mem[name] else ""
        print(f"| {name} | {label} | {mem / 2**20:.1f} MiB{share} | {ms:.0f} ms |")
    print(f"\n(1-minute load average during the run: {load:.1f} on {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
