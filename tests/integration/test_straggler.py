"""A straggler cannot stall the run: six real processes, one expert 12x slower than the
others (a simulated accelerator that sleeps in forward and backward), the default join."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.accel import simulated_model
from traci_ml.core.data import digits_views

pytestmark = pytest.mark.integration
TRACI = [sys.executable, "-m", "traci_ml.app.cli"]
SLOW = 3  # the straggler's expert id


@pytest.mark.timeout(400)
def test_a_straggler_is_masked_and_skips_ahead_while_the_others_train(run_config):
    views = [
        {"name": v.name, "columns": list(v.columns),
         "model": simulated_model(60.0 if i == SLOW else 5.0)}
        for i, v in enumerate(digits_views("quadrants"))
    ]  # fmt: skip
    path, cfg = run_config({
        "data": {"views": views},
        "expert": {"window": 4},
        "train": {"steps": 240, "eval_every": 120, "checkpoint_every": 0},
        "launcher": {"restart": "never"},
    })  # fmt: skip
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(cfg["run_dir"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 240
    share = {int(k): v for k, v in summary["participation"].items()}
    fast = [share[i] for i in range(4) if i != SLOW]
    # The others take part in (nearly) every step; the straggler in far fewer: the steps it
    # could not make in time went without it instead of waiting for it.
    assert min(fast) >= 0.9, share
    assert share[SLOW] < 0.7 and share[SLOW] < min(fast), share
    slow = json.loads((run_dir / "experts" / f"expert-{SLOW}.json").read_text())
    assert slow["skipped"] > 0  # it skipped ahead instead of falling ever further behind
    assert slow["sent"] == slow["applied"] + slow["acked"] + slow["dropped"] + slow["inflight"]
    assert slow["sent"] + slow["skipped"] >= 240  # every train step: sent, or skipped
    # eval steps wait for everyone: the held-out evaluation saw every expert
    assert summary["test_accuracy"] >= 0.85
