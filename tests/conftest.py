"""Shared test helpers: free loopback ports and small run configs written to files."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # tests/fused.py, the one-process reference


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            deep_update(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


@pytest.fixture
def run_config(tmp_path: Path):
    """Write a config for a run on fresh loopback ports; returns (path, dict)."""

    def make(extra: dict[str, Any] | None = None, *, metrics: bool = False):
        expert_port, reducer_port, broker_m, reducer_m, expert_m = free_ports(5)
        base = yaml.safe_load(Path("examples/digits.yaml").read_text())
        base = deep_update(
            base,
            {
                "run_dir": str(tmp_path / "run"),
                "network": {
                    "expert_port": expert_port,
                    "reducer_port": reducer_port,
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
