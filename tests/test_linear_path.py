"""The linear path beside the network (``reducer.linear_path``; docs/config.md "Linear
path"): the config rule, each expert's linear coordinates, the reducer's sum over the tokens
present (regression) or map of them to the classes' logits (classification), the gate's
penalty, the linear map's rate and its weight decay."""

from __future__ import annotations

import pytest
import torch

from traci_ml.core.config import LINEAR_WIDTH, ReducerConfig, validate
from traci_ml.core.errors import ConfigError
from traci_ml.core.models.expert import LINEAR_LR_SCALE, LinearPath, build_expert
from traci_ml.core.models.optim import set_weight_decay
from traci_ml.core.models.reducer import (
    LINEAR_GATE_INIT,
    LINEAR_GATE_ROWS,
    Reducer,
    build_reducer,
)
from traci_ml.core.schedule import set_lr


def _config(task: str, **more):
    views = [{"name": "l", "columns": ["a", "b"]}, {"name": "r", "columns": ["c"]}]
    data = {"source": "csv", "path": "t.csv", "label": "y", "task": task, "views": views}
    return validate({"data": data, **more})


ON = {"linear_path": True}


def test_auto_is_on_for_regression_and_classification_takes_it_when_asked() -> None:
    assert _config("regression").linear_width == 1
    assert _config("classification").linear_width == 0  # auto: off (docs: digits lost)
    assert _config("classification", reducer=ON).linear_width == LINEAR_WIDTH == 8
    small = _config("classification", embed_dim=6, reducer={"heads": 2, **ON})
    assert small.linear_width == 3  # at most half the embedding
    off = _config("regression", reducer={"linear_path": False})
    assert not off.linear_path and off.linear_width == 0
    for task in ("regression", "classification"):
        with pytest.raises(ConfigError, match="embed_dim >= 2"):
            _config(task, embed_dim=1, reducer={"heads": 1, "linear_path": True})
    with pytest.raises(ConfigError, match="embed_dim >= 2"):  # auto, regression
        _config("regression", embed_dim=1, reducer={"heads": 1})


def test_an_experts_last_coordinate_is_a_linear_map_of_its_columns() -> None:
    config = _config("regression")
    online, target, opt = build_expert(config, 0, 2, train_rows=100)
    assert isinstance(online, LinearPath)
    x = torch.randn(5, 2)
    assert torch.equal(online(x)[:, -1], torch.zeros(5))  # zero at start
    with torch.no_grad():
        online.lin.weight.copy_(torch.tensor([[2.0, -1.0]]))
    e = online(x)
    assert e.shape == (5, config.embed_dim)
    torch.testing.assert_close(e[:, -1], 2 * x[:, 0] - x[:, 1])
    torch.testing.assert_close(e[:, :-1], online.net(x)[:, :-1])
    # its own rate: LINEAR_LR_SCALE times the scheduled one, through set_lr
    set_lr(opt, config.expert.lr, 0, config.train)
    rates = [g["lr"] for g in opt.param_groups]
    assert rates == [
        pytest.approx(r) for r in (config.expert.lr, config.expert.lr * LINEAR_LR_SCALE)
    ]
    assert list(target.state_dict()) == list(online.state_dict())  # the target has it too


def test_the_reducer_sums_the_present_tokens_linear_coordinates() -> None:
    torch.manual_seed(0)
    r = Reducer(n_experts=3, d=8, out_dim=1, cfg=ReducerConfig(heads=2), linear=True)
    tokens = torch.randn(4, 3, 8)
    absent = torch.tensor([[False, False, False], [True, False, False],
                           [False, True, True], [True, True, True]])  # fmt: skip
    assert r.gate.item() == LINEAR_GATE_INIT
    with torch.no_grad():
        r.linear_bias.fill_(0.5)
        r.gate.fill_(0.0)
    out, _ = r(tokens, absent)  # the gate at 0: the linear model alone
    want = (tokens[:, :, -1] * (~absent).float()).sum(1, keepdim=True) + 0.5
    torch.testing.assert_close(out, want)
    with torch.no_grad():
        r.gate.fill_(2.0)
    plain = Reducer(n_experts=3, d=8, out_dim=1, cfg=ReducerConfig(heads=2))
    plain.load_state_dict({k: v for k, v in r.state_dict().items()
                           if k not in ("gate", "linear_bias")})  # fmt: skip
    net, _ = plain(tokens, absent)
    torch.testing.assert_close(r(tokens, absent)[0], want + 2.0 * net)


def test_the_gates_penalty_is_worth_linear_gate_rows() -> None:
    config = _config("regression")
    reducer, opt = build_reducer(config, n_experts=2, out_dim=1, train_rows=400)
    decay = 40 / 400  # reducer.weight_decay auto
    main, gate = opt.param_groups
    assert gate["params"] == [reducer.gate]
    assert all(p is not reducer.gate for p in main["params"])
    assert main["weight_decay"] == pytest.approx(decay)
    assert gate["weight_decay"] == pytest.approx(decay + 2 * LINEAR_GATE_ROWS / 400)
    set_weight_decay(opt, 0.5)  # a later change keeps the gate's own share
    assert gate["weight_decay"] == pytest.approx(0.5 + 2 * LINEAR_GATE_ROWS / 400)
    # one step from the gate at 0.1 with no data gradient: Adam's L2 pulls it toward 0
    with torch.no_grad():
        reducer.gate.fill_(0.1)
    reducer.gate.grad = torch.zeros(())
    for p in main["params"]:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert 0 <= reducer.gate.item() < 0.1


def test_a_classification_expert_gives_its_last_coordinates_to_the_path_without_decay() -> None:
    config = _config("classification", reducer=ON)
    online, _, opt = build_expert(config, 0, 2, train_rows=400)
    assert isinstance(online, LinearPath) and online.width == LINEAR_WIDTH
    x = torch.randn(5, 2)
    assert torch.equal(online(x)[:, -LINEAR_WIDTH:], torch.zeros(5, LINEAR_WIDTH))
    w = torch.randn(LINEAR_WIDTH, 2)
    with torch.no_grad():
        online.lin.weight.copy_(w)
    torch.testing.assert_close(online(x)[:, -LINEAR_WIDTH:], x @ w.T)
    torch.testing.assert_close(online(x)[:, :-LINEAR_WIDTH], online.net(x)[:, :-LINEAR_WIDTH])
    net, lin = opt.param_groups  # the network's decay, none on the linear map
    assert net["weight_decay"] == pytest.approx(40 / 400) and lin["weight_decay"] == 0.0
    set_weight_decay(opt, 0.3)
    assert (net["weight_decay"], lin["weight_decay"]) == (pytest.approx(0.3), 0.0)
    _, _, opt = build_expert(_config("regression"), 0, 2, train_rows=400)  # decayed alike
    assert [g["weight_decay"] for g in opt.param_groups] == [pytest.approx(40 / 400)] * 2


def test_the_classification_reducer_maps_the_present_tokens_coordinates_to_logits() -> None:
    torch.manual_seed(0)
    w, n, classes = 3, 3, 4
    r = Reducer(n_experts=n, d=8, out_dim=classes, cfg=ReducerConfig(heads=2), linear=w)
    assert r.linear_head is not None and r.linear_head.weight.shape == (classes, n * w)
    tokens = torch.randn(4, n, 8)
    absent = torch.tensor([[False, False, False], [True, False, False],
                           [False, True, True], [True, True, True]])  # fmt: skip
    with torch.no_grad():
        r.linear_bias.copy_(torch.arange(classes, dtype=torch.float32))
        r.gate.fill_(0.0)
    out, _ = r(tokens, absent)  # the gate at 0: the linear model alone
    coords = tokens[:, :, -w:] * (~absent).float()[:, :, None]  # an absent token adds nothing
    want = coords.reshape(4, n * w) @ r.linear_head.weight.T + r.linear_bias
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out[3], r.linear_bias)  # every expert absent: the bias
    with torch.no_grad():
        r.gate.fill_(0.5)
    plain = Reducer(n_experts=n, d=8, out_dim=classes, cfg=ReducerConfig(heads=2))
    plain.load_state_dict({k: v for k, v in r.state_dict().items()
                           if k not in ("gate", "linear_bias", "linear_head.weight")})  # fmt: skip
    torch.testing.assert_close(r(tokens, absent)[0], want + 0.5 * plain(tokens, absent)[0])


def test_the_classification_reducers_linear_head_has_no_decay_the_gate_its_penalty() -> None:
    config = _config("classification", reducer=ON)
    reducer, opt = build_reducer(config, n_experts=2, out_dim=3, train_rows=400)
    main, gate, head = opt.param_groups
    assert gate["params"] == [reducer.gate] and head["params"] == [reducer.linear_head.weight]
    assert main["weight_decay"] == pytest.approx(40 / 400)
    assert gate["weight_decay"] == pytest.approx(40 / 400 + 2 * LINEAR_GATE_ROWS / 400)
    assert head["weight_decay"] == 0.0
    owned = {id(p) for g in opt.param_groups for p in g["params"]}
    assert owned == {id(p) for p in reducer.parameters()}  # each parameter in one group
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(reducer.parameters()))
