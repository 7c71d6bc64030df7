"""A user-written expert network, plugged in by import path (docs/tutorial.md).

TRACI builds it as ``GatedExpert(in_dim=..., out_dim=..., **kwargs)`` from
``model: {module: "examples.experts:GatedExpert", kwargs: {...}}``. Any ``nn.Module`` that maps
``(batch, in_dim)`` to ``(batch, out_dim)`` works; the module must be importable by the
expert process (run from the repository root, or put it on PYTHONPATH).
"""

from __future__ import annotations

import torch
from torch import nn


class GatedExpert(nn.Module):
    """A gated-linear-unit MLP: each hidden unit is a value times a learned sigmoid gate, so the
    expert can switch features of its view on and off per sample."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 64, layers: int = 2) -> None:
        super().__init__()
        if hidden < 1 or layers < 1:
            raise TypeError("hidden and layers must be >= 1")
        blocks, width = [], in_dim
        for _ in range(layers):
            blocks.append(nn.Linear(width, 2 * hidden))
            width = hidden
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, out_dim)
        for block in self.blocks:
            value, gate = block(x).chunk(2, dim=-1)
            x = value * torch.sigmoid(gate)
        return self.out(self.norm(x))
