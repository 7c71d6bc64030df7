"""Fail fast, never retry the hopeless (issue 14, item 5), with real processes: a run trained
briefly, then resumed with a config its checkpoints do not fit. ``traci up --resume`` refuses
before any process starts (one line, exit 2, seconds); what only a service can see (the
data's classes) ends the run at the service's first exit 2, with no restart."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.support import deep_update

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
TRACI = [sys.executable, "-m", "traci_ml.app.cli"]
TINY = {
    "embed_dim": 16,
    "expert": {"model": {"hidden": [16]}},
    "reducer": {"layers": 1, "heads": 2, "ff": 16},
    "train": {"steps": 20, "batch_size": 32, "eval_every": 10, "checkpoint_every": 10},
}


def trained(run_config, extra: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """A tiny run trained to its end by ``traci up``: (its config file, the config)."""
    path, cfg = run_config(deep_update(TINY, extra or {}))
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return path, cfg


def resume(path: Path, cfg: dict[str, Any], change: dict[str, Any]) -> tuple[Any, float]:
    """``traci up --resume`` with ``change`` made to the config: (the process, its seconds)."""
    path.write_text(yaml.safe_dump(deep_update(cfg, change)))
    started = time.monotonic()
    proc = subprocess.run(
        [*TRACI, "up", str(path), "--resume"], capture_output=True, text=True, timeout=200
    )
    return proc, time.monotonic() - started


def test_resume_with_other_views_fails_in_seconds_in_one_line(run_config) -> None:
    path, cfg = trained(run_config)  # digits in 4 quadrant views
    run = Path(cfg["run_dir"])
    launch, pids = (run / "launch.yaml").read_text(), (run / "pids.json").read_text()
    proc, seconds = resume(path, cfg, {"data": {"views": "halves"}, "train": {"steps": 40}})
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert seconds < 5.0, f"took {seconds:.1f}s"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("traci up: error: ")
    assert "reducer.pt was trained with 4 experts, the config has 2 views" in lines[0]
    assert "data.views: 'halves'" in lines[0] and f"delete {run}" in lines[0]
    assert "restart" not in proc.stdout and "Traceback" not in proc.stderr
    # nothing started, nothing rewritten: the run is as training left it
    assert (run / "launch.yaml").read_text() == launch
    assert (run / "pids.json").read_text() == pids


def test_a_service_that_cannot_resume_is_not_restarted(run_config) -> None:
    """The data's classes are only known to the reducer, once it reads the data: it exits 2
    with one line, and ``traci up`` stops at once instead of restarting it."""
    table = {"rows": 2000, "features": 16, "classes": 3, "experts": 2}
    synthetic = {"source": "synthetic", "views": "even", "synthetic": table}
    path, cfg = trained(run_config, {"data": synthetic})
    proc, seconds = resume(path, cfg, {"data": {"synthetic": {"classes": 4}}})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reducer exited with code 2; last log lines:" in proc.stdout
    assert "restart" not in proc.stdout, proc.stdout[-3000:]
    log = (Path(cfg["run_dir"]) / "logs" / "reducer.log").read_text()
    errors = [line for line in log.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
    assert "reducer.pt predicts 3 outputs, the data now gives 4" in errors[0]
    assert seconds < 60, f"took {seconds:.1f}s"
