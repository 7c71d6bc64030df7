"""A hostile party for the attack tests: an expert network that poisons what it sends.

``PoisonNet`` is the default embedding MLP (so the run is the same as a clean one) that, in
the process of expert ``victim`` only (read from ``--id`` on its command line: every expert
builds the same configured module), replaces some of its *sent* training embeddings (the
target's, computed without grad) with huge finite values or NaN -- what a broken or
malicious party could put on the wire. Training-sized batches only: an evaluation batch
(digits: one batch of all test rows) masked whole would say nothing about poisoning.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from traci_ml.core.models.expert import EmbeddingMLP


def _my_id() -> int | None:
    argv = sys.argv
    if "--id" in argv and argv.index("--id") + 1 < len(argv):
        return int(argv[argv.index("--id") + 1])
    return None


class PoisonNet(nn.Module):
    def __init__(
        self, in_dim: int, out_dim: int, *, victim: int, batch: int, every: int = 10
    ) -> None:
        super().__init__()
        self.mlp = EmbeddingMLP(in_dim, out_dim, hidden=[256])
        self.hostile = _my_id() == victim
        self.batch, self.every, self.calls = batch, every, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        if not self.hostile or torch.is_grad_enabled() or x.shape[0] != self.batch:
            return out
        self.calls += 1
        if self.calls % self.every == 3:
            return torch.full_like(out, 3e38)  # finite, and enough to NaN a Transformer
        if self.calls % self.every == 7:
            return torch.full_like(out, float("nan"))
        return out
