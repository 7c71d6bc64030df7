"""The expert's embedding network and its Polyak target. No sockets here."""

from __future__ import annotations

import copy
import importlib

import torch
from torch import nn

from traci_ml.core.config import INPUT_NOISE_MAX, WEIGHT_DECAY_ROWS, Config, ExpertModelConfig
from traci_ml.core.errors import ConfigError
from traci_ml.core.models.optim import linear_decay_scale, make_adam, weight_decay_for
from traci_ml.core.tensors import derive_seed

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class EmbeddingMLP(nn.Module):
    """Feed-forward embedding net: (B, F) -> (B, d).

    Each hidden layer is Linear -> [norm] -> activation -> [dropout]; the last layer is a
    plain Linear so the embedding is unconstrained (the reducer normalises it).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden: list[int],
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if norm == "layernorm":
                layers.append(nn.LayerNorm(h))
            elif norm == "batchnorm":
                layers.append(nn.BatchNorm1d(h))
            layers.append(ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, d)
        return self.net(x)


class LinearPath(nn.Module):
    """``net``'s embedding with its last ``width`` coordinates replaced by a linear map of
    the inputs (no bias, zero at start): the expert's share of the reducer's linear path
    (``reducer.linear_path``; the reducer sums these coordinates over the tokens present, or
    maps them to the classes' logits). Its weights learn at ``LINEAR_LR_SCALE`` times the
    expert's rate (a convex problem that the network's rate would leave half-solved at the
    first validation rounds)."""

    def __init__(self, net: nn.Module, in_dim: int, width: int = 1) -> None:
        super().__init__()
        self.net, self.width = net, width
        self.lin = nn.Linear(in_dim, width, bias=False)
        nn.init.zeros_(self.lin.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, d)
        return torch.cat([self.net(x)[:, : -self.width], self.lin(x)], dim=1)


LINEAR_LR_SCALE = 20.0  # the linear path's rate, times expert.lr (docs/config.md "Linear path")


def build_expert_net(
    cfg: ExpertModelConfig,
    *,
    in_dim: int,
    out_dim: int,
    key: str = "expert.model",
    linear: int = 0,
) -> nn.Module:
    """The configured feed-forward net, or ``package.module:Class(in_dim, out_dim, **kwargs)``;
    ``linear``: inside a ``LinearPath`` of that width (``Config.linear_width``; 0: none).
    ``key`` names the config section in errors."""
    net = _build_net(cfg, in_dim=in_dim, out_dim=out_dim, key=key)
    return LinearPath(net, in_dim, linear) if linear else net


def _build_net(cfg: ExpertModelConfig, *, in_dim: int, out_dim: int, key: str) -> nn.Module:
    if cfg.module is None:
        return EmbeddingMLP(
            in_dim,
            out_dim,
            hidden=list(cfg.hidden),
            activation=cfg.activation,
            dropout=cfg.dropout,
            norm=cfg.norm,
        )
    module_name, _, class_name = cfg.module.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except Exception as exc:  # ImportError, AttributeError, or the module's own failure
        raise ConfigError(f"{key}.module: cannot import {cfg.module!r}: {exc}") from None
    try:
        net = cls(in_dim=in_dim, out_dim=out_dim, **cfg.kwargs)
    except TypeError as exc:
        raise ConfigError(f"{key}.kwargs: {cfg.module} rejected them: {exc}") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"{key}.module: {cfg.module} did not build an nn.Module")
    return net


def build_expert(
    config: Config,
    expert_id: int,
    in_dim: int,
    device: torch.device | str = "cpu",
    *,
    train_rows: int | None = None,
) -> tuple[nn.Module, nn.Module, torch.optim.Adam]:
    """Expert ``expert_id``'s online net (its view's model, else ``expert.model``), its Polyak
    target and its Adam, seeded by (seed, expert_id): what the expert service, the reference
    step and the bench all start from. ``train_rows``: the rows training draws from, which
    ``expert.weight_decay: auto`` scales by; None: not known yet (a parties expert before it
    aligns), the penalty is 0 until ``set_weight_decay``."""
    torch.manual_seed(derive_seed(config.seed, "expert", expert_id))
    online = build_expert_net(
        config.expert_model(expert_id),
        in_dim=in_dim,
        out_dim=config.embed_dim,
        key=config.expert_model_key(expert_id),
        linear=config.linear_width,
    ).to(device)
    decay = 0.0 if train_rows is None else weight_decay_for(config.expert.weight_decay, train_rows)
    groups = param_groups(online, linear_decay_scale(config.task))
    opt = make_adam(groups, lr=config.expert.lr, weight_decay=decay)
    return online, make_target(online), opt


def param_groups(online: nn.Module, decay_scale: float = 1.0) -> list[dict]:
    """The online net's Adam groups: the network, and a ``LinearPath``'s map at its rate
    with its weight decay times ``decay_scale`` (``linear_decay_scale``)."""
    if not isinstance(online, LinearPath):
        return [{"params": list(online.parameters())}]
    return [{"params": list(online.net.parameters())},
            {"params": list(online.lin.parameters()), "lr_scale": LINEAR_LR_SCALE,
             "decay_scale": decay_scale}]  # fmt: skip


def input_noise_for(value: str | float, train_rows: int, task: str) -> float:
    """``expert.input_noise`` as the sd of the noise on train steps' standardised inputs: a
    number as it is; ``"auto"``: for regression ``sqrt(WEIGHT_DECAY_ROWS / train_rows)``, at
    most ``INPUT_NOISE_MAX``, for classification 0. Under a squared loss, noise of sd s on
    every input of a linear model is exactly a ridge penalty of s**2 beside the mean loss:
    with s**2 = 40 / n it is the prior worth 40 rows that the "auto" weight decay puts on the
    weights, put on the net's slope in its inputs, so its variance shrinks as 1/n (1440 rows:
    0.17, 100,000: 0.02), capped at 0.3 of a feature's sd. On the bundled classification
    tables it moved single test rows both ways and took wine below its linear tie, so
    ``auto`` leaves classification without it (docs/config.md "Input noise")."""
    if value == "auto":
        if task != "regression":
            return 0.0
        return min(INPUT_NOISE_MAX, (WEIGHT_DECAY_ROWS / max(int(train_rows), 1)) ** 0.5)
    return float(value)


def input_noise(sd: float, seed: int, expert_id: int, seq: int, shape: tuple[int, int],
                device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """The noise expert ``expert_id`` adds to train step ``seq``'s inputs, (B, F) for all the
    step's rows (held or not: a row's noise does not depend on who else holds it): drawn from
    a generator seeded by (seed, expert, seq), so the target embedding sent and the online
    pass that later takes its gradient see the same inputs, in every process and run (the
    reference step draws the same)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "input-noise", expert_id, seq))
    return (torch.randn(shape, generator=gen) * sd).to(device)


def make_target(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online`` in eval mode: the smoothed net whose output is sent."""
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    return target.eval()


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- target + tau * (online - target); buffers (e.g. BatchNorm stats) likewise."""
    t_params = [p for p in target.parameters()]
    o_params = [p for p in online.parameters()]
    torch._foreach_lerp_(t_params, o_params, tau)
    for t_buf, o_buf in zip(target.buffers(), online.buffers(), strict=True):
        if t_buf.dtype.is_floating_point:
            t_buf.lerp_(o_buf, tau)
        else:
            t_buf.copy_(o_buf)
