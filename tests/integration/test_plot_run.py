"""`traci up` ends by plotting the run, and samples the broker's queue latency while it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

from traci_ml.app import plot
from traci_ml.app.plot_latency import first_step_time, latency_series

pytestmark = pytest.mark.integration
TRACI = [sys.executable, "-m", "traci_ml.app.cli"]


@pytest.mark.timeout(300)
def test_traci_up_leaves_plots_and_broker_samples(run_config):
    path, cfg = run_config({"train": {"steps": 400, "eval_every": 200}}, metrics=True)
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(cfg["run_dir"])
    plots = run_dir / "plots"
    assert (
        f"plots in {plots}: loss.png, throughput.png, attention.png, queue_latency.png, "
        "attention_by_class.png" in proc.stdout
    )
    for name in ("loss.png", "throughput.png", "attention.png", "queue_latency.png",
                 "attention_by_class.png"):  # fmt: skip
        png = plots / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        height, width = imread(png).shape[:2]
        assert width >= 700 and height >= 400, (name, width, height)
    samples = [json.loads(x) for x in (run_dir / "broker.jsonl").read_text().splitlines()]
    counts = [s["count"] for s in samples]
    assert len(samples) >= 2 and counts[-1] > counts[0] >= 0, counts
    assert counts == sorted(counts)  # one broker life: the cumulative count only grows
    assert [s["time"] for s in samples] == sorted(s["time"] for s in samples)
    assert sum(s["interval_count"] for s in samples) == counts[-1]
    assert any(s["p50_seconds"] and s["p99_seconds"] >= s["p50_seconds"] > 0 for s in samples)
    # every sample says how many experts were live; all 4 while the run trained (the last
    # sample may come after experts said goodbye at the end: fewer is right there)
    live = [s["live_experts"] for s in samples]
    assert all(isinstance(n, int) and 0 <= n <= 4 for n in live), live
    assert max(live) == 4, live
    # queue_latency.png's axis: training time from the reducer's first step, start-up left out
    start = first_step_time(plot.load_run(run_dir).train)
    assert start is not None and samples[0]["time"] - 5 < start < samples[-1]["time"]
    series = latency_series(samples, start)
    assert series["t"] and 0 <= series["t"][0] <= 5, series["t"][:3]
    assert len(series["t"]) == sum(s["time"] >= start for s in samples)


@pytest.mark.timeout(300)
def test_without_broker_metrics_there_is_no_broker_jsonl(run_config):
    path, cfg = run_config({"train": {"steps": 100, "eval_every": 100}})
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(cfg["run_dir"])
    assert not (run_dir / "broker.jsonl").exists()
    assert "(no broker.jsonl: queue latency not plotted)" in proc.stdout
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png")) == [
        "attention.png",
        "attention_by_class.png",
        "loss.png",
        "throughput.png",
    ]
