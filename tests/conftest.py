"""Shared fixtures: small run configs on fresh loopback ports, written to files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.support import EXPERT_BLOCK, deep_update, free_ports

# the fake front door of the Open Inference Protocol's tests: fixtures door, translator
pytest_plugins = ("tests.helpers.front_door",)


@pytest.fixture
def run_config(tmp_path: Path):
    """Write a config for a run on fresh loopback ports; returns (path, dict)."""

    def make(
        extra: dict[str, Any] | None = None,
        *,
        metrics: bool = False,
        example: str = "examples/digits.yaml",
    ):
        expert_port, reducer_port, broker_m, reducer_m, serve_port = free_ports(5)
        # expert i serves metrics on expert_m + i: a block, every port of it checked free
        (expert_m,) = free_ports(1, block=EXPERT_BLOCK, avoid=(broker_m, reducer_m,
                                                               expert_port, reducer_port,
                                                               serve_port))  # fmt: skip
        base = yaml.safe_load(Path(example).read_text())
        base = deep_update(
            base,
            {
                "run_dir": str(tmp_path / "run"),
                "network": {
                    "expert_port": expert_port,
                    "reducer_port": reducer_port,
                    "serve_port": serve_port,  # the front door (docs/serving.md)
                    "heartbeat_interval": 0.2,
                    "liveness": 2.0,
                    "connect_timeout": 60,
                },
                "metrics": {
                    "broker_port": broker_m if metrics else 0,
                    "reducer_port": reducer_m if metrics else 0,
                    "expert_base_port": expert_m if metrics else 0,
                },
            },
        )
        cfg = deep_update(base, extra or {})
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path, cfg

    return make
