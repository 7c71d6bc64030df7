"""A sharded reducer step (row slices on parallel threads) is the whole-batch step."""

from __future__ import annotations

import pytest
import torch

from traci_ml.core.config import ReducerConfig
from traci_ml.core.models.reducer import Reducer, loss_and_metric
from traci_ml.core.models.shards import ShardedStep

pytestmark = pytest.mark.timeout(60)

N, D = 3, 16


def whole(model: Reducer, task: str, tokens, absent, y):
    tokens = tokens.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    logits, att = model(tokens.transpose(0, 1), absent)
    loss, metric = loss_and_metric(task, logits, y)
    loss.backward()
    params = [p.grad.clone() for p in model.parameters()]
    return loss.detach(), metric, att.detach(), tokens.grad, params


@pytest.mark.parametrize("task,batch,shards", [
    ("classification", 37, 2), ("classification", 8, 3), ("regression", 33, 4),
])  # fmt: skip
def test_sharded_step_equals_the_whole_batch_step(task: str, batch: int, shards: int) -> None:
    torch.manual_seed(0)
    out = 4 if task == "classification" else 1
    model = Reducer(n_experts=N, d=D, out_dim=out, cfg=ReducerConfig(heads=2, ff=32)).train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(N, batch, D, generator=g)
    absent = torch.rand(batch, N, generator=g) < 0.3  # rows with absent experts, some all
    y = (torch.randint(0, out, (batch,), generator=g) if task == "classification"
         else torch.randn(batch, generator=g))  # fmt: skip
    want = whole(model, task, tokens, absent, y)
    step = ShardedStep(model, shards)
    try:
        model.zero_grad(set_to_none=True)
        loss, metric, att, grads = step(task, tokens, absent, y)
    finally:
        step.close()
    torch.testing.assert_close(loss, want[0])
    assert metric == pytest.approx(want[1], rel=1e-5)
    torch.testing.assert_close(att, want[2])
    torch.testing.assert_close(grads, want[3])
    assert grads.shape == tokens.shape
    for p, w in zip(model.parameters(), want[4], strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
