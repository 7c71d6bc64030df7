"""bench.compression builds valid configs and computes its ratios (no run, no timing)."""

from __future__ import annotations

import pytest

from bench.compression import EXAMPLES, example_config, ratios, summary_lines
from traci_ml.core.config import Config


@pytest.mark.parametrize("example", sorted(EXAMPLES))
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_configs_validate(example: str, dtype: str) -> None:
    cfg = example_config(example, seed=2, dtype=dtype)
    config = Config.model_validate(cfg)
    assert config.expert.dtype == dtype and config.seed == 2


def test_ratios_and_lines() -> None:
    row = {
        "float32_accuracy": 0.98,
        "int8_accuracy": 0.975,
        "accuracy_delta_points": -0.5,
        "float32_bytes_per_step": 4000.0,
        "int8_bytes_per_step": 1000.0,
        "bytes_ratio": 4.0,
    }
    result = {"seeds": [0], "examples": {"digits": row, "heterogeneous": row}}
    assert ratios(result) == {
        "compression_bytes_ratio": 4.0,
        "compression_accuracy_delta_digits": -0.5,
        "compression_accuracy_delta_heterogeneous": -0.5,
    }
    assert len(summary_lines(result)) == 2
