"""The optimizer every trained net in TRACI uses (expert online nets, the reducer)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused Adam kernel


def make_adam(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float):  # noqa: ANN201
    """Adam, fused into one kernel where torch has one for the parameters' device: one call
    per step instead of a dozen tensor ops per parameter (on a CPU expert that is most of
    its optimizer time). The same update rule; the reference step builds it the same way."""
    params = list(params)
    fused = bool(params) and all(
        p.device.type in FUSED_DEVICES and p.dtype.is_floating_point for p in params
    )
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
