"""Real processes over tcp loopback: `traci up`, services started by hand, and the
equivalence of the distributed path with the one-process computation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from traci_ml.core.config import load_config
from traci_ml.core.reference import train_reference

pytestmark = pytest.mark.integration
TRACI = [sys.executable, "-m", "traci_ml.app.cli"]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.timeout(400)
def test_traci_up_trains_digits_quadrants_to_097(run_config):
    """The default run (window 2, 1500 steps) through six processes."""
    path, cfg = run_config(metrics=True)
    t0 = time.monotonic()
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=380)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_summary(Path(cfg["run_dir"]))
    print(
        f"traci up: accuracy {summary['test_accuracy']:.4f}, wall {wall:.1f}s, "
        f"{summary['samples_per_sec']:.0f} samples/s"
    )
    assert "done: test_accuracy" in proc.stdout
    assert cfg["expert"]["window"] >= 2
    assert summary["steps"] == 1500
    assert summary["test_accuracy"] >= 0.97
    for i in range(4):
        acc = json.loads((Path(cfg["run_dir"]) / "experts" / f"expert-{i}.json").read_text())
        assert acc["sent"] == acc["applied"] + acc["acked"] + acc["dropped"] + acc["inflight"]
        assert acc["applied"] == 1500 and acc["dropped"] == 0


@pytest.mark.timeout(300)
def test_services_started_by_hand(run_config, tmp_path):
    """`traci broker`, `traci reducer`, `traci expert --id i`: exactly what containers run."""
    path, cfg = run_config({"train": {"steps": 400, "eval_every": 200}})
    logs = tmp_path / "logs"
    logs.mkdir()
    procs, outs = {}, []
    commands = {
        "reducer": ["reducer"],
        **{f"expert-{i}": ["expert", "--id", str(i)] for i in (3, 1, 0, 2)},
        "broker": ["broker"],
    }
    for name, args in commands.items():  # the broker last: peers wait for it on their own
        out = (logs / f"{name}.log").open("w")
        outs.append(out)
        procs[name] = subprocess.Popen(
            [*TRACI, *args, "--config", str(path)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        for name, proc in procs.items():
            assert proc.wait(timeout=240) == 0, (logs / f"{name}.log").read_text()[-3000:]
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        for out in outs:
            out.close()
    summary = read_summary(Path(cfg["run_dir"]))
    assert summary["steps"] == 400
    assert summary["test_accuracy"] >= 0.9


@pytest.mark.timeout(300)
def test_window_1_matches_the_reference_computation(run_config):
    """Lock-step over real sockets equals one process (traci_ml.core.reference): same losses,
    same parameters. With input noise (``expert.input_noise``, off by default): each expert's
    EMB and its online pass draw the reference's noise."""
    steps = 20
    path, cfg = run_config(
        {
            "expert": {"window": 1, "input_noise": 0.2},
            "reducer": {"expert_dropout": 0.1},
            "train": {"steps": steps, "eval_every": 10, "log_every": 1, "checkpoint_every": 0},
        }
    )
    assert_run_matches_reference(path, Path(cfg["run_dir"]), steps)


@pytest.mark.timeout(400)
def test_window_1_regression_with_the_linear_path_matches_the_reference(run_config, tmp_path):
    """The same on a regression table, whose nets carry the linear path by default
    (``reducer.linear_path: auto``): each expert's linear map at its own rate, the reducer's
    gate under its own penalty, equal in the services and in one process."""
    from bench.quality_tables import load_table, table_config, write_csv

    table = load_table("diabetes")
    csv = write_csv(table, tmp_path / "diabetes.csv")
    data = table_config(table, csv, tmp_path / "unused")["data"]
    steps = 20
    path, cfg = run_config(
        {
            "data": data,
            "expert": {"window": 1},
            "train": {"steps": steps, "eval_every": 10, "log_every": 1, "checkpoint_every": 0},
        }
    )
    config = load_config(path)
    assert config.task == "regression" and config.linear_path
    run_dir = Path(cfg["run_dir"])
    assert_run_matches_reference(path, run_dir, steps)
    reducer = torch.load(run_dir / "checkpoints" / "reducer.pt", weights_only=False)["model"]
    assert reducer["gate"].item() != 1.0  # it trained: from 1, moved by data and penalty


def assert_run_matches_reference(path: Path, run_dir: Path, steps: int) -> None:
    """`traci up` of the config at ``path`` gives the reference trainer's losses and, in its
    checkpoints, its parameters."""
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    dist_losses = [r["loss"] for r in records if r["kind"] == "train"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the services run: the same summation order
    try:
        reference = train_reference(load_config(path))
    finally:
        torch.set_num_threads(threads)
    trainer = reference.trainer
    assert len(dist_losses) == len(reference.losses) == steps
    torch.testing.assert_close(
        torch.tensor(dist_losses), torch.tensor(reference.losses), rtol=1e-5, atol=1e-6
    )
    for i, (online, target) in enumerate(zip(trainer.online, trainer.target, strict=True)):
        state = torch.load(run_dir / "checkpoints" / f"expert-{i}.pt", weights_only=False)
        for name, value in online.state_dict().items():
            torch.testing.assert_close(state["online"][name], value, rtol=1e-5, atol=1e-6)
        for name, value in target.state_dict().items():
            torch.testing.assert_close(state["target"][name], value, rtol=1e-5, atol=1e-6)
    reducer_state = torch.load(run_dir / "checkpoints" / "reducer.pt", weights_only=False)
    for name, value in trainer.reducer.state_dict().items():
        torch.testing.assert_close(reducer_state["model"][name], value, rtol=1e-5, atol=1e-6)
