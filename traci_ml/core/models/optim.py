"""The optimizer every trained net in TRACI uses (expert online nets, the reducer)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from traci_ml.core.config import WEIGHT_DECAY_ROWS

FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused Adam kernel


def make_adam(params: Iterable, *, lr: float, weight_decay: float):  # noqa: ANN201
    """Adam, fused into one kernel where torch has one for the parameters' device: one call
    per step instead of a dozen tensor ops per parameter (on a CPU expert that is most of
    its optimizer time). The same update rule; the reference step builds it the same way.
    ``params``: parameters, or parameter groups (dicts) that may carry ``lr_scale`` (their
    rate as a multiple of the scheduled one, ``schedule.set_lr``), ``decay_scale`` (their
    L2 coefficient as a multiple of ``weight_decay``) and ``extra_decay`` (added to it)."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    for group in groups:
        group["params"] = list(group["params"])
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = _decay(group, weight_decay)
    every = [p for g in groups for p in g["params"]]
    fused = bool(every) and all(
        p.device.type in FUSED_DEVICES and p.dtype.is_floating_point for p in every
    )
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


def weight_decay_for(value: str | float, train_rows: int) -> float:
    """``expert.weight_decay`` / ``reducer.weight_decay`` as Adam's L2 coefficient: a number
    as it is; ``"auto"``: ``WEIGHT_DECAY_ROWS / train_rows``, the rows training draws its
    batches from (the train split less the validation rows). An L2 penalty beside a *mean*
    loss over n rows is a prior worth a fixed number of rows, so its coefficient shrinks as
    1/n: a 108-row table gets 0.37, a 1440-row one 0.028 (docs/config.md "Weight decay by
    default")."""
    if value == "auto":
        return WEIGHT_DECAY_ROWS / max(int(train_rows), 1)
    return float(value)


def set_weight_decay(optimizer, weight_decay: float) -> None:  # noqa: ANN001
    """Sets every parameter group of ``optimizer`` to ``weight_decay`` (Adam reads it on
    each step): an expert learns its training rows only once aligned."""
    for group in optimizer.param_groups:
        group["weight_decay"] = _decay(group, weight_decay)


def _decay(group: dict, weight_decay: float) -> float:
    """A group's L2 coefficient: the optimizer's, scaled by ``decay_scale``, plus
    ``extra_decay``."""
    return weight_decay * group.get("decay_scale", 1.0) + group.get("extra_decay", 0.0)


def linear_decay_scale(task: str) -> float:
    """The linear path's weight decay as a multiple of the network's: the same for
    regression; ``LINEAR_DECAY_SCALE_CLS`` for classification, whose map is a product of
    two (the experts' and the reducer's ``linear_head``)."""
    return 1.0 if task == "regression" else LINEAR_DECAY_SCALE_CLS


LINEAR_DECAY_SCALE_CLS = 0.0
