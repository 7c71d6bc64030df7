"""Error feedback (traci_ml/core/feedback.py, docs/compression.md): per-row residuals that
make the compressed sends of a row average to the row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from traci_ml.core.errors import CheckpointError
from traci_ml.core.feedback import ErrorFeedback
from traci_ml.core.tensors import from_wire, to_wire

CPU = torch.device("cpu")


def constant_row(d: int = 64, seed: int = 0) -> torch.Tensor:
    # one large value sets the scale; the others sit between the int8 steps
    row = torch.from_numpy(np.random.default_rng(seed).uniform(-0.3, 0.3, d).astype(np.float32))
    row[0] = 10.0
    return row


def test_the_average_of_many_sends_converges_to_the_row_with_feedback() -> None:
    x, sends = constant_row()[None, :], 400
    ef = ErrorFeedback(1, x.shape[1])
    with_ef = sum(from_wire(ef.compress(np.array([0]), x, "int8"), CPU) for _ in range(sends))
    without = sum(from_wire(to_wire(x, "int8"), CPU) for _ in range(sends))
    err_ef = float((with_ef / sends - x).abs().max())
    err_plain = float((without / sends - x).abs().max())
    step = 10.0 / 127
    assert err_plain > step / 10  # plain rounding is biased: the same error every time
    assert err_ef < err_plain / 20  # feedback: the errors cancel out, about step / sends
    assert err_ef <= 2 * step / sends * 1.5
    assert float(np.abs(ef.residual).max()) <= step  # the residual stays within one step


def test_residuals_are_kept_per_row_and_only_for_held_rows() -> None:
    ef = ErrorFeedback(10, 8)
    x = torch.stack([constant_row(8, seed=s) for s in range(3)])
    ef.compress(np.array([7, 2, 0]), x, "int8", held=np.array([True, False, True]))
    touched = np.flatnonzero(np.abs(ef.residual).sum(axis=1))
    assert set(touched) <= {0, 7} and 7 in touched
    assert not ef.residual[2].any()  # an absent row: no residual
    # the next send of row 7 carries its residual: what is sent is x + r
    r7 = ef.residual[7].copy()
    sent = from_wire(ef.compress(np.array([7]), x[:1], "int8"), CPU)[0]
    assert float((sent - (x[0] + torch.from_numpy(r7))).abs().max()) <= 10 / 127 / 2 * 1.01


def test_float32_sends_exactly_and_keeps_no_residual() -> None:
    ef = ErrorFeedback(4, 8)
    x = torch.randn(4, 8)
    wire = ef.compress(np.arange(4), x, "float32")
    assert torch.equal(from_wire(wire, CPU), x) and not ef.residual.any()


def test_non_finite_rows_keep_their_old_residual() -> None:
    ef = ErrorFeedback(2, 4)
    ef.residual[1] = 0.01
    x = torch.ones(2, 4)
    x[1, 0] = float("nan")
    ef.compress(np.array([0, 1]), x, "int8")
    assert np.all(ef.residual[1] == np.float32(0.01))


def test_state_dict_round_trip_and_a_wrong_shape_is_refused() -> None:
    ef = ErrorFeedback(5, 3)
    ef.compress(np.arange(5), torch.randn(5, 3) * 7, "int8")
    state = ef.state_dict()
    again = ErrorFeedback(5, 3)
    again.load_state_dict(state)
    assert np.array_equal(again.residual, ef.residual)
    state["residual"][0, 0] = 99.0  # a copy: the live residual is not the saved one
    assert ef.residual[0, 0] != 99.0
    with pytest.raises(CheckpointError, match="residual"):
        ErrorFeedback(4, 3).load_state_dict(ef.state_dict())
