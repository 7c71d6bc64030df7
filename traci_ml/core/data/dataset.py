"""The dataset every process loads, and the views: each keeps only what it needs.

An expert reads only its view's feature columns; the reducer reads only the labels. The split
(train/test by ``seed``) and standardisation (on the train part less the validation rows,
``split.fit_positions``) are pure functions of the config (``split``), so every process
derives identical arrays without shipping data over the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from traci_ml.core.config import Config, DataConfig, ViewConfig
from traci_ml.core.data.split import (
    feature_stats,
    fit_positions,
    split_index,
    standardise,
    target_stats,
)
from traci_ml.core.data.tables import class_ids, raw_table, table_task
from traci_ml.core.errors import DataError


@dataclass(frozen=True)
class Dataset:
    task: str  # "classification" | "regression"
    columns: tuple[str, ...]  # feature column names
    views: tuple[ViewConfig, ...]  # one per expert
    x_train: np.ndarray  # (n_train, F) float32, standardised
    y_train: np.ndarray  # (n_train,) int64 class ids, or float32 standardised targets
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int  # 0 for regression
    classes: tuple[str, ...] = ()  # class names, in id order
    y_mean: float = 0.0  # regression: targets are (y - y_mean) / y_std
    y_std: float = 1.0
    # each split row's id: the table's row number (one table) or the label file's id (parties)
    ids_train: np.ndarray | None = None
    ids_test: np.ndarray | None = None

    @property
    def n_experts(self) -> int:
        return len(self.views)

    @property
    def out_dim(self) -> int:
        return self.n_classes if self.task == "classification" else 1

    def view_columns(self, expert_id: int) -> np.ndarray:
        """Column indices of expert ``expert_id``'s view."""
        index = {name: i for i, name in enumerate(self.columns)}
        return np.array([index[c] for c in self.views[expert_id].columns], dtype=np.int64)

    def view(self, expert_id: int, split: str) -> np.ndarray:
        """(n, F_i) float32 features of one expert's view, C-contiguous."""
        x = self.x_train if split == "train" else self.x_test
        return np.ascontiguousarray(x[:, self.view_columns(expert_id)])


def view_specs(cfg: DataConfig) -> tuple[ViewConfig, ...]:
    """Every expert's view, from the config alone (no data is read): one per expert."""
    if not isinstance(cfg.views, str):
        return tuple(cfg.views)
    if cfg.views == "even":
        groups = np.array_split(np.arange(cfg.synthetic.features), cfg.synthetic.experts)
        return tuple(
            ViewConfig(name=f"part_{i}", columns=[f"x{j}" for j in group])
            for i, group in enumerate(groups)
        )
    return digits_views(cfg.views)


def expert_count(config: Config) -> int:
    """The number of experts: one per data view (no data is read)."""
    return len(view_specs(config.data))


def load_dataset(config: Config) -> Dataset:
    """The whole table, every view (the one-table sources); for ``parties`` the labels only
    (``load_labels``): no process but an expert reads an expert's file."""
    cfg = config.data
    if cfg.source == "parties":
        return load_labels(config)
    views = view_specs(cfg)
    task = table_task(cfg)
    x, y, columns, classes = raw_table(config)
    source = cfg.path or cfg.source
    _check_views(views, columns, source=source)
    ds = _split(x, y, columns, views, classes, task, config)
    if ds.task == "classification":
        _check_classes(ds, label=cfg.label or "label", source=source)
    return ds


def digits_views(preset: str) -> tuple[ViewConfig, ...]:
    """Views over the 8x8 digits image: four 4x4 quadrants, or top/bottom halves."""
    if preset == "quadrants":
        corners = [
            ("top_left", 0, 0),
            ("top_right", 0, 4),
            ("bottom_left", 4, 0),
            ("bottom_right", 4, 4),
        ]
        return tuple(
            ViewConfig(
                name=name,
                columns=[f"pixel_{r}_{c}" for r in range(r0, r0 + 4) for c in range(c0, c0 + 4)],
            )
            for name, r0, c0 in corners
        )
    if preset == "halves":
        return tuple(
            ViewConfig(name=name, columns=[f"pixel_{r}_{c}" for r in rows for c in range(8)])
            for name, rows in (("top", range(4)), ("bottom", range(4, 8)))
        )
    raise DataError(f"unknown digits view preset {preset!r}")


def _check_classes(ds: Dataset, *, label: str, source: str) -> None:
    """Classification needs two classes to tell apart in the rows it trains on."""
    present = np.unique(ds.y_train)
    if len(present) >= 2:
        return
    found = ", ".join(repr(ds.classes[int(k)]) for k in present)
    everywhere = (
        f"; the whole table has {len(ds.classes)}" if len(ds.classes) != len(present) else ""
    )
    raise DataError(
        f"{source}: label column {label!r} has {len(present)} class ({found}) among the "
        f"{len(ds.y_train)} training rows{everywhere}: classification needs at least two "
        "distinct classes"
    )


def _check_views(views: tuple[ViewConfig, ...], columns: tuple[str, ...], *, source: str) -> None:
    if not views:
        raise DataError("data.views is empty: at least one expert is needed")
    names = [v.name for v in views]
    if len(set(names)) != len(names):
        raise DataError(f"data.views has duplicate names {names}")
    for v in views:
        unknown = [c for c in v.columns if c not in columns]
        if unknown:
            raise DataError(f"view {v.name!r} names unknown column(s) {unknown} in {source}")


def _split(
    x: np.ndarray,
    y: np.ndarray,
    columns: tuple[str, ...],
    views: tuple[ViewConfig, ...],
    classes: tuple[str, ...],
    task: str,
    config: Config,
) -> Dataset:
    train, test = split_index(len(x), config)
    if len(train) < 2:
        raise DataError(
            f"only {len(train)} training rows after a {config.data.test_fraction} test split"
        )
    fit = train[fit_positions(len(train), config)]  # the statistics' rows: no validation row
    xs = standardise(x, *feature_stats(x[fit]))
    y_mean, y_std = 0.0, 1.0
    if task == "regression":
        y_mean, y_std = target_stats(y[fit])
        y = standardise(y, y_mean, y_std)
    return Dataset(
        ids_train=train.astype(np.int64),
        ids_test=test.astype(np.int64),
        task=task,
        columns=columns,
        views=views,
        x_train=xs[train],
        y_train=y[train],
        x_test=xs[test],
        y_test=y[test],
        n_classes=len(classes) if task == "classification" else 0,
        classes=classes,
        y_mean=y_mean,
        y_std=y_std,
    )


# ---- parties (docs/parties.md): each process reads only its own table ----------------------


def load_labels(config: Config) -> Dataset:
    """The label holder's rows (``data.labels``) in global order: train rows, then test rows,
    split by the seed over the sorted ids. Features stay with the experts (``x_*`` are (n, 0))."""
    from traci_ml.core.align import global_rows
    from traci_ml.core.data.parties import read_labels

    cfg = config.data
    spec = cfg.labels
    assert spec is not None  # the config's validator requires it for parties
    table = read_labels(spec.path, id_column=spec.id or cfg.id, label_column=spec.label,
                        fmt=spec.format)  # fmt: skip
    rows = global_rows(table.ids, config.seed, cfg.test_fraction)
    raw = table.labels[rows.source]
    views = view_specs(cfg)
    _check_views(views, tuple(c for v in views for c in v.columns), source=spec.path)
    if cfg.task == "classification":  # class ids by the label's text, naturally sorted
        y, classes = class_ids(raw)
        y_mean, y_std = 0.0, 1.0
    else:
        if raw.dtype.kind not in "iuf":
            raise DataError(f"{spec.path}: label column {spec.label!r} holds {raw.dtype.kind!r} "
                            "values: regression needs numbers")  # fmt: skip
        yf = raw.astype(np.float64)
        y_mean, y_std = target_stats(yf[fit_positions(rows.n_train, config)])
        y = standardise(yf, y_mean, y_std)
        classes = ()
    n = rows.n_train
    ds = Dataset(
        task=cfg.task,
        columns=(),
        views=views,
        x_train=np.zeros((n, 0), np.float32),
        y_train=y[:n],
        x_test=np.zeros((rows.n_test, 0), np.float32),
        y_test=y[n:],
        n_classes=len(classes),
        classes=classes,
        y_mean=y_mean,
        y_std=y_std,
        ids_train=rows.train_ids,
        ids_test=rows.test_ids,
    )
    if ds.task == "classification":
        _check_classes(ds, label=spec.label, source=spec.path)
    return ds
