"""`traci keys generate`, then `traci up` with every socket under CurveZMQ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.support import generate_keys

pytestmark = pytest.mark.integration
TRACI = [sys.executable, "-m", "traci_ml.app.cli"]


@pytest.mark.timeout(300)
def test_traci_up_trains_over_curve(run_config, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    path, cfg = run_config(
        {
            "security": {"curve_dir": str(keys)},
            "train": {"steps": 150, "eval_every": 75, "checkpoint_every": 0},
        }
    )
    assert f"curve_dir: {keys.resolve()}" in generate_keys(TRACI, keys, path)
    assert sorted(p.name for p in (keys / "authorized").iterdir()) == [
        "client.key",
        *(f"expert-{i}.key" for i in range(4)),
        "reducer.key",
    ]

    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(cfg["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 150
    assert summary["test_accuracy"] >= 0.9
    broker_log = (run_dir / "logs" / "broker.log").read_text()
    assert "CURVE on: admitting the 6 peer keys" in broker_log


@pytest.mark.timeout(60)
def test_traci_up_refuses_a_public_bind_without_keys(run_config) -> None:
    path, _ = run_config({"network": {"bind_host": "0.0.0.0"}})
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2
    assert "refusing to bind 0.0.0.0 without CURVE keys" in proc.stderr
    assert "--insecure" in proc.stderr
