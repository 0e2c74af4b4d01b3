"""A small GPT-style decoder-only transformer: zshard's built-in default model.

nanoGPT-like and plain PyTorch, so the ZeRO engine is exercised on a model whose every parameter a
reader can name: token and learned position embeddings, ``n_layer`` pre-LayerNorm blocks (causal
self-attention + GELU MLP), a final LayerNorm and an LM head tied to the token embedding.

The model can be built on the ``meta`` device (ZeRO stage 3 never materialises the whole model on
one rank) and materialised later::

    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=256))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()  # same parameters as `torch.manual_seed(0); GPT(cfg)` on CPU

The default size (``GPTConfig(vocab_size=256)``) has 842,496 parameters (``num_params``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from zshard.errors import ConfigError, InvalidArgumentError

INIT_STD = 0.02  # GPT-2's init scale; keeps the initial loss near ln(vocab_size)


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Sizes of a :class:`GPT`. Validated at construction so bad YAML fails at start-up."""

    vocab_size: int
    seq_len: int = 128  # longest sequence; sizes the learned position embedding
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            # bool is an int subclass; `n_layer: true` in YAML is a mistake, not 1.
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ConfigError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by "
                f"GPTConfig.n_head ({self.n_head}); pick a d_model that is a multiple of n_head"
            )
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(
                f"GPTConfig.tie_embeddings must be true or false, got {self.tie_embeddings!r}"
            )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)  # weight: (3*d_model, d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.out(y))


class MLP(nn.Module):
    """Position-wise feed-forward: d_model -> 4*d_model -> GELU -> d_model."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.w2 = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w2(F.gelu(self.w1(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer over token ids of shape (B, T) with T <= ``cfg.seq_len``.

    Args:
        cfg: the model sizes.
        activation_checkpointing: recompute each block in backward instead of keeping its
            activations (training only); may also be toggled later through the attribute.
    """

    def __init__(self, cfg: GPTConfig, *, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        # The submodules' own default inits are overwritten by init_weights below; forking the
        # CPU RNG hides their draws, so `manual_seed(s); GPT(cfg)` gives the same parameters as
        # building on meta and calling init_weights() after `manual_seed(s)`.
        with torch.random.fork_rng(devices=[]):
            self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
            self.drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.d_model)
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()  # on meta this is a no-op that draws no random numbers

    def tie_weights(self) -> None:
        """Make the LM head share the token embedding's Parameter (when ``tie_embeddings``).

        ``to_empty`` off the meta device gives each module a new Parameter and so unties them;
        :meth:`init_weights` calls this again.
        """
        if self.cfg.tie_embeddings and self.lm_head.weight is not self.tok_emb.weight:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter from the current torch RNG, in module order.

        Linear and embedding weights ~ N(0, 0.02), biases 0, LayerNorm weight 1 and bias 0.
        """
        self.tie_weights()
        seen: set[int] = set()  # a tied Parameter is drawn once, by its first owner
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                if isinstance(module, nn.LayerNorm) and name == "weight":
                    nn.init.ones_(param)
                elif name == "bias":
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=INIT_STD)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of shape (B, T, vocab_size), or the mean cross-entropy loss given targets.

        Args:
            idx: int64 token ids, shape (B, T).
            targets: int64 next-token ids, shape (B, T); when given, returns a scalar loss.
        """
        _, t = idx.shape
        if t > self.cfg.seq_len:
            raise InvalidArgumentError(
                f"sequence length {t} exceeds GPTConfig.seq_len {self.cfg.seq_len}; "
                "build the model with a larger seq_len or feed shorter windows"
            )
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, d_model)
        # Non-reentrant checkpointing works with ZeRO's parameter hooks and preserves the RNG
        # state, so dropout masks match between forward and recompute.
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def num_params(model: nn.Module) -> int:
    """Number of parameter elements, counting a tied Parameter once (works on meta too)."""
    # Module.parameters() already yields each Parameter object once.
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: GPTConfig, *, activation_checkpointing: bool = False) -> GPT:
    """Build a :class:`GPT` on the default device; under ``torch.device("meta")`` to defer."""
    return GPT(cfg, activation_checkpointing=activation_checkpointing)
