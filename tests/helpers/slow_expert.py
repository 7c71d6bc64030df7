"""An expert network that takes ``delay`` seconds to build: its expert registers late, so a
test can watch ``traci up`` name it while it waits for it (tests/integration/test_watch_run.py)."""

from __future__ import annotations

import time

from torch import nn


class SlowTower(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, delay: float = 0.0, hidden: int = 32) -> None:
        super().__init__()
        time.sleep(delay)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.net(x)
