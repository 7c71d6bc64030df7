"""A stand-in for an expert whose net runs on an accelerator (``make bench``, section accel).

``SimulatedAccelerator`` is the plain feed-forward ``EmbeddingMLP`` whose forward pass takes
``pass_ms`` milliseconds of wall time, and whose backward pass as long again: the net's real
(CPU) arithmetic, then a sleep for the rest of the pass. On an accelerator that arithmetic is
the kernel the host waits on, so it belongs inside the pass's time, not on top of it. The
sleep (``time.sleep``) uses no CPU, like a host waiting on a GPU kernel, so a 2-core machine
can run several "accelerated" experts at once and the benchmark measures how well TRACI
hides a fixed per-pass latency, not how the cores were shared. The backward is timed from
the moment it reaches the net's output to the moment its arithmetic is done at the input
(two identity markers), then sleeps for the rest; a pass shorter than its arithmetic simply
takes the arithmetic's time.

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


class _BackwardClock:
    """When the backward pass reached the net's output (set by ``_StartBackward``)."""

    def __init__(self) -> None:
        self.started: float | None = None


class _StartBackward(torch.autograd.Function):
    """Identity at the net's output; its backward, the first of the pass, starts the clock."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clock: _BackwardClock) -> torch.Tensor:
        ctx.clock = clock
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.clock.started = time.perf_counter()
        return grad, None


class _EndBackward(torch.autograd.Function):
    """Identity at the net's input; its backward, the last of the pass (after every layer's
    arithmetic), sleeps for what is left of ``seconds`` since the clock started."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clock: _BackwardClock, seconds: float) -> torch.Tensor:
        ctx.clock, ctx.seconds = clock, seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        started = ctx.clock.started
        left = ctx.seconds - (time.perf_counter() - started) if started is not None else 0.0
        if left > 0:
            time.sleep(left)
        return grad, None, None


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
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        clock = _BackwardClock()
        if grad:  # the backward pass ends at the input: a marker there needs it in the graph
            x = x if x.requires_grad else x.detach().requires_grad_()
            x = _EndBackward.apply(x, clock, self.pass_s)
        out = self.net(x)
        work = time.perf_counter() - start
        if self.pass_s > work:
            time.sleep(self.pass_s - work)
        if grad:  # a pass that will be differentiated: its backward takes pass_s too
            out = _StartBackward.apply(out, clock)
        return out
