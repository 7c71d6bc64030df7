"""Offline prediction: a trained run in one process, with no broker and no sockets.

``load_model(run_dir)`` assembles every expert's **target** network (the smoothed net whose
embeddings the cluster sent) and the reducer from the run's checkpoints into one
``nn.Module`` taking the experts' preprocessed views. ``load_predictor(run_dir)`` wraps it with
the run's preprocessing (column -> view assignment, standardisation) so that it takes raw
feature rows in the training column order; ``predict_frame`` and ``traci predict`` use it, and
``traci export`` writes it to one file (``traci_ml/export.py``). See docs/predict.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from traci_ml import checkpoint, data
from traci_ml.config import Config, validate
from traci_ml.data import view_specs
from traci_ml.errors import CheckpointError, ConfigError, DataError
from traci_ml.services.reducer.model import Reducer
from traci_ml.services.reducer.records import write_json_atomic
from traci_ml.tensors import TORCH_DTYPES

log = logging.getLogger(__name__)
PREPROCESS_FILE = "preprocess.json"  # written by the reducer when a run starts
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


# -- preprocessing, derived exactly as traci_ml.data does it ------------------------------


def raw_table(config: Config) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """The unstandardised table training reads: (x (n, F) float32, y, columns, classes)."""
    cfg = config.data
    if cfg.source == "digits":
        return data._digits()
    if cfg.source == "synthetic":
        return data._synthetic(cfg, config.seed)
    return data._read_csv(cfg)


def split_index(n: int, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of the table, as ``traci_ml.data._split`` draws them."""
    order = np.random.default_rng([config.seed, 0xDA7A]).permutation(n)
    n_test = max(1, int(round(n * config.data.test_fraction)))
    return order[n_test:], order[:n_test]


def derive_preprocess(config: Config) -> Preprocess:
    """The statistics training used, recomputed from the config and the data source."""
    x, y, columns, classes = raw_table(config)
    train, _ = split_index(len(x), config)
    mean, std = x[train].mean(axis=0), x[train].std(axis=0)
    std[std < 1e-8] = 1.0  # as data._split: constant columns stay at zero
    task = "classification" if config.data.source != "csv" else config.data.task
    y_mean, y_std = 0.0, 1.0
    if task == "regression":
        y_mean, y_std = float(y[train].mean()), float(y[train].std() or 1.0)
    digest = None
    if config.data.source == "csv":
        digest = hashlib.sha256(Path(config.data.path or "").read_bytes()).hexdigest()
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


def write_preprocess(config: Config, run_path: Path) -> None:
    """RUN_DIR/preprocess.json: what ``traci predict`` needs even once the data is gone."""
    write_json_atomic(run_path / PREPROCESS_FILE, derive_preprocess(config).to_json())


def split_rows(config: Config, prep: Preprocess, split: str) -> tuple[np.ndarray, list[str]]:
    """Raw feature rows (n, F) of the run's own train or test split, and their labels."""
    if config.data.source == "csv" and prep.data_sha256 is not None:
        path = Path(config.data.path or "")
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            raise DataError(f"--split needs the training file {path}: {exc.strerror}") from None
        if digest != prep.data_sha256:
            raise DataError(f"data file {path} changed since training: cannot rebuild its split")
    x, y, _, classes = raw_table(config)
    train, test = split_index(len(x), config)
    rows = train if split == "train" else test
    labels = [classes[v] for v in y[rows]] if classes else [fmt_cell(float(v)) for v in y[rows]]
    return x[rows], labels


# -- the model ----------------------------------------------------------------------------


class TraciModel(nn.Module):
    """``(view_0, ..., view_{N-1}) -> logits``: every expert's target net and the reducer, as
    the cluster evaluates with all experts present. Views are (B, F_i) standardised features."""

    def __init__(self, experts: list[nn.Module], reducer: Reducer, wire_dtype: str) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.reducer = reducer
        # Embeddings cross the wire in expert.dtype: round them the same way.
        self.wire = None if wire_dtype == "float32" else TORCH_DTYPES[wire_dtype]

    def forward(self, *views: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack(
            [net(v) for net, v in zip(self.experts, views, strict=True)], dim=1
        )  # (B,N,d)
        if self.wire is not None:
            tokens = tokens.to(self.wire).float()
        absent = torch.zeros_like(tokens[:, :, 0], dtype=torch.bool)  # (B, N): all present
        logits, _ = self.reducer(tokens, absent)
        return logits


class Predictor(nn.Module):
    """``features (B, F)`` raw, columns in ``preprocess.columns`` order -> ``(logits,
    probabilities (B, C))`` for classification, ``(logits (B, 1), prediction (B,))`` in the
    label's units for regression. Standardisation and the view split are built in."""

    def __init__(self, model: TraciModel, preprocess: Preprocess, config: Config) -> None:
        super().__init__()
        self.model, self.preprocess, self.config = model, preprocess, config
        self.classification = preprocess.task == "classification"
        self.y_mean, self.y_std = preprocess.y_mean, preprocess.y_std
        self.register_buffer("mean", torch.from_numpy(preprocess.mean.copy()))
        self.register_buffer("std", torch.from_numpy(preprocess.std.copy()))
        for i in range(len(preprocess.views)):
            self.register_buffer(f"view_{i}", torch.tensor(preprocess.view_index(i)))
        self.n_views = len(preprocess.views)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (features - self.mean) / self.std
        views = [x.index_select(1, getattr(self, f"view_{i}")) for i in range(self.n_views)]
        logits = self.model(*views)
        if self.classification:
            return logits, logits.softmax(dim=-1)
        return logits, logits[:, 0] * self.y_std + self.y_mean


def read_config(run_path: Path) -> Config:
    """The config the run trained with: config.json (the reducer's), else launch.yaml."""
    if not run_path.is_dir():
        raise CheckpointError(f"run directory {run_path} does not exist")
    for name in ("config.json", "launch.yaml"):
        path = run_path / name
        if path.exists():
            try:
                raw = yaml.safe_load(path.read_text())  # JSON is YAML
            except (OSError, yaml.YAMLError) as exc:
                raise CheckpointError(f"cannot read {path}: {exc}") from None
            try:
                return validate(raw if isinstance(raw, dict) else {})
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    raise CheckpointError(f"{run_path} holds no config.json or launch.yaml: not a run directory")


def load_preprocess(run_path: Path, config: Config) -> Preprocess:
    path = run_path / PREPROCESS_FILE
    if path.exists():
        try:
            return Preprocess.from_json(json.loads(path.read_text()), path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None
    log.warning("%s has no %s: deriving it from the data source", run_path, PREPROCESS_FILE)
    return derive_preprocess(config)  # a csv that cannot be read raises a DataError naming it


def load_predictor(run_dir: str | Path, *, device: str = "cpu") -> Predictor:
    """The run's full model taking raw feature rows; see ``Predictor``."""
    run_path = Path(run_dir)
    config = read_config(run_path)
    prep = load_preprocess(run_path, config)
    return Predictor(_assemble(run_path, config, prep), prep, config).to(device).eval()


def load_model(run_dir: str | Path, *, device: str = "cpu") -> TraciModel:
    """``(views...) -> logits`` from the run's checkpoints; see ``TraciModel``."""
    return load_predictor(run_dir, device=device).model


def _assemble(run_path: Path, config: Config, prep: Preprocess) -> TraciModel:
    # Here, not at the top: the reducer imports this module (write_preprocess), and services
    # do not import each other.
    from traci_ml.services.expert.model import build_expert_net

    ckpt = run_path / "checkpoints"
    names = [f"expert-{i}.pt" for i in range(len(prep.views))] + ["reducer.pt"]
    missing = [n for n in names if not (ckpt / n).exists()]
    if len(missing) == len(names):
        raise CheckpointError(f"{run_path} has no checkpoints: train it first (traci up)")
    if missing:
        raise CheckpointError(f"{ckpt} lacks {', '.join(missing)}")
    experts, seqs = [], []
    with torch.random.fork_rng(devices=[]):  # building nets draws initial weights
        for i, (_, cols) in enumerate(prep.views):
            path = ckpt / f"expert-{i}.pt"
            state = checkpoint.load(path, run_id=config.run_id, expert_id=i)
            net = build_expert_net(
                config.expert_model(i),
                in_dim=len(cols),
                out_dim=config.embed_dim,
                key=config.expert_model_key(i),
            )
            _load_state(net, state, "target", path)
            experts.append(net.eval().requires_grad_(False))
            seqs.append(state.get("seq_next"))
        reducer = Reducer(
            n_experts=len(prep.views), d=config.embed_dim, out_dim=prep.out_dim, cfg=config.reducer
        )
    path = ckpt / "reducer.pt"
    state = checkpoint.load(path, run_id=config.run_id)
    _load_state(reducer, state, "model", path)
    if any(s != state.get("last_seq", -1) + 1 for s in seqs):
        log.warning(
            "checkpoints are from different points of the run (experts at seq %s, reducer "
            "after seq %s): was it interrupted?",
            seqs,
            state.get("last_seq"),
        )
    return TraciModel(experts, reducer.eval().requires_grad_(False), config.expert.dtype)


def _load_state(net: nn.Module, state: dict[str, Any], key: str, path: Path) -> None:
    if key not in state:
        raise CheckpointError(f"checkpoint {path} holds no {key!r} weights")
    try:
        net.load_state_dict(state[key])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[:3]
        raise CheckpointError(
            f"checkpoint {path} does not fit the run's config: {' '.join(first)}"
        ) from None


# -- prediction -----------------------------------------------------------------------------


def features_from(
    frame: Mapping[str, Any],
    columns: tuple[str, ...],
    *,
    where: str = "input",
    lines: list[int] | None = None,
) -> np.ndarray:
    """(n, F) float32 from a mapping column -> values (a dict of lists, a pandas DataFrame);
    extra columns are ignored. Errors name the missing columns, or the row and column."""
    missing = [c for c in columns if c not in list(frame.keys())]
    if missing:
        raise DataError(f"{where} lacks {len(missing)} feature column(s): {', '.join(missing)}")
    n = len(frame[columns[0]]) if columns else 0
    x = np.empty((n, len(columns)), dtype=np.float32)
    for j, name in enumerate(columns):
        values = list(frame[name])
        if len(values) != n:
            raise DataError(f"{where}: column {name!r} has {len(values)} values, not {n}")
        try:  # fast path; via float64 as float() does, so the rounding matches training's
            x[:, j] = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            pass
        else:
            if np.isfinite(x[:, j]).all():
                continue
        for r, v in enumerate(values):  # find the culprit
            at = f"line {lines[r]} (row {r})" if lines else f"row {r}"
            x[r, j] = _number(v, f"{where} {at}", name)
    return x


def _number(value: Any, where: str, column: str) -> float:
    try:
        v = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: column {column!r} value {value!r} is not a number") from None
    if not math.isfinite(v):
        raise DataError(f"{where}: column {column!r} value {value!r} is not finite")
    return v


@torch.no_grad()
def predict_array(predictor: Predictor, x: np.ndarray, batch: int = 4096) -> dict[str, Any]:
    """Raw rows (n, F) -> output columns: ``prediction`` and ``prob_<class>`` per class."""
    prep, dev = predictor.preprocess, predictor.mean.device
    out = np.zeros((0, prep.out_dim), np.float32)
    parts = [
        predictor(torch.from_numpy(x[i : i + batch]).to(dev))[1] for i in range(0, len(x), batch)
    ]
    out = torch.cat(parts).cpu().numpy() if parts else out
    if prep.task != "classification":
        return {"prediction": out.reshape(-1)}
    cols: dict[str, Any] = {"prediction": [prep.classes[k] for k in out.argmax(axis=1)]}
    cols.update({f"prob_{name}": out[:, k] for k, name in enumerate(prep.classes)})
    return cols


def predict_frame(model: Predictor | str | Path, frame: Mapping[str, Any]) -> dict[str, Any]:
    """Predict every row of ``frame`` (column name -> values; extra columns are ignored)."""
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    return predict_array(predictor, features_from(frame, predictor.preprocess.columns))


def fmt_cell(v: Any) -> str:
    return f"{float(v):.9g}" if isinstance(v, (float, np.floating)) else str(v)


def read_csv(path: Path, columns: tuple[str, ...]) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Feature rows (n, F) from a CSV file with a header, and every column as text."""
    try:
        with Path(path).open(newline="") as fh:
            lines = [(n, row) for n, row in enumerate(csv.reader(fh), start=1) if row]
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV: {exc}") from None
    if not lines:
        raise DataError(f"{path} is empty: it needs a header row with the feature columns")
    header = [h.strip() for h in lines[0][1]]
    for n, row in lines[1:]:
        if len(row) != len(header):
            raise DataError(f"{path} line {n}: {len(row)} fields, the header has {len(header)}")
    frame = {h: [row[k] for _, row in lines[1:]] for k, h in enumerate(header)}
    x = features_from(frame, columns, where=str(path), lines=[n for n, _ in lines[1:]])
    return x, frame
