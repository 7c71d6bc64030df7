"""SimulatedAccelerator: the digits MLP whose passes take wall time (bench section accel).
Times are checked from below only: a loaded machine may make a pass longer, never shorter."""

from __future__ import annotations

import time

import pytest
import torch

from traci_ml.core.config import Config
from traci_ml.core.errors import ConfigError
from traci_ml.core.models.expert import EmbeddingMLP, build_expert, build_expert_net
from traci_ml.core.models.simulated import SimulatedAccelerator

PASS_MS = 30.0
MODULE = "traci_ml.core.models.simulated:SimulatedAccelerator"


def _pair() -> tuple[SimulatedAccelerator, EmbeddingMLP]:
    torch.manual_seed(0)
    sim = SimulatedAccelerator(16, 8, pass_ms=PASS_MS, hidden=[32])
    torch.manual_seed(0)
    plain = EmbeddingMLP(16, 8, hidden=[32])
    return sim, plain


def test_forward_and_backward_each_take_at_least_one_pass():
    sim, _ = _pair()
    x = torch.randn(4, 16)
    t = time.perf_counter()
    out = sim(x)
    forward = time.perf_counter() - t
    t = time.perf_counter()
    out.sum().backward()
    backward = time.perf_counter() - t
    assert forward >= 0.9 * PASS_MS / 1000
    assert backward >= 0.9 * PASS_MS / 1000


def test_a_forward_without_grad_still_takes_a_pass():
    sim, _ = _pair()
    t = time.perf_counter()
    with torch.no_grad():
        sim(torch.randn(4, 16))
    assert time.perf_counter() - t >= 0.9 * PASS_MS / 1000


def test_same_init_outputs_and_gradients_as_the_plain_mlp():
    sim, plain = _pair()
    assert sim.state_dict().keys() == plain.state_dict().keys()
    for a, b in zip(sim.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(5, 16)
    g = torch.randn(5, 8)
    out_s, out_p = sim(x), plain(x)
    assert torch.equal(out_s, out_p)
    out_s.backward(g)
    out_p.backward(g)
    for a, b in zip(sim.parameters(), plain.parameters(), strict=True):
        assert a.grad is not None and torch.equal(a.grad, b.grad)


def test_built_through_the_config_hook_per_view_and_its_target_sleeps_too():
    views = [
        {"name": f"v{i}", "columns": [f"pixel_{i}_{c}" for c in range(8)],
         "model": {"module": MODULE, "kwargs": {"pass_ms": 5 * (i + 1), "hidden": [16]}}}
        for i in range(2)
    ]  # fmt: skip
    config = Config.model_validate({"data": {"source": "digits", "views": views}})
    online, target, _ = build_expert(config, 1, in_dim=8)
    assert isinstance(online, SimulatedAccelerator) and isinstance(target, SimulatedAccelerator)
    assert online.pass_s == target.pass_s == pytest.approx(0.010)


def test_a_negative_pass_is_a_config_error():
    cfg = Config.model_validate(
        {"expert": {"model": {"module": MODULE, "kwargs": {"pass_ms": -1}}}}
    ).expert.model
    with pytest.raises(ConfigError, match="kwargs"):
        build_expert_net(cfg, in_dim=4, out_dim=2)
