"""The expert's embedding net, user-supplied nets by import path, and the Polyak target."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from traci_ml.core.config import ExpertModelConfig
from traci_ml.core.errors import ConfigError
from traci_ml.core.models.expert import (
    ACTIVATIONS,
    EmbeddingMLP,
    build_expert_net,
    make_target,
    polyak_update,
)

pytestmark = pytest.mark.timeout(60)

F_IN, D = 12, 6  # input features, embedding width


def layer_types(net: nn.Module) -> list[type]:
    return [type(m) for m in net.net]


# ---- EmbeddingMLP -----------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [[], [32], [32, 16], [5, 7, 9]])
def test_mlp_maps_batch_to_embedding_width(hidden: list[int]) -> None:
    net = EmbeddingMLP(F_IN, D, hidden=hidden)
    assert net(torch.randn(7, F_IN)).shape == (7, D)
    linears = [m for m in net.net if isinstance(m, nn.Linear)]
    widths = [(m.in_features, m.out_features) for m in linears]
    assert widths == list(zip([F_IN, *hidden], [*hidden, D], strict=True))
    assert isinstance(net.net[-1], nn.Linear)  # the embedding is not squashed


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_uses_the_named_activation_after_each_hidden_layer(activation: str) -> None:
    net = EmbeddingMLP(F_IN, D, hidden=[8, 8], activation=activation)
    assert layer_types(net) == [nn.Linear, ACTIVATIONS[activation]] * 2 + [nn.Linear]
    assert net(torch.randn(3, F_IN)).shape == (3, D)


@pytest.mark.parametrize(
    ("norm", "norm_type"),
    [("none", None), ("layernorm", nn.LayerNorm), ("batchnorm", nn.BatchNorm1d)],
)
def test_mlp_norm_option(norm: str, norm_type: type | None) -> None:
    net = EmbeddingMLP(F_IN, D, hidden=[10, 4], norm=norm)
    norms = [m for m in net.modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d))]
    if norm_type is None:
        assert norms == []
    else:
        assert [type(m) for m in norms] == [norm_type, norm_type]
        widths = [m.normalized_shape[0] if norm == "layernorm" else m.num_features for m in norms]
        assert widths == [10, 4]
        # Linear -> norm -> activation, per hidden layer
        assert layer_types(net)[:3] == [nn.Linear, norm_type, nn.ReLU]
    for mode in (True, False):
        net.train(mode)
        assert net(torch.randn(5, F_IN)).shape == (5, D)


def test_mlp_dropout_option() -> None:
    assert not any(isinstance(m, nn.Dropout) for m in EmbeddingMLP(F_IN, D, hidden=[8]).modules())
    net = EmbeddingMLP(F_IN, D, hidden=[8, 8], dropout=0.25)
    drops = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in drops] == [0.25, 0.25]
    assert layer_types(net) == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    x = torch.randn(64, F_IN)
    net.eval()
    torch.testing.assert_close(net(x), net(x))  # no dropout in eval mode
    assert net.train()(x).shape == (64, D)


def test_build_expert_net_default_is_the_configured_mlp() -> None:
    cfg = ExpertModelConfig(hidden=[9], activation="tanh", norm="layernorm", dropout=0.1)
    net = build_expert_net(cfg, in_dim=F_IN, out_dim=D)
    assert isinstance(net, EmbeddingMLP)
    assert layer_types(net) == [nn.Linear, nn.LayerNorm, nn.Tanh, nn.Dropout, nn.Linear]
    assert net(torch.randn(2, F_IN)).shape == (2, D)


# ---- user modules by import path --------------------------------------------------------

USER_MODULE = """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, in_dim, out_dim, *, width=4, scale=1.0):
            super().__init__()
            self.in_dim, self.out_dim, self.width, self.scale = in_dim, out_dim, width, scale
            self.body = nn.Sequential(nn.Linear(in_dim, width), nn.Linear(width, out_dim))

        def forward(self, x):
            return self.body(x) * self.scale


    class NotAModule:
        def __init__(self, in_dim, out_dim):
            self.in_dim, self.out_dim = in_dim, out_dim
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module written under tmp_path and put on sys.path; returns its (unique) name."""
    name = f"traci_test_user_net_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_build_expert_net_imports_a_user_module_and_passes_kwargs(user_module: str) -> None:
    cfg = ExpertModelConfig(module=f"{user_module}:Net", kwargs={"width": 7, "scale": 2.0})
    net = build_expert_net(cfg, in_dim=F_IN, out_dim=D)
    assert type(net).__module__ == user_module and type(net).__name__ == "Net"
    assert (net.in_dim, net.out_dim, net.width, net.scale) == (F_IN, D, 7, 2.0)
    assert net.body[0].out_features == 7
    assert net(torch.randn(3, F_IN)).shape == (3, D)


def test_build_expert_net_user_module_without_kwargs_uses_its_defaults(user_module: str) -> None:
    net = build_expert_net(ExpertModelConfig(module=f"{user_module}:Net"), in_dim=F_IN, out_dim=D)
    assert (net.width, net.scale) == (4, 1.0)


def test_unimportable_module_is_a_config_error_naming_it() -> None:
    path = f"traci_no_such_package_{uuid.uuid4().hex}.sub:Net"
    with pytest.raises(ConfigError, match="expert.model.module") as info:
        build_expert_net(ExpertModelConfig(module=path), in_dim=F_IN, out_dim=D)
    assert path in str(info.value)


def test_missing_class_is_a_config_error_naming_it(user_module: str) -> None:
    with pytest.raises(ConfigError, match="expert.model.module") as info:
        build_expert_net(ExpertModelConfig(module=f"{user_module}:Missing"), in_dim=F_IN, out_dim=D)
    assert f"{user_module}:Missing" in str(info.value)
    assert "Missing" in str(info.value)


def test_bad_kwargs_are_a_config_error_naming_them(user_module: str) -> None:
    cfg = ExpertModelConfig(module=f"{user_module}:Net", kwargs={"no_such_option": 3})
    with pytest.raises(ConfigError, match="expert.model.kwargs") as info:
        build_expert_net(cfg, in_dim=F_IN, out_dim=D)
    assert "no_such_option" in str(info.value)
    assert f"{user_module}:Net" in str(info.value)


def test_class_that_is_not_a_module_is_a_config_error(user_module: str) -> None:
    cfg = ExpertModelConfig(module=f"{user_module}:NotAModule")
    with pytest.raises(ConfigError, match="nn.Module") as info:
        build_expert_net(cfg, in_dim=F_IN, out_dim=D)
    assert f"{user_module}:NotAModule" in str(info.value)


# ---- target net and Polyak averaging ----------------------------------------------------


def bn_net(seed: int) -> EmbeddingMLP:
    torch.manual_seed(seed)
    return EmbeddingMLP(F_IN, D, hidden=[8], norm="batchnorm", dropout=0.2)


def test_make_target_is_a_frozen_eval_copy() -> None:
    online = bn_net(0).train()
    target = make_target(online)
    assert target is not online
    assert not target.training and all(not m.training for m in target.modules())
    assert online.training  # the online net is left as it was
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    for (name, t), (_, o) in zip(
        target.state_dict().items(), online.state_dict().items(), strict=True
    ):
        assert torch.equal(t, o), name
        assert t.data_ptr() != o.data_ptr(), f"{name} shares memory with the online net"
    with torch.no_grad():
        next(online.parameters()).add_(1.0)
    assert not torch.equal(next(online.parameters()), next(target.parameters()))
    x = torch.randn(4, F_IN)
    torch.testing.assert_close(target(x), target(x))  # eval mode: deterministic, no dropout


def states(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def moved_online_and_target() -> tuple[nn.Module, nn.Module]:
    """A target and an online net that differ in every parameter and buffer."""
    target = make_target(bn_net(1))
    online = bn_net(2).train()
    with torch.no_grad():
        for p in online.parameters():  # BatchNorm's affine weights start equal (1, 0)
            p.add_(torch.randn_like(p) * 0.1)
        for _ in range(3):  # BatchNorm running stats and num_batches_tracked move
            online(torch.randn(16, F_IN) * 3 + 1)
    return target, online


@pytest.mark.parametrize("tau", [0.1, 0.3, 0.75])
def test_polyak_update_follows_the_formula(tau: float) -> None:
    target, online = moved_online_and_target()
    before, o_state = states(target), states(online)
    polyak_update(target, online, tau)
    after = states(target)
    checked = set()
    for name, t0 in before.items():
        o = o_state[name]
        if t0.dtype.is_floating_point:  # parameters and BatchNorm running stats
            torch.testing.assert_close(after[name], t0 + tau * (o - t0), rtol=1e-6, atol=1e-7)
            assert not torch.equal(after[name], t0), f"{name} did not move"
        else:  # integer buffers (num_batches_tracked) are copied, not interpolated
            assert torch.equal(after[name], o), name
            assert after[name].item() == 3
        checked.add(name)
    assert {"net.1.running_mean", "net.1.running_var", "net.1.num_batches_tracked"} <= checked
    for name, o in states(online).items():  # the online net is untouched
        assert torch.equal(o, o_state[name]), name
    assert all(not p.requires_grad for p in target.parameters())


def test_polyak_update_with_tau_one_copies_the_online_net() -> None:
    target, online = moved_online_and_target()
    polyak_update(target, online, 1.0)
    for (name, t), (_, o) in zip(
        target.state_dict().items(), online.state_dict().items(), strict=True
    ):
        assert torch.equal(t, o), name


def test_polyak_update_repeated_converges_geometrically() -> None:
    target, online = moved_online_and_target()
    w_t, w_o = target.net[0].weight.detach().clone(), online.net[0].weight.detach().clone()
    for _ in range(5):
        polyak_update(target, online, 0.2)
    expected = w_o + (w_t - w_o) * 0.8**5
    torch.testing.assert_close(target.net[0].weight, expected, rtol=1e-5, atol=1e-6)
