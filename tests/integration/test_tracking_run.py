"""Experiment tracking in a real run: `traci up` with tracking.tensorboard and tracking.mlflow
on, then `traci up --resume` to more steps; what each tool holds is read back with its own
reader (TensorBoard's EventAccumulator, MLflow's client) and compared with metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    # MLflow 3.18's SQL store uses a loader SQLAlchemy 2.1 deprecates (a warning, not an error)
    pytest.mark.filterwarnings("ignore:The ``noload`` loader:DeprecationWarning"),
]
TRACI = [sys.executable, "-m", "traci_ml.app.cli"]
VIEWS = ["top_left", "top_right", "bottom_left", "bottom_right"]


def up(path: Path, *args: str) -> None:
    proc = subprocess.run(
        [*TRACI, "up", str(path), *args], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def read_tensorboard(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def steps_of(points: list[tuple[int, float]]) -> list[int]:
    return [step for step, _ in points]


@pytest.mark.timeout(500)
def test_tensorboard_and_mlflow_records_read_back_across_a_resume(run_config) -> None:
    from mlflow.tracking import MlflowClient

    path, cfg = run_config(
        {
            "train": {"steps": 200, "eval_every": 100, "log_every": 25, "checkpoint_every": 100},
            "tracking": {"tensorboard": True, "mlflow": True},
        }
    )
    run = Path(cfg["run_dir"])
    up(path)
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    mlflow = summary["tracking"]["mlflow"]
    for name in ("tensorboard", "mlflow"):
        report = summary["tracking"][name]
        assert report["on"] and report["failed"] == report["dropped"] == 0, report["error"]
        assert report["written"] == len(records) + 1

    tb = read_tensorboard(run / "tensorboard")
    assert tb["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in train]
    assert tb["train/accuracy"] == [(r["step"], pytest.approx(r["train_accuracy"])) for r in train]
    assert tb["eval/accuracy"] == [(r["step"], pytest.approx(r["accuracy"])) for r in evals]
    for i, view in enumerate(VIEWS):
        assert tb[f"eval/attention/{view}"][-1][1] == pytest.approx(evals[-1]["attention"][i])
        assert tb[f"summary/participation/{view}"] == [
            (200, pytest.approx(summary["participation"][str(i)]))
        ]

    client = MlflowClient(mlflow["tracking_uri"])
    got = client.get_run(mlflow["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == cfg["run_id"]
    loss = client.get_metric_history(got.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in loss] == [
        (r["step"], pytest.approx(r["loss"])) for r in train
    ]
    assert got.data.metrics["summary/test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert got.data.metrics["eval/accuracy"] == pytest.approx(evals[-1]["accuracy"])
    assert got.data.params["train.steps"] == "200" and got.data.params["data.views"] == "quadrants"

    # a longer resume: the same MLflow run and TensorBoard directory go on from step 200
    up(path, "--resume", "--set", "train.steps=300")
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["steps"] == 300 and resumed["tracking"]["mlflow"]["run_id"] == mlflow["run_id"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_train = [r for r in records if r["kind"] == "train"][-1]
    assert last_train["step"] == 300

    tb = read_tensorboard(run / "tensorboard")
    assert steps_of(tb["train/loss"]) == list(range(25, 301, 25))  # each step once
    assert tb["train/loss"][-1] == (300, pytest.approx(last_train["loss"]))
    assert steps_of(tb["eval/accuracy"])[-1] == 300

    got = client.get_run(mlflow["run_id"])
    assert got.info.status == "FINISHED"
    loss_steps = [m.step for m in client.get_metric_history(got.info.run_id, "train/loss")]
    assert loss_steps[-1] == 300 and sorted(set(loss_steps)) == list(range(25, 301, 25))
    assert got.data.metrics["summary/steps"] == 300
    assert got.data.params["train.steps"] == "200"  # what the run started with
    assert got.data.tags["traci.resumed.train.steps"] == "200 -> 300 at step 200"
    assert len(client.search_runs([got.info.experiment_id])) == 1
