"""Run `traci up` on a config dict for a benchmark, optionally sampling the services."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.e2e import free_ports
from traci_ml.core.rundir import RunDir


def run_cluster(
    cfg: dict[str, Any],
    *,
    sample: Callable[[dict[str, int], Path], None] | None = None,
    every: float = 0.5,
    timeout: float = 900,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run ``cfg`` (run_dir and ports are filled in); returns (metrics records, summary).
    ``sample(pids, run_dir)`` is called every ``every`` seconds while the services run."""
    with tempfile.TemporaryDirectory(prefix="traci-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        run = RunDir(run_dir)
        cfg = {**cfg, "run_dir": str(run_dir)}
        expert_port, reducer_port = free_ports(2)
        cfg["network"] = {**cfg.get("network", {}), "expert_port": expert_port,
                          "reducer_port": reducer_port}  # fmt: skip
        cfg["metrics"] = {"broker_port": 0, "reducer_port": 0, "expert_base_port": 0}
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen(
            [sys.executable, "-m", "traci_ml.app.cli", "up", str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"traci up ran past {timeout}s")
                if sample is not None and run.pids.exists():
                    try:
                        sample(json.loads(run.pids.read_text()), run_dir)
                    except (OSError, ValueError):
                        pass
                time.sleep(every)
        finally:
            if proc.poll() is None:
                proc.kill()
            out = proc.communicate()[0]
        if proc.returncode != 0:
            raise RuntimeError(f"traci up failed ({proc.returncode}):\n{out[-3000:]}")
        with run.metrics.open() as lines:
            records = [json.loads(line) for line in lines]
        summary = json.loads(run.summary.read_text())
    return records, summary


def train_rate(records: list[dict[str, Any]], batch_size: int, warmup: int) -> float:
    """Training samples/s between the record at ``warmup`` steps and the last train record."""
    train = [r for r in records if r["kind"] == "train"]
    start = next(r for r in train if r["step"] >= warmup)
    end = train[-1]
    return (end["step"] - start["step"]) * batch_size / max(end["time"] - start["time"], 1e-9)


def section_main(
    doc: str,
    run: Callable[..., dict[str, Any]],
    summary_lines: Callable[[dict[str, Any]], list[str]],
    ratios: Callable[[dict[str, Any]], dict[str, Any]],
    argv: list[str] | None = None,
    *,
    keep: bool = False,
) -> None:
    """The command line of one bench section run alone (``python -m bench.<name>``):
    --quick, --json FILE (and --keep DIR where the section can leave its runs)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs")
    parser.add_argument("--json", help="also write the result here")
    if keep:
        parser.add_argument("--keep", type=Path, help="leave the runs' configs and logs here")
    args = parser.parse_args(argv)
    result = run(quick=args.quick, **({"keep": args.keep} if keep else {}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(summary_lines(result)))
    print(json.dumps(ratios(result), indent=2))
