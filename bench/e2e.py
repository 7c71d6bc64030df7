"""TRACI end to end: the reference model through `traci up` (six real processes, real broker).

Samples/s are taken from the reducer's own ``metrics.jsonl`` records (wall-clock ``time`` and
train ``step``) between the record at ``warmup`` steps and the last one, so process start-up,
registration and the final evaluation are not counted -- the same window the baselines time.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.reference import reference_config


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def traci_samples_per_sec(
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    window: int = 2,
    extra: dict | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """One `traci up` run of the reference model; returns samples/s and the run's summary."""
    with tempfile.TemporaryDirectory(prefix="traci-bench-") as tmp:
        run_dir = Path(tmp) / "run"
        cfg = reference_config(batch_size=batch_size, steps=steps, run_dir=run_dir,
                               ports=free_ports(2), window=window)  # fmt: skip
        for section, values in (extra or {}).items():
            cfg.setdefault(section, {}).update(values)
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.run([sys.executable, "-m", "traci_ml.cli", "up", str(path)],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"traci up failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
        train = [r for r in records if r["kind"] == "train"]
        start = next(r for r in train if r["step"] >= warmup)
        end = train[-1]
        sps = (end["step"] - start["step"]) * batch_size / (end["time"] - start["time"])
        summary = json.loads((run_dir / "summary.json").read_text())
    return {"samples_per_sec": sps, "steps": summary["steps"],
            "test_accuracy": summary.get("test_accuracy")}  # fmt: skip


if __name__ == "__main__":
    for b in (64, 256, 1024):
        r = traci_samples_per_sec(batch_size=b, steps=300, warmup=50)
        print(f"batch {b:5d}: {r['samples_per_sec']:9.0f} samples/s")
