"""Experiment tracking: the reducer's train and eval records, the run config and the final
summary, copied to TensorBoard and/or MLflow (``tracking.*`` in the config; docs/tracking.md).

Opt-in and best effort. ``Tracking.record`` only queues a record (bounded: when the queue is
full the record is dropped and counted); one background thread feeds the trackers, so a slow
store or an unreachable MLflow server (whose client retries for minutes) never holds a
training step. A tracker that fails -- its package missing, a store it cannot open, a write
refused -- is logged once and counted, and turned off at once if it cannot start or after
``MAX_FAILURES`` failures in a row; nothing here raises into the caller. The packages are
imported in that thread, only when a tracker is on. This module opens no socket itself.

Names (``scalars``): every number of a record as ``<kind>/<field>`` (``train/loss``,
``train/accuracy`` from ``train_accuracy``, ``eval/rmse``), a per-expert list as one value per
view (``eval/attention/top_left``, ``train/participation/top_left``), nested fields joined by
``/`` (``eval/by_experts_present/4/accuracy``); the summary's numbers as ``summary/<field>``
at the last step. The step of every value is the train step of its record.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traci_ml.core.config import Config
from traci_ml.core.files import write_json_atomic
from traci_ml.core.rundir import RunDir

log = logging.getLogger(__name__)

MAX_QUEUE = 1000  # records waiting for the trackers (25,000 steps at train.log_every 25)
MAX_FAILURES = 3  # failures in a row after which a tracker is turned off
INSTALL_HINT = "pip install 'traci-ml[tracking]'"
_SKIP = {"kind", "step", "seq", "time", "eval_history", "tracking"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /:]")  # what MLflow allows in a metric name
MAX_PARAM = 6000  # MLflow's longest parameter value
BATCH = 100  # MLflow: params (and tags) per log_batch; metrics go 1000 a call


def clean(name: str) -> str:
    """A metric name or name part that MLflow and TensorBoard both take."""
    return _UNSAFE.sub("_", name) or "_"


def expert_labels(names: Sequence[str]) -> list[str]:
    """One label per expert: its view's name, or ``<i>_<name>`` where names repeat."""
    labels = [clean(n) for n in names]
    if len(set(labels)) < len(labels):
        labels = [f"{i}_{n}" for i, n in enumerate(labels)]
    return labels


def scalars(record: Mapping[str, Any], experts: Sequence[str], prefix: str) -> dict[str, float]:
    """The numbers of one record, named as the module docstring says."""
    out: dict[str, float] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, int | float):
            out[key] = float(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{key}/{clean(str(k))}", v)
        elif isinstance(value, list | tuple) and len(value) == len(experts):
            for name, v in zip(experts, value, strict=True):
                walk(f"{key}/{name}", v)

    for key, value in record.items():
        if key in _SKIP:
            continue
        if key == "participation" and isinstance(value, Mapping):  # summary: {"0": share}
            value = [value.get(str(i)) for i in range(len(experts))]
        if prefix == "train":
            key = key.removeprefix("train_")
        walk(f"{prefix}/{clean(key)}", value)
    return out


def params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The run config flattened to ``section.key -> text`` (lists and empty maps as JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(params(value, f"{prefix}{key}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[f"{prefix}{key}"] = text[:MAX_PARAM]
    return out


def config_text(config: Mapping[str, Any]) -> str:
    """The run config as a Markdown code block (a TensorBoard text summary)."""
    lines = json.dumps(config, indent=2, sort_keys=True).splitlines()
    return "\n".join("    " + line for line in lines)


class TensorBoardTracker:
    """Event files in ``logdir``; a resumed run appends to the same directory from its first
    new step on (``purge_step``: the steps of the lost life after the checkpoint are hidden)."""

    name = "tensorboard"

    def __init__(self, logdir: Path, first_step: int) -> None:
        self.logdir, self.first_step, self.writer = logdir, first_step, None

    def open(self, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.logdir), purge_step=self.first_step + 1)
        self.writer.add_text("config", config_text(config), global_step=self.first_step)
        self.writer.flush()

    def record(self, step: int, wall: float, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=wall)
        self.writer.flush()

    def finish(self, step: int, values: Mapping[str, float], finished: bool) -> None:
        self.record(step, time.time(), values)
        self.writer.close()

    def info(self) -> dict[str, Any]:
        return {"logdir": str(self.logdir)}


class MlflowTracker:
    """One MLflow run per training run: params = the config it started with, metrics = the
    records. ``note`` (``RUN_DIR/mlflow/run.json``) remembers the run, so a resume logs to the
    same one (a config key changed on resume becomes the tag ``traci.resumed.<key>``)."""

    name = "mlflow"

    def __init__(
        self, uri: str, experiment: str, note: Path, *, resume: bool, run_name: str,
        first_step: int, artifacts: Path | None = None,
    ) -> None:  # fmt: skip
        self.uri, self.experiment, self.note, self.resume = uri, experiment, note, resume
        self.run_name, self.first_step, self.artifacts = run_name, first_step, artifacts
        self.client: Any = None
        self.run_id: str | None = None

    def open(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        self.note.parent.mkdir(parents=True, exist_ok=True)
        self.client = client = MlflowClient(tracking_uri=self.uri)
        wanted = params(config)
        run = self._resumable()
        if run is None:
            exp = client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(
                self.experiment, artifact_location=self.artifacts and self.artifacts.as_uri()
            )  # fmt: skip
            run = client.create_run(
                exp_id, run_name=self.run_name, tags={"traci.run_id": self.run_name}
            )
            new, tags = wanted, {}
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            have = run.data.params
            new = {k: v for k, v in wanted.items() if k not in have}
            tags = {f"traci.resumed.{k}": f"{have[k]} -> {v} at step {self.first_step}"[:MAX_PARAM]
                    for k, v in wanted.items() if k in have and have[k] != v}  # fmt: skip
        self.run_id = run.info.run_id
        write_json_atomic(self.note, {"tracking_uri": self.uri, "run_id": self.run_id,
                                      "experiment_id": run.info.experiment_id})  # fmt: skip
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), BATCH):
            client.log_batch(self.run_id, params=items[i : i + BATCH])
        tag_items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(tag_items), BATCH):
            client.log_batch(self.run_id, tags=tag_items[i : i + BATCH])

    def _resumable(self) -> Any:
        """The run ``note`` names, if this is a resume into the same store and it is alive."""
        if not self.resume or not self.note.exists():
            return None
        note = json.loads(self.note.read_text())
        if note.get("tracking_uri") != self.uri:
            return None
        try:
            run = self.client.get_run(note["run_id"])
        except Exception:  # noqa: BLE001 - gone from the store: start a new run
            return None
        return None if run.info.lifecycle_stage == "deleted" else run

    def record(self, step: int, wall: float, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(wall * 1000)
        metrics = [Metric(k, v, stamp, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self, step: int, values: Mapping[str, float], finished: bool) -> None:
        self.record(step, time.time(), values)
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")

    def info(self) -> dict[str, Any]:
        return {"tracking_uri": self.uri, "experiment": self.experiment, "run_id": self.run_id}


@dataclass
class _State:
    tracker: Any
    on: bool = True
    written: int = 0  # records (and the summary) it took
    failed: int = 0
    dropped: int = 0  # records that found the queue full
    streak: int = 0
    error: str | None = None  # the first failure


class Tracking:
    """The trackers of one run, fed from a queue by one background thread (module doc)."""

    def __init__(
        self,
        trackers: Sequence[Any],
        *,
        config: Mapping[str, Any],
        experts: Sequence[str],
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.states = [_State(t) for t in trackers]
        self.experts = expert_labels(experts)
        self.on_failure = on_failure
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue(MAX_QUEUE)
        self._full_logged = False
        self._thread = threading.Thread(
            target=self._work, args=(dict(config),), name="traci-tracking", daemon=True
        )
        self._thread.start()

    @classmethod
    def for_run(
        cls, config: Config, run_dir: RunDir, *, experts: Sequence[str], first_step: int,
        resume: bool, on_failure: Callable[[str], None] | None = None,
    ) -> Tracking | None:  # fmt: skip
        """The trackers ``config.tracking`` turns on for ``run_dir``, started;
        None when none is on. ``first_step``: the train steps already done (resume)."""
        cfg, trackers = config.tracking, []
        if cfg.tensorboard:
            trackers.append(TensorBoardTracker(run_dir.tensorboard, first_step))
        if cfg.mlflow:
            store = run_dir.mlflow.resolve()
            uri = cfg.mlflow_uri or f"sqlite:///{store / 'mlflow.db'}"
            trackers.append(MlflowTracker(
                uri, cfg.experiment or config.run_id, run_dir.mlflow / "run.json", resume=resume,
                run_name=config.run_id, first_step=first_step,
                artifacts=None if cfg.mlflow_uri else store / "artifacts",
            ))  # fmt: skip
        if not trackers:
            return None
        return cls(trackers, config=config.to_dict(), experts=experts, on_failure=on_failure)

    def record(self, record: Mapping[str, Any]) -> None:
        """Queue one ``metrics.jsonl`` record (``kind``, ``step``, ``time``...); never blocks."""
        try:
            self._queue.put_nowait(("record", dict(record)))
        except queue.Full:
            for s in self.states:
                s.dropped += s.on
            if not self._full_logged:
                self._full_logged = True
                log.warning("tracking: %d records wait for the trackers; dropping (counted)",
                            MAX_QUEUE)  # fmt: skip

    def close(
        self,
        summary: Mapping[str, Any] | None = None,
        *,
        finished: bool,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Log ``summary`` (at its ``steps``), end the trackers (an MLflow run FINISHED, or
        KILLED when not ``finished``) and wait up to ``timeout`` s (default: 15 s, 3 s when
        not ``finished``, within ``traci up``'s stop grace); logs and returns ``report()``."""
        if timeout is None:
            timeout = 15.0 if finished else 3.0
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(("close", dict(summary or {}), finished), timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("tracking: trackers still busy after %.0f s; not waiting", timeout)
        report = self.report()
        for name, r in report.items():
            where = r.get("logdir") or f"{r.get('tracking_uri')} run {r.get('run_id')}"
            log.info("tracking: %s took %d records (%d failed, %d dropped): %s",
                     name, r["written"], r["failed"], r["dropped"], where)  # fmt: skip
        return report

    def report(self) -> dict[str, Any]:
        """Per tracker: on, written, failed, dropped, error, where it logs (summary.json)."""
        busy = self._thread.is_alive()
        return {
            s.tracker.name: {
                "on": s.on,
                "written": s.written,
                "failed": s.failed,
                "dropped": s.dropped,
                "error": s.error,
                **s.tracker.info(),
                **({"unfinished": True} if busy else {}),
            }  # fmt: skip
            for s in self.states
        }

    # -- the background thread -------------------------------------------------------------

    def _work(self, config: dict[str, Any]) -> None:
        for s in self.states:
            self._call(s, "open", config)
        while True:
            item = self._queue.get()
            if item[0] == "close":
                summary, finished = item[1], item[2]
                values = scalars(summary, self.experts, "summary")
                step = int(summary.get("steps", 0))
                for s in self.states:
                    self._call(s, "finish", step, values, finished)
                return
            record = item[1]
            kind = str(record.get("kind", "record"))
            values = scalars(record, self.experts, clean(kind))
            step, wall = int(record.get("step", 0)), float(record.get("time", time.time()))
            for s in self.states:
                self._call(s, "record", step, wall, values)

    def _call(self, s: _State, method: str, *args: Any) -> None:
        if not s.on:
            return
        try:
            getattr(s.tracker, method)(*args)
        except Exception as exc:  # noqa: BLE001 - a tracker never stops training
            s.failed += 1
            s.streak += 1
            if s.error is None:
                s.error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, ImportError):
                    s.error += f" ({INSTALL_HINT})"
                log.warning("tracking: %s failed to %s: %s; training goes on (failures "
                            "are counted)", s.tracker.name, method, s.error)  # fmt: skip
            if self.on_failure is not None:
                self.on_failure(s.tracker.name)
            if method == "open" or s.streak >= MAX_FAILURES:
                s.on = False
                log.warning("tracking: %s turned off after %d failure(s)", s.tracker.name,
                            s.failed)  # fmt: skip
        else:
            s.written += method != "open"
            s.streak = 0
