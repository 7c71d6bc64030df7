"""A stand-in for an expert whose net runs on an accelerator (``make bench``, section accel).

``SimulatedAccelerator`` is the plain feed-forward ``EmbeddingMLP`` whose forward pass takes
``pass_ms`` milliseconds of wall time, and whose backward pass as long again: the net's real
(CPU) arithmetic, then a sleep for the rest of the pass. On an accelerator that arithmetic is
the kernel the host waits on, so it belongs inside the pass's time, not on top of it. The
sleep (``time.sleep``) uses no CPU, like a host waiting on a GPU kernel, so a 2-core machine
can run several "accelerated" experts at once and the benchmark measures how well TRACI
hides a fixed per-pass latency, not how the cores were shared. (The backward's arithmetic
runs after its sleep, so its share is estimated as twice the forward's; a pass shorter than
its arithmetic simply takes the arithmetic's time.)

An expert's train step is three passes: the target net's forward (the target is a deep copy
of the online net, so it sleeps too), the online forward and its backward; the ideal rate of
one expert is therefore ``1 / (3 * pass_ms / 1000)`` steps per second.

Configured through the import hook of ``expert.model`` (or one view's ``model``)::

    expert:
      model:
        module: "traci_ml.core.models.simulated:SimulatedAccelerator"
        kwargs: {pass_ms: 10, hidden: [256]}

The weights, initialisation (same seed) and gradients are exactly ``EmbeddingMLP``'s.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from traci_ml.core.models.expert import EmbeddingMLP


class _SleepInBackward(torch.autograd.Function):
    """Identity in the forward; the backward sleeps ``seconds`` and passes the gradient on."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.seconds > 0:
            time.sleep(ctx.seconds)
        return grad, None


class SimulatedAccelerator(EmbeddingMLP):
    """``EmbeddingMLP`` whose forward and backward passes each take ``pass_ms`` (or their
    arithmetic's time, when longer)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        pass_ms: float = 10.0,
        hidden: list[int] | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        if pass_ms < 0:
            raise TypeError(f"pass_ms must be >= 0, got {pass_ms}")
        super().__init__(in_dim, out_dim, hidden=list(hidden if hidden is not None else [256]),
                         activation=activation, dropout=dropout, norm=norm)  # fmt: skip
        self.pass_s = float(pass_ms) / 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, d)
        start = time.perf_counter()
        out = self.net(x)
        work = time.perf_counter() - start
        if self.pass_s > work:
            time.sleep(self.pass_s - work)
        if out.requires_grad:  # a pass that will be differentiated: its backward sleeps too
            out = _SleepInBackward.apply(out, max(0.0, self.pass_s - 2 * work))
        return out
