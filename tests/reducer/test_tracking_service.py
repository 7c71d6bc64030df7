"""The reducer's records copied to TensorBoard and MLflow (tracking.*), in-process against the
fake broker of test_service.py: every train and eval record read back with each tool's own
reader equals metrics.jsonl, the config is there, and summary.json says where it all went."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.reducer.test_service import TOTAL, Rig, make_config
from traci_ml import proto

pytestmark = [
    pytest.mark.timeout(90),
    # MLflow 3.18's SQL store uses a loader SQLAlchemy 2.1 deprecates (a warning, not an error)
    pytest.mark.filterwarnings("ignore:The ``noload`` loader:DeprecationWarning"),
]
VIEWS = ["top_left", "top_right", "bottom_left", "bottom_right"]


def run_to_the_end(tmp_path: Path, **extra: str) -> tuple[Path, list[dict], dict]:
    rig = Rig(make_config(tmp_path, **extra))
    try:
        rig.welcome()
        for seq in range(TOTAL):
            rig.broker.send(rig.batch(seq))
            kind = proto.Grad if rig.schedule.step(seq).phase == "train" else proto.Ack
            rig.broker.expect(kind)
        # the reducer ends its trackers (a bounded wait) before it says goodbye
        assert rig.broker.expect(proto.Goodbye, timeout=30) == proto.Goodbye("done")
        assert rig.join(timeout=30) == 0
    finally:
        rig.close()
    run = rig.config.run_path
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return run, [json.loads(line) for line in lines], json.loads((run / "summary.json").read_text())


def test_records_summary_and_config_reach_tensorboard_and_mlflow(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    on = {"tracking.tensorboard": "true", "tracking.mlflow": "true", "tracking.experiment": "e1"}
    run, records, summary = run_to_the_end(tmp_path, **on)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(train) == 6 and len(evals) == 2
    assert (
        all(len(r["participation"]) == 4 for r in train) and train[-1]["participation"] == [1.0] * 4
    )

    report = summary["tracking"]
    for name in ("tensorboard", "mlflow"):
        assert report[name]["on"] and report[name]["failed"] == 0, report[name]["error"]
        assert report[name]["written"] == len(records) + 1  # and the summary

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tb = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert tb["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in train]
    assert tb["eval/accuracy"] == [(r["step"], pytest.approx(r["accuracy"])) for r in evals]
    for i, view in enumerate(VIEWS):
        assert tb[f"eval/attention/{view}"][-1][1] == pytest.approx(evals[-1]["attention"][i])
        assert tb[f"train/participation/{view}"][-1] == (6, 1.0)
        assert tb[f"summary/participation/{view}"] == [(6, 1.0)]
    assert tb["summary/test_accuracy"] == [(6, pytest.approx(summary["test_accuracy"]))]
    assert "config/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"run_id": "reducer-test"' in text

    client = MlflowClient(report["mlflow"]["tracking_uri"])
    got = client.get_run(report["mlflow"]["run_id"])
    assert (
        got.info.status == "FINISHED" and client.get_experiment(got.info.experiment_id).name == "e1"
    )
    history = client.get_metric_history(got.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [
        (r["step"], pytest.approx(r["loss"])) for r in train
    ]
    got_eval = client.get_metric_history(got.info.run_id, "eval/accuracy")
    assert [(m.step, m.value) for m in got_eval] == [
        (r["step"], pytest.approx(r["accuracy"])) for r in evals
    ]
    assert got.data.metrics["summary/test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert got.data.params["train.steps"] == "6" and got.data.params["embed_dim"] == "8"
    note = json.loads((run / "mlflow" / "run.json").read_text())
    assert note["run_id"] == got.info.run_id


def test_tracking_off_adds_nothing(tmp_path: Path) -> None:
    run, records, summary = run_to_the_end(tmp_path)
    assert "tracking" not in summary
    assert not (run / "tensorboard").exists() and not (run / "mlflow").exists()
    assert records


def test_a_broken_tracker_leaves_the_run_whole(tmp_path: Path) -> None:
    """MLflow pointed at a store it cannot open: counted, reported, and the run finishes."""
    bad = tmp_path / "not-a-dir"
    bad.write_text("a file where a directory should be")
    run, records, summary = run_to_the_end(
        tmp_path, **{"tracking.mlflow": "true", "tracking.mlflow_uri": f"sqlite:///{bad}/x.db"}
    )
    report = summary["tracking"]["mlflow"]
    assert not report["on"] and report["failed"] == 1 and report["error"]
    assert summary["steps"] == 6 and len(records) == 8
