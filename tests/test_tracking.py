"""Experiment tracking (traci_ml/core/tracking.py): the config section, how records become
metric names, a tracker that fails (it never raises into training), and the real TensorBoard
and MLflow writers read back with their own readers."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from traci_ml.core.config import load_config
from traci_ml.core.errors import ConfigError
from traci_ml.core.rundir import RunDir
from traci_ml.core.tracking import (
    MAX_FAILURES,
    MAX_QUEUE,
    Tracking,
    expert_labels,
    params,
    scalars,
)

# MLflow 3.18's SQL store uses a loader SQLAlchemy 2.1 deprecates (a warning, not an error)
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader:DeprecationWarning")
EXPERTS = ["top_left", "top_right"]
TRAIN = {"kind": "train", "step": 25, "seq": 26, "loss": 0.5, "loss_avg": 0.6,
         "train_accuracy": 0.8, "samples_per_sec": 900.0, "wall_seconds": 2.0, "skipped": 0,
         "attention": [0.4, 0.6], "participation": [1.0, 0.75], "time": 1e9}  # fmt: skip
EVAL = {"kind": "eval", "step": 50, "seq": 60, "samples": 359, "loss": 0.3, "accuracy": 0.9,
        "attention": [0.3, 0.7], "by_experts_present": {"2": {"samples": 359, "accuracy": 0.9}},
        "missing_expert": {"top_left": 0.5, "top_right": 0.6}, "wall_seconds": 4.0,
        "time": 1e9 + 4}  # fmt: skip


def config(tmp_path: Path, **sets: str):
    return load_config(None, overrides={"run_dir": str(tmp_path / "run"), **sets}, env={})


# ---- the config section -------------------------------------------------------------------


def test_tracking_is_off_by_default_and_builds_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert (cfg.tracking.tensorboard, cfg.tracking.mlflow) == (False, False)
    assert cfg.tracking.mlflow_uri is None and cfg.tracking.experiment is None
    assert Tracking.for_run(cfg, RunDir(cfg.run_path), experts=EXPERTS, first_step=0,
                            resume=False) is None  # fmt: skip


@pytest.mark.parametrize(
    ("sets", "env", "message"),
    [
        (
            {"tracking.mlfow": "true"},
            {},
            "--set tracking.mlfow: unknown config key 'tracking.mlfow'",
        ),
        ({"tracking.mlflow": "maybe"}, {}, "tracking.mlflow: Input should be a valid boolean"),
        ({"tracking.mlflow_uri": "sqlite:///a b.db"}, {}, "tracking.mlflow_uri: 'sqlite:///a b"),
        ({"tracking.experiment": "''"}, {}, "tracking.experiment: String should have at least"),
        ({}, {"TRACI_TRACKING__TENSORBORD": "1"}, "unknown config key 'tracking.tensorbord'"),
    ],
)
def test_a_bad_tracking_key_is_named(sets: dict, env: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides=sets, env=env)
    assert message in str(err.value)


def test_tracking_keys_from_yaml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("tracking:\n  tensorboard: true\n  experiment: digits-sweep\n")
    cfg = load_config(path, env={"TRACI_TRACKING__MLFLOW_URI": "http://mlflow:5000",
                                 "TRACI_TRACKING__MLFLOW": "true"})  # fmt: skip
    assert cfg.tracking.tensorboard and cfg.tracking.mlflow
    assert (cfg.tracking.mlflow_uri, cfg.tracking.experiment) == ("http://mlflow:5000",
                                                                   "digits-sweep")  # fmt: skip


# ---- records -> names ---------------------------------------------------------------------


def test_train_record_names() -> None:
    assert scalars(TRAIN, EXPERTS, "train") == {
        "train/loss": 0.5, "train/loss_avg": 0.6, "train/accuracy": 0.8,
        "train/samples_per_sec": 900.0, "train/wall_seconds": 2.0, "train/skipped": 0.0,
        "train/attention/top_left": 0.4, "train/attention/top_right": 0.6,
        "train/participation/top_left": 1.0, "train/participation/top_right": 0.75,
    }  # fmt: skip


def test_eval_record_names() -> None:
    values = scalars(EVAL, EXPERTS, "eval")
    assert values["eval/accuracy"] == 0.9 and values["eval/loss"] == 0.3
    assert values["eval/attention/top_right"] == 0.7
    assert values["eval/by_experts_present/2/accuracy"] == 0.9
    assert values["eval/missing_expert/top_left"] == 0.5
    assert not any(k.endswith(("/step", "/seq", "/time")) for k in values)


def test_summary_names_participation_per_expert_and_skips_the_history() -> None:
    summary = {"steps": 100, "test_accuracy": 0.95, "run_id": "x", "eval_history": [EVAL, EVAL],
               "participation": {"0": 1.0, "1": 0.5}, "attention_eval": [0.2, 0.8],
               "expert_names": EXPERTS, "overlap": {}}  # fmt: skip
    assert scalars(summary, EXPERTS, "summary") == {
        "summary/steps": 100.0, "summary/test_accuracy": 0.95,
        "summary/participation/top_left": 1.0, "summary/participation/top_right": 0.5,
        "summary/attention_eval/top_left": 0.2, "summary/attention_eval/top_right": 0.8,
    }  # fmt: skip


def test_expert_labels_are_safe_and_unique() -> None:
    assert expert_labels(["left half", "right$"]) == ["left half", "right_"]
    assert expert_labels(["a", "a"]) == ["0_a", "1_a"]


def test_config_params_are_flat_text() -> None:
    flat = params(config(Path("/tmp")).to_dict())
    assert flat["train.steps"] == "1500" and flat["data.source"] == "digits"
    assert flat["expert.model.hidden"] == "[256]" and flat["tracking.mlflow_uri"] == "null"
    assert flat["expert.model.kwargs"] == "{}"
    assert all(isinstance(v, str) and len(v) <= 6000 for v in flat.values())


# ---- a tracker that fails never raises ----------------------------------------------------


class Fake:
    """A tracker whose methods fail as told; ``gate`` holds its first record."""

    name = "fake"

    def __init__(self, fail: set[str] = frozenset(), gate: threading.Event | None = None):
        self.fail, self.gate = fail, gate
        self.calls: list[tuple[str, Any]] = []

    def _maybe(self, method: str, *args: Any) -> None:
        self.calls.append((method, args))
        if self.gate is not None:
            self.gate.wait(10)
        if method in self.fail:
            raise OSError(f"{method} refused")

    def open(self, config: dict) -> None:
        self._maybe("open", config)

    def record(self, step: int, wall: float, values: dict) -> None:
        self._maybe("record", step, wall, values)

    def finish(self, step: int, values: dict, finished: bool) -> None:
        self._maybe("finish", step, values, finished)

    def info(self) -> dict:
        return {"where": "nowhere"}


def test_records_reach_a_tracker_in_order_then_the_summary() -> None:
    fake = Fake()
    tracking = Tracking([fake], config={"a": 1}, experts=EXPERTS)
    tracking.record(TRAIN)
    tracking.record(EVAL)
    report = tracking.close({"steps": 50, "test_accuracy": 0.9}, finished=True)
    assert [c[0] for c in fake.calls] == ["open", "record", "record", "finish"]
    assert fake.calls[1][1][:2] == (25, 1e9) and fake.calls[2][1][0] == 50
    assert fake.calls[3][1] == (50, {"summary/steps": 50.0, "summary/test_accuracy": 0.9}, True)
    assert report == {"fake": {"on": True, "written": 3, "failed": 0, "dropped": 0,
                               "error": None, "where": "nowhere"}}  # fmt: skip


def test_a_failing_tracker_is_logged_once_counted_and_turned_off(caplog) -> None:
    failed: list[str] = []
    fake, good = Fake({"record"}), Fake()
    good.name = "good"
    tracking = Tracking([fake, good], config={}, experts=EXPERTS, on_failure=failed.append)
    with caplog.at_level(logging.WARNING, logger="traci_ml.core.tracking"):
        for _ in range(MAX_FAILURES + 2):
            tracking.record(TRAIN)  # never raises
        report = tracking.close({}, finished=False)
    assert report["fake"] == {"on": False, "written": 0, "failed": MAX_FAILURES, "dropped": 0,
                              "error": "OSError: record refused", "where": "nowhere"}  # fmt: skip
    assert failed == ["fake"] * MAX_FAILURES
    assert report["good"]["written"] == MAX_FAILURES + 3 and report["good"]["on"]
    assert [c[0] for c in fake.calls] == ["open"] + ["record"] * MAX_FAILURES  # no finish
    failures = [r for r in caplog.records if "failed to record" in r.getMessage()]
    assert len(failures) == 1  # once, however often it fails
    assert any("turned off" in r.getMessage() for r in caplog.records)


def test_a_tracker_that_cannot_start_is_off_at_once_with_the_install_hint() -> None:
    class Missing(Fake):
        def open(self, config: dict) -> None:
            raise ModuleNotFoundError("No module named 'mlflow'")

    missing = Missing()
    tracking = Tracking([missing], config={}, experts=EXPERTS)
    tracking.record(TRAIN)
    report = tracking.close({"steps": 1}, finished=True)["fake"]
    assert not report["on"] and report["failed"] == 1 and report["written"] == 0
    assert "No module named 'mlflow'" in report["error"]
    assert "pip install 'traci-ml[tracking]'" in report["error"]
    assert missing.calls == []


def test_a_stuck_tracker_drops_records_and_close_does_not_wait_for_it() -> None:
    gate = threading.Event()
    tracking = Tracking([Fake(gate=gate)], config={}, experts=EXPERTS)
    t0 = time.monotonic()
    for _ in range(MAX_QUEUE + 50):
        tracking.record(TRAIN)  # the stuck tracker never blocks the caller
    report = tracking.close({}, finished=True, timeout=0.5)["fake"]
    assert time.monotonic() - t0 < 5
    assert report["dropped"] >= 50 and report["unfinished"] is True
    gate.set()


def test_an_unreachable_mlflow_server_does_not_stop_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own knob
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = config(
        tmp_path, **{"tracking.mlflow": "true", "tracking.mlflow_uri": "http://127.0.0.1:9"}
    )
    tracking = Tracking.for_run(cfg, RunDir(cfg.run_path), experts=EXPERTS, first_step=0,
                                resume=False)  # fmt: skip
    assert tracking is not None
    tracking.record(TRAIN)
    report = tracking.close({"steps": 25}, finished=True, timeout=20)["mlflow"]
    assert not report["on"] and report["failed"] == 1 and report["error"]
    assert report["tracking_uri"] == "http://127.0.0.1:9"


# ---- the real writers, read back ----------------------------------------------------------


def read_tensorboard(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def records(steps: range, loss: float) -> list[dict]:
    return [{**TRAIN, "step": s, "loss": loss, "time": 1e9 + s} for s in steps]


def test_tensorboard_reads_back_and_a_resume_hides_the_lost_steps(tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"tracking.tensorboard": "true"})
    run = RunDir(cfg.run_path)
    first = Tracking.for_run(cfg, run, experts=EXPERTS, first_step=0, resume=False)
    for rec in records(range(1, 11), 1.0):
        first.record(rec)
    first.close(None, finished=False, timeout=30)  # a life that ends at step 10, checkpoint at 6
    second = Tracking.for_run(cfg, run, experts=EXPERTS, first_step=6, resume=True)
    for rec in records(range(7, 13), 2.0):
        second.record(rec)
    report = second.close({"steps": 12, "test_accuracy": 0.9}, finished=True)
    assert report["tensorboard"]["written"] == 7 and report["tensorboard"]["logdir"] == str(
        run.tensorboard
    )
    scalars_read = read_tensorboard(run.tensorboard)
    # the lost life's steps 7-10 are purged: each step once, the second life's from 7 on
    assert scalars_read["train/loss"] == [(s, 1.0) for s in range(1, 7)] + [
        (s, 2.0) for s in range(7, 13)
    ]
    assert scalars_read["train/participation/top_right"][0] == (1, 0.75)
    assert scalars_read["summary/test_accuracy"] == [(12, pytest.approx(0.9))]


def test_mlflow_reads_back_and_a_resume_continues_the_same_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cfg = config(tmp_path, **{"tracking.mlflow": "true", "train.steps": "10"})
    run = RunDir(cfg.run_path)
    first = Tracking.for_run(cfg, run, experts=EXPERTS, first_step=0, resume=False)
    for rec in records(range(1, 6), 1.0):
        first.record(rec)
    one = first.close(None, finished=False, timeout=30)["mlflow"]
    assert one["failed"] == 0, one["error"]
    client = MlflowClient(one["tracking_uri"])
    assert one["tracking_uri"] == f"sqlite:///{run.mlflow.resolve() / 'mlflow.db'}"
    assert client.get_run(one["run_id"]).info.status == "KILLED"

    longer = config(tmp_path, **{"tracking.mlflow": "true", "train.steps": "20"})
    second = Tracking.for_run(longer, run, experts=EXPERTS, first_step=5, resume=True)
    for rec in records(range(6, 9), 2.0):
        second.record(rec)
    two = second.close({"steps": 8, "test_accuracy": 0.9}, finished=True)["mlflow"]
    assert two["run_id"] == one["run_id"] and two["failed"] == 0

    got = client.get_run(two["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "traci"
    assert client.get_experiment(got.info.experiment_id).name == "traci"  # default: run_id
    history = client.get_metric_history(two["run_id"], "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, 1.0) for s in range(1, 6)] + [
        (s, 2.0) for s in range(6, 9)
    ]
    assert got.data.metrics["summary/test_accuracy"] == pytest.approx(0.9)
    assert got.data.metrics["train/attention/top_left"] == pytest.approx(0.4)
    assert got.data.params["train.steps"] == "10"  # params: the config the run started with
    assert got.data.tags["traci.resumed.train.steps"] == "10 -> 20 at step 5"
    assert got.data.params["data.source"] == "digits"
