"""A one-table run's preprocessing, saved with the run: what turns a raw feature row into the
experts' inputs (columns, views, standardisation) and a logit into a label.

The reducer writes ``RUN_DIR/preprocess.json`` when a run starts (``write_preprocess``);
``traci predict``, ``traci export`` and the experts' served prediction read it back
(``load_preprocess``), so they work once the data is gone. Its statistics are derived from
the config and the data source with the same split and standardisation as the dataset
training loads (``split``), so a predicted row reaches the networks as the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from traci_ml.core.config import Config
from traci_ml.core.data.dataset import view_specs
from traci_ml.core.data.split import (
    feature_stats,
    fit_positions,
    split_index,
    standardise,
    target_stats,
)
from traci_ml.core.data.tables import RawTable, raw_table, table_task
from traci_ml.core.errors import CheckpointError, DataError
from traci_ml.core.files import write_json_atomic
from traci_ml.core.rundir import RunDir

log = logging.getLogger(__name__)
PREPROCESS_FORMAT = 1


@dataclass(frozen=True)
class Preprocess:
    """What turns a raw feature row into the experts' inputs, and a logit into a label."""

    task: str  # "classification" | "regression"
    columns: tuple[str, ...]  # feature columns in training order (the exported model's input)
    views: tuple[tuple[str, tuple[str, ...]], ...]  # (name, columns) per expert
    classes: tuple[str, ...]  # class names in id order (classification)
    mean: np.ndarray  # (F,) float32: x_std = (x - mean) / std, from the training rows
    std: np.ndarray  # (F,) float32
    y_mean: float = 0.0  # regression: the reducer predicts (y - y_mean) / y_std
    y_std: float = 1.0
    label: str = "label"  # the label column's name (csv: data.label)
    data_sha256: str | None = None  # csv: digest of the training file

    @property
    def out_dim(self) -> int:
        return len(self.classes) if self.task == "classification" else 1

    def view_index(self, i: int) -> list[int]:
        at = {c: j for j, c in enumerate(self.columns)}
        return [at[c] for c in self.views[i][1]]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PREPROCESS_FORMAT,
            "task": self.task,
            "columns": list(self.columns),
            "views": [{"name": n, "columns": list(c)} for n, c in self.views],
            "classes": list(self.classes),
            "mean": [float(v) for v in self.mean],  # float32 -> double is exact
            "std": [float(v) for v in self.std],
            "y_mean": self.y_mean,
            "y_std": self.y_std,
            "label": self.label,
            "data_sha256": self.data_sha256,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: Path) -> Preprocess:
        if not isinstance(raw, dict) or raw.get("format") != PREPROCESS_FORMAT:
            raise CheckpointError(f"{where} has an unknown format")
        try:
            prep = cls(
                task=raw["task"],
                columns=tuple(raw["columns"]),
                views=tuple((v["name"], tuple(v["columns"])) for v in raw["views"]),
                classes=tuple(raw["classes"]),
                mean=np.asarray(raw["mean"], dtype=np.float32),
                std=np.asarray(raw["std"], dtype=np.float32),
                y_mean=float(raw["y_mean"]),
                y_std=float(raw["y_std"]),
                label=raw["label"],
                data_sha256=raw.get("data_sha256"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where} is malformed: {exc!r}") from None
        if prep.mean.shape != (len(prep.columns),) or prep.std.shape != prep.mean.shape:
            raise CheckpointError(f"{where}: mean/std do not match its {len(prep.columns)} columns")
        return prep


def derive_preprocess(config: Config) -> Preprocess:
    """The statistics training used, recomputed from the config and the data source: from
    the rows training fits on, as ``dataset`` computes them (``split.fit_positions``)."""
    x, y, columns, classes = raw_table(config)
    train, _ = split_index(len(x), config)
    fit = train[fit_positions(len(train), config)]
    mean, std = feature_stats(x[fit])
    task = table_task(config.data)
    y_mean, y_std = target_stats(y[fit]) if task == "regression" else (0.0, 1.0)
    digest = None
    if config.data.source == "csv":
        digest = _sha256(Path(config.data.path or ""))
    return Preprocess(
        task=task,
        columns=tuple(columns),
        views=tuple((v.name, tuple(v.columns)) for v in view_specs(config.data)),
        classes=tuple(classes) if task == "classification" else (),
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        y_mean=y_mean,
        y_std=y_std,
        label=config.data.label or "label",
        data_sha256=digest,
    )


def write_preprocess(config: Config, run_dir: str | Path | RunDir) -> None:
    """RUN_DIR/preprocess.json: what ``traci predict`` needs even once the data is gone."""
    write_json_atomic(_run_dir(run_dir).preprocess, derive_preprocess(config).to_json())


def load_preprocess(run_dir: str | Path | RunDir, config: Config) -> Preprocess:
    """The run's saved preprocessing; derived from the data source if the run has none."""
    run = _run_dir(run_dir)
    path = run.preprocess
    if path.exists():
        try:
            return Preprocess.from_json(json.loads(path.read_text()), path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None
    log.warning("%s has no %s: deriving it from the data source", run.path, RunDir.PREPROCESS)
    return derive_preprocess(config)  # a csv that cannot be read raises a DataError naming it


def checked_table(config: Config, prep: Preprocess, what: str) -> RawTable:
    """``raw_table``, refused when a csv file is gone or changed since training."""
    if config.data.source == "csv" and prep.data_sha256 is not None:
        path = Path(config.data.path or "")
        try:
            digest = _sha256(path)
        except OSError as exc:
            raise DataError(f"{what} needs the training file {path}: {exc.strerror}") from None
        if digest != prep.data_sha256:
            raise DataError(f"data file {path} changed since training: cannot rebuild its split")
    return raw_table(config)


def split_rows(config: Config, prep: Preprocess, split: str) -> tuple[np.ndarray, list[str]]:
    """Raw feature rows (n, F) of the run's own train or test split, and their labels."""
    x, y, _, _ = checked_table(config, prep, "--split")
    train, test = split_index(len(x), config)
    rows = train if split == "train" else test
    labels = [fmt_cell(v) for v in label_values(y[rows], prep)]
    return x[rows], labels


def label_values(y: np.ndarray, prep: Preprocess) -> list[Any]:
    """The labels of raw ``y`` as the reducer writes them (eval_predictions.csv): class names,
    or regression targets standardised in float32 as training did, then de-standardised."""
    if prep.task == "classification":
        return [prep.classes[int(k)] for k in y]
    ys = standardise(y, prep.y_mean, prep.y_std)
    return [float(t) * prep.y_std + prep.y_mean for t in ys]


def fmt_cell(v: Any) -> str:
    """A CSV cell as eval_predictions.csv writes it: floats with 9 significant digits (a
    float32 round-trips), None (no label) empty."""
    if v is None:
        return ""
    return f"{float(v):.9g}" if isinstance(v, (float, np.floating)) else str(v)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_dir(run_dir: str | Path | RunDir) -> RunDir:
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
