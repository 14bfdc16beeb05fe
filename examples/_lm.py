"""Model and data for examples/train.py: a small decoder-only character-level transformer LM.

Plain PyTorch only (no distopt imports), so the pieces can be reused by other examples and
tests: :class:`CharData` (corpus -> token ids, rank-sharded batches) and :class:`TinyGPT`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_CORPUS = Path(__file__).resolve().parent / "data" / "corpus.txt"


# --------------------------------------------------------------------------------- data


class CharData:
    """A text corpus as a 1-D tensor of character ids, and deterministic sharded batches.

    The batch for ``(step, micro_step)`` depends only on ``seed``, ``step``, ``micro_step``
    and the world size: all ranks draw the same global set of window offsets from a generator
    seeded with those numbers and each rank takes its own contiguous slice (as
    ``DistributedSampler`` does), so ranks never see the same window in a step and a run
    resumed at step ``k`` sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, text: str):
        if len(text) < 2:
            raise ValueError("corpus is too short")
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    @classmethod
    def from_file(cls, path: str | Path = DEFAULT_CORPUS) -> CharData:
        return cls(Path(path).read_text(encoding="utf-8"))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return self.ids.numel()

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def batch(
        self,
        step: int,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        micro_step: int = 0,
        device: torch.device | str = "cpu",
    ) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` of shape ``(batch_size, seq_len)`` for this rank."""
        n_windows = len(self) - seq_len - 1
        if n_windows < 1:
            raise ValueError(f"seq_len {seq_len} is too long for a corpus of {len(self)} chars")
        g = torch.Generator()
        # One stream per (seed, step, micro_step); the mixing constants keep streams apart.
        g.manual_seed((seed * 1_000_003 + step * 9_176 + micro_step * 131) % (2**63 - 1))
        starts = torch.randint(0, n_windows, (batch_size * world_size,), generator=g)
        mine = starts[rank * batch_size : (rank + 1) * batch_size]
        offs = torch.arange(seq_len + 1)
        windows = self.ids[mine[:, None] + offs[None, :]]
        windows = windows.to(device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:]


# --------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    vocab_size: int
    seq_len: int = 128
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    dropout: float = 0.0
    tie_weights: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_head {cfg.n_head}")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model),
            nn.GELU(),
            nn.Linear(4 * cfg.d_model, cfg.d_model),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token + learned position embedding, ``n_layer`` pre-LN blocks, final LN, LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        # Scaled init of the residual projections (GPT-2).
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None):
        t = idx.shape[1]
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than seq_len {self.cfg.seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0) -> Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx`` (shape ``(batch, t)``)."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.seq_len :])[:, -1, :] / max(temperature, 1e-6)
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
