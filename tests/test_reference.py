"""The one-process reference step (traci_ml.core.reference) on a toy batch: what it changes,
by how much, and that it learns. Its equality with the distributed run is
tests/integration/test_cluster.py's window-1 test."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from traci_ml.core.config import validate
from traci_ml.core.reference import Batch, ReferenceTrainer, train_reference

IN_DIMS, CLASSES, B = (5, 7), 3, 32


def config(tmp_path, **expert: Any):
    return validate(
        {
            "run_id": "reference",
            "run_dir": str(tmp_path),
            "embed_dim": 8,
            "data": {
                "source": "synthetic",
                "views": "even",
                "synthetic": {"rows": 400, "features": 12, "classes": CLASSES, "experts": 2},
            },
            "expert": {"model": {"hidden": [16]}, "tau": 0.1, "lr": 1e-2, **expert},
            "reducer": {"layers": 1, "heads": 2, "ff": 16, "expert_dropout": 0.0, "lr": 1e-2},
            "train": {"steps": 40, "batch_size": B, "eval_every": 20, "lr_schedule": "constant"},
        }
    )


def toy_batch(absent: torch.Tensor | None = None, seq: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(B, f, generator=gen) for f in IN_DIMS]
    y = (xs[0][:, 0] > 0).long() + (xs[1][:, 0] > 0).long()  # needs both experts
    return Batch(xs, y, seq=seq, index=seq, absent=absent)


def trainer(tmp_path, **expert: Any) -> ReferenceTrainer:
    return ReferenceTrainer(
        config(tmp_path, **expert), in_dims=IN_DIMS, out_dim=CLASSES, task="classification"
    )


def params(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(net.state_dict())


def test_one_step_moves_online_and_pulls_the_target_by_tau(tmp_path):
    t = trainer(tmp_path)
    online0, target0 = [params(n) for n in t.online], [params(n) for n in t.target]
    reducer0 = params(t.reducer)
    t.step(toy_batch())
    for i in range(len(IN_DIMS)):
        online1, target1 = t.online[i].state_dict(), t.target[i].state_dict()
        for k, w0 in online0[i].items():
            assert not torch.equal(online1[k], w0)  # the token gradient reached the online net
            want = target0[i][k] + 0.1 * (online1[k] - target0[i][k])
            torch.testing.assert_close(target1[k], want)  # Polyak, after the online step
    assert any(not torch.equal(v, reducer0[k]) for k, v in t.reducer.state_dict().items())


def test_loss_decreases_on_a_repeated_batch(tmp_path):
    t = trainer(tmp_path)
    losses = [t.step(toy_batch(seq=s)) for s in range(30)]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_an_expert_absent_from_every_row_sends_zeros_and_is_not_updated(tmp_path):
    t = trainer(tmp_path)
    absent = torch.zeros(B, 2, dtype=torch.bool)
    absent[:, 1] = True
    batch = toy_batch(absent)
    assert torch.equal(t.embed(batch)[1], torch.zeros(B, 8))
    online0, online1, target1 = params(t.online[0]), params(t.online[1]), params(t.target[1])
    t.step(batch)
    for k, v in t.online[1].state_dict().items():
        assert torch.equal(v, online1[k]) and torch.equal(t.target[1].state_dict()[k], target1[k])
    assert all(not torch.equal(v, online0[k]) for k, v in t.online[0].state_dict().items())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tokens_are_rounded_to_the_wire_dtype(tmp_path, dtype):
    t = trainer(tmp_path, dtype=dtype)
    tokens = t.embed(toy_batch())
    assert tokens.dtype == torch.float32
    assert torch.equal(tokens, tokens.to(getattr(torch, dtype)).float())
    assert t.step(toy_batch()) > 0


def test_same_config_same_run(tmp_path):
    """Seeded per component: two runs of a schedule (train and eval steps) agree exactly."""
    first, second = (train_reference(config(tmp_path), max_seq=30) for _ in range(2))
    assert len(first.losses) == 29  # seq 0-19 train, 20 the eval round (one batch), 21-29 train
    assert first.losses == second.losses and len(first.eval_metrics) == 1
    assert 0 <= first.eval_metrics[0] <= 1
