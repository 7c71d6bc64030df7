"""`traci serve`'s reducer runs a traced copy of the best model (issue 15): the same answers as
the eager model, bit for bit, at any batch size and mask; a model that cannot be traced, or
whose trace differs, is served eagerly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from traci_ml import proto
from traci_ml.core.config import ReducerConfig
from traci_ml.core.models.reducer import Reducer
from traci_ml.services.reducer.serving import ServeSpec, answer, traced_for_serving

CPU = torch.device("cpu")
N, D = 3, 16


def spec(task: str) -> ServeSpec:
    classes = ("a", "b", "c") if task == "classification" else ()
    return ServeSpec(N, D, "float32", task, classes, y_mean=2.0, y_std=3.0)


def reducer(out_dim: int) -> Reducer:
    torch.manual_seed(0)
    return Reducer(n_experts=N, d=D, out_dim=out_dim, cfg=ReducerConfig(heads=2, ff=32)).eval()


def qbatch(rows: int, present: tuple[bool, ...], attention: bool, seed: int) -> proto.QBatch:
    rng = np.random.default_rng(seed)
    tensors = tuple(proto.Tensor.from_numpy(rng.standard_normal((rows, D)).astype(np.float32))
                    for p in present if p)  # fmt: skip
    bits = ()
    if rows > 2:  # the first present expert lacks row 1
        held = np.ones(rows, bool)
        held[1] = False
        bits = (proto.pack_rows(held), *([b""] * (sum(present) - 1)))
    return proto.QBatch(seed, present, tensors, bits, attention)


@pytest.mark.parametrize(("task", "out_dim"), [("classification", 3), ("regression", 1)])
def test_the_traced_model_answers_exactly_as_the_eager_one(task: str, out_dim: int) -> None:
    model = reducer(out_dim)
    traced, how = traced_for_serving(model, spec(task), CPU)
    assert how == "traced" and isinstance(traced, torch.jit.ScriptModule)
    for k, (rows, present) in enumerate(
        [(1, (True,) * N), (5, (True, False, True)), (64, (False, True, True)), (300, (True,) * N)]
    ):
        msg = qbatch(rows, present, attention=k % 2 == 0, seed=k)
        got, want = answer(traced, msg, spec(task), CPU), answer(model, msg, spec(task), CPU)
        assert got.status == want.status == proto.SERVE_OK
        assert len(got.tensors) == len(want.tensors) == (2 if k % 2 == 0 else 1)
        for g, w in zip(got.tensors, want.tensors, strict=True):
            assert np.array_equal(g.numpy(), w.numpy())


class Untraceable(nn.Module):
    def forward(self, tokens: torch.Tensor, absent: torch.Tensor):  # noqa: ANN201
        return tokens.sum(dim=1), "not a tensor"


class Branchy(nn.Module):
    """Takes a Python branch on the data: a trace records one branch only."""

    def forward(self, tokens: torch.Tensor, absent: torch.Tensor):  # noqa: ANN201
        out = tokens.sum(dim=1)[:, :3]
        return (out if tokens.shape[0] < 3 else -out), absent.float()


@pytest.mark.parametrize(("model", "words"), [(Untraceable(), "tracing failed"),
                                              (Branchy(), "differs at 3 rows")])  # fmt: skip
def test_a_model_the_trace_cannot_reproduce_is_served_eagerly(model: nn.Module, words) -> None:
    served, how = traced_for_serving(model.eval(), spec("classification"), CPU)
    assert served is model and words in how
