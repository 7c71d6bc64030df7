"""``proto.value_problem``: the one bound on values a peer sends (issue 9), against a plain
numpy reference on random tensors of every wire dtype, NaN/Inf and huge values included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from traci_ml import proto
from traci_ml.proto import Tensor, value_problem


def reference(values: np.ndarray, max_abs: float) -> str | None:
    wide = values.astype(np.float64)
    if not np.isfinite(wide).all():
        return "non_finite"
    if wide.size and np.abs(wide).max() > max_abs:
        return "too_large"
    return None


def bf16(values: np.ndarray) -> Tensor:
    bits = (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2")
    return Tensor("bfloat16", values.shape, bits.tobytes())


def widened(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # what bf16() keeps: the high 16 bits
        return ((values.astype(np.float32).view(np.uint32) >> 16) << 16).view(np.float32)
    return values.astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("max_abs", [1.0, 1e6, math.inf])
def test_value_problem_agrees_with_numpy(dtype: str, max_abs: float) -> None:
    rng = np.random.default_rng(0)
    for trial in range(400):
        shape = (int(rng.integers(0, 9)), int(rng.integers(1, 9)))
        values = rng.standard_normal(shape).astype(np.float32) * 10.0 ** int(rng.integers(-3, 8))
        if values.size and trial % 3:
            spot = tuple(int(rng.integers(0, n)) for n in shape)
            values[spot] = rng.choice([np.nan, np.inf, -np.inf, 3e38, -3e38, 2e6, 0.5])
        with np.errstate(over="ignore"):
            want = reference(widened(values, dtype), max_abs)
            tensor = (
                bf16(values) if dtype == "bfloat16" else Tensor.from_numpy(values.astype(dtype))
            )
        got = value_problem((tensor,), max_abs)
        assert (got[0] if got else None) == want, (trial, values, got)


def test_the_detail_names_the_tensor_and_the_value() -> None:
    good = Tensor.from_numpy(np.zeros((2, 2), np.float32))
    bad = Tensor.from_numpy(np.array([[1.0, -3e38]], np.float32))
    reason, detail = value_problem((good, bad), 1e6)  # type: ignore[misc]
    assert reason == "too_large" and "tensor 1" in detail and "-3e+38" in detail
    assert value_problem((good,), 1e6) is None and value_problem((), 1.0) is None
    assert proto.VALUE_REASONS == ("non_finite", "too_large")
