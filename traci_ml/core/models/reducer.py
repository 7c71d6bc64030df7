"""The reducer: a Transformer encoder that reads each expert's embedding as one token.

Tokens (B, N, d) get a learned per-expert identity embedding; a learned [CLS] token is
prepended and never masked, so a sample whose experts are all absent still has a defined
output. Absent (or dropped-out) experts are removed with a key-padding mask. The head reads
the [CLS] output. Attention is written out explicitly so the [CLS] -> expert weights of the
last layer can be reported. Only [CLS] is read from the last block, so that block computes
the [CLS] row alone (its query, output projection and feed-forward; keys and values for every
token): the same function with about a third fewer FLOPs in a 2-layer reducer. No sockets here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from traci_ml.core.config import Config, ReducerConfig
from traci_ml.core.models.optim import linear_decay_scale, make_adam, weight_decay_for
from traci_ml.core.tensors import derive_seed


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, first_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, T, d); mask: (B, T) True where the key is absent. first_only: queries from
        # token 0 alone (Q = 1 instead of T); the same weights, the same rows of the result.
        B, T, d = x.shape
        h = d // self.heads
        if first_only:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :1], w[:d], b[:d]).view(B, 1, self.heads, h).transpose(1, 2)
            k, v = F.linear(x, w[d:], b[d:]).view(B, T, 2, self.heads, h).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).view(B, T, 3, self.heads, h).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(h)  # (B, H, Q, T)
        att = att.masked_fill(mask[:, None, None, :], float("-inf")).softmax(dim=-1)
        y = self.drop(att) @ v  # (B, H, Q, h)
        return self.proj(y.transpose(1, 2).reshape(B, q.shape[2], d)), att


class Block(nn.Module):
    """Pre-norm Transformer block."""

    def __init__(self, d: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d), nn.Dropout(dropout))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, first_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d) -> (B, T, d), or (B, 1, d) for token 0 alone with ``first_only``."""
        y, att = self.attn(self.ln1(x), mask, first_only)
        x = (x[:, :1] if first_only else x) + y
        return x + self.mlp(self.ln2(x)), att


class Reducer(nn.Module):
    """``linear``: the width of the linear path (``reducer.linear_path``,
    ``Config.linear_width``; 0: none). The output is a linear model of the present tokens'
    last ``linear`` coordinates (each expert's linear map of its columns,
    ``models.expert.LinearPath``; an absent token's count as 0) plus a bias, plus the
    network's output times ``gate``, a scalar from ``LINEAR_GATE_INIT`` whose L2 penalty is
    worth ``LINEAR_GATE_ROWS`` rows (``build_reducer``): the network adds to a linear model
    where the data pay for it. One output from one coordinate each (regression): their sum;
    else ``linear_head`` maps every expert's coordinates to the outputs."""

    def __init__(self, *, n_experts: int, d: int, out_dim: int, cfg: ReducerConfig,
                 linear: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.n_experts, self.out_dim, self.linear = n_experts, out_dim, linear
        self.identity = nn.Parameter(torch.randn(n_experts, d) * 0.02)  # per-expert id
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.ln_in = nn.LayerNorm(d)  # experts' embeddings arrive at arbitrary scales
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, cfg.ff, cfg.dropout) for _ in range(cfg.layers)
        )
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, out_dim)
        if linear:
            self.gate = nn.Parameter(torch.full((), LINEAR_GATE_INIT))
            self.linear_bias = nn.Parameter(torch.zeros(out_dim))
        # one output of width 1 (regression): the coordinates summed; else a map from every
        # expert's coordinates to the outputs (no bias; the experts' maps start at 0)
        self.linear_head = (nn.Linear(n_experts * linear, out_dim, bias=False)
                            if linear and (linear, out_dim) != (1, 1) else None)  # fmt: skip

    def forward(
        self, tokens: torch.Tensor, absent: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, d), absent (B, N) bool -> (logits (B, out), cls attention (B, N))."""
        B = tokens.shape[0]
        x = self.ln_in(tokens) + self.identity  # (B, N, d)
        x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)  # (B, 1+N, d)
        mask = F.pad(absent, (1, 0), value=False)  # [CLS] is always present
        att = x.new_zeros(0)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, att = block(x, mask, i == last)  # the last block: the [CLS] row only
        cls_att = att[:, :, 0, 1:].mean(dim=1)  # (B, N): last layer, [CLS] query, mean heads
        out = self.head(self.ln_out(x[:, 0]))
        if self.linear:  # the present tokens' linear coordinates: summed, or to the outputs
            present = (~absent).to(tokens.dtype)[:, :, None]  # (B, N, 1)
            lin = tokens[:, :, -self.linear :] * present  # (B, N, width)
            wide = lin.sum(dim=1) if self.linear_head is None else self.linear_head(lin.flatten(1))
            out = self.gate * out + wide + self.linear_bias
        return out, cls_att

    @staticmethod
    def saved_sizes(weights: Any) -> tuple[int, int] | None:
        """(experts, outputs) a reducer's saved state dict was built for; None if it is not
        one (``traci_ml/core/fits.py`` names a changed number of views by it)."""
        try:
            return int(weights["identity"].shape[0]), int(weights["head.bias"].shape[0])
        except (KeyError, TypeError, AttributeError, IndexError):
            return None


def build_reducer(
    config: Config,
    *,
    n_experts: int,
    out_dim: int,
    device: torch.device | str = "cpu",
    train_rows: int | None = None,
) -> tuple[Reducer, torch.optim.Adam]:
    """The reducer and its Adam, seeded by the run's seed: what the reducer service, the
    reference step and the bench all start from. ``train_rows``: the rows training draws
    from, which ``reducer.weight_decay: auto`` scales by (None: a penalty of 0, for a
    reducer that only predicts)."""
    torch.manual_seed(derive_seed(config.seed, "reducer"))
    reducer = Reducer(n_experts=n_experts, d=config.embed_dim, out_dim=out_dim, cfg=config.reducer,
                      linear=config.linear_width)  # fmt: skip
    reducer = reducer.to(device)
    decay = 0.0 if train_rows is None else weight_decay_for(config.reducer.weight_decay, train_rows)
    own = ("gate", "linear_head.weight")
    groups: list[dict] = [{"params": [p for n, p in reducer.named_parameters() if n not in own]}]
    if reducer.linear:  # the gate's own penalty: gate**2 * LINEAR_GATE_ROWS / n, as an L2 term
        extra = 0.0 if train_rows is None else 2 * LINEAR_GATE_ROWS / max(int(train_rows), 1)
        groups.append({"params": [reducer.gate], "extra_decay": extra})
    if reducer.linear_head is not None:  # a part of the linear model: its prior
        groups.append({"params": [reducer.linear_head.weight],
                       "decay_scale": linear_decay_scale(config.task)})  # fmt: skip
    opt = make_adam(groups, lr=config.reducer.lr, weight_decay=decay)
    return reducer, opt


# The prior on the linear path's gate, in rows: its L2 penalty beside the mean loss over n
# training rows is gate**2 * LINEAR_GATE_ROWS / n (docs/config.md "Linear path").
LINEAR_GATE_ROWS = 1600.0
LINEAR_GATE_INIT = 1.0  # the gate at start: the network whole (from 0 it would get no gradient)


def dropout_mask(config: Config, absent: torch.Tensor, seq: int) -> torch.Tensor:
    """The padding mask of training step ``seq``: ``absent`` (B, N) plus the expert dropout,
    drawn from a generator seeded by (seed, seq), so every life and the reference draw alike.
    Without dropout no generator is made."""
    if config.reducer.expert_dropout <= 0:
        return absent
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "dropout", seq))
    return expert_dropout_mask(absent, config.reducer.expert_dropout, gen)


def expert_dropout_mask(
    absent: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mask each present token with probability ``p`` (training only). (B, N) bool."""
    if p <= 0:
        return absent
    drop = torch.rand(absent.shape, generator=generator, device="cpu") < p
    return absent | drop.to(absent.device)


def task_loss(
    task: str, logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy (classification) or MSE (regression), reduced as torch reduces."""
    if task == "classification":
        return F.cross_entropy(logits, y, reduction=reduction)
    return F.mse_loss(logits.squeeze(-1), y, reduction=reduction)


def loss_and_metric(task: str, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy and accuracy, or MSE and (standardised) RMSE."""
    loss = task_loss(task, logits, y)
    if task == "classification":
        return loss, float((logits.argmax(dim=-1) == y).float().mean())
    return loss, float(loss.detach().sqrt())
