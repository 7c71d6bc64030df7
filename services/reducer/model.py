"""The reducer: a Transformer encoder that reads each expert's embedding as one token.

Tokens (B, N, d) get a learned per-expert identity embedding; a learned [CLS] token is
prepended and never masked, so a sample whose experts are all absent still has a defined
output. Absent (or dropped-out) experts are removed with a key-padding mask. The head reads
the [CLS] output. Attention is written out explicitly so the [CLS] -> expert weights of the
last layer can be reported. No sockets here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from traci_ml.config import ReducerConfig


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, T, d); mask: (B, T) True where the key is absent
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)  # (B, H, T, T)
        att = att.masked_fill(mask[:, None, None, :], float("-inf")).softmax(dim=-1)
        y = self.drop(att) @ v  # (B, H, T, d/H)
        return self.proj(y.transpose(1, 2).reshape(B, T, d)), att


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, att = self.attn(self.ln1(x), mask)
        x = x + y
        return x + self.mlp(self.ln2(x)), att


class Reducer(nn.Module):
    def __init__(self, *, n_experts: int, d: int, out_dim: int, cfg: ReducerConfig) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.identity = nn.Parameter(torch.randn(n_experts, d) * 0.02)  # per-expert id
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.ln_in = nn.LayerNorm(d)  # experts' embeddings arrive at arbitrary scales
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, cfg.ff, cfg.dropout) for _ in range(cfg.layers)
        )
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, out_dim)

    def forward(
        self, tokens: torch.Tensor, absent: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, d), absent (B, N) bool -> (logits (B, out), cls attention (B, N))."""
        B = tokens.shape[0]
        x = self.ln_in(tokens) + self.identity  # (B, N, d)
        x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)  # (B, 1+N, d)
        mask = F.pad(absent, (1, 0), value=False)  # [CLS] is always present
        att = x.new_zeros(0)
        for block in self.blocks:
            x, att = block(x, mask)
        cls_att = att[:, :, 0, 1:].mean(dim=1)  # (B, N): last layer, [CLS] query, mean heads
        return self.head(self.ln_out(x[:, 0])), cls_att


def expert_dropout_mask(
    absent: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mask each present token with probability ``p`` (training only). (B, N) bool."""
    if p <= 0:
        return absent
    drop = torch.rand(absent.shape, generator=generator, device="cpu") < p
    return absent | drop.to(absent.device)


def loss_and_metric(task: str, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy and accuracy, or MSE and (standardised) RMSE."""
    if task == "classification":
        loss = F.cross_entropy(logits, y)
        return loss, float((logits.argmax(dim=-1) == y).float().mean())
    loss = F.mse_loss(logits.squeeze(-1), y)
    return loss, float(loss.detach().sqrt())
