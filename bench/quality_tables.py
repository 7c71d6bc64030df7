"""The tables, configs, split and baselines of the quality section (``bench.quality``).

Every table is offline: scikit-learn's bundled copies (``sklearn/datasets/data``), one table
scikit-learn generates from a seed, and the repository's own ``examples/data`` file. Each is
written as a CSV (features, then ``target``) and trained in one-table mode exactly as the
default config splits digits: ``min(4, features)`` experts, each a contiguous group of
columns (``even_views``). Every other key keeps its default.

The comparison is fair by construction: the baselines read the table through TRACI's own
reader (``raw_table``: the same float32 cells) and fit on TRACI's train split
(``split_index``: the seed's permutation), and the bench checks that the rows the reducer
scored in ``eval_predictions.csv`` are exactly that split's test rows (``check_split``).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LABEL = "target"
N_VIEWS = 4  # the default config's digits run: 4 experts (quadrants)


@dataclass(frozen=True)
class Table:
    name: str
    task: str  # "classification" | "regression"
    source: str  # where the rows come from, for the report
    columns: tuple[str, ...]
    x: np.ndarray  # (n, F)
    y: np.ndarray  # (n,): class names (str) or float targets


def _clean(name: str) -> str:
    """A column name as a plain identifier: ``sepal length (cm)`` -> ``sepal_length_cm``."""
    return re.sub(r"[^0-9a-zA-Z]+", "_", name).strip("_").lower() or "x"


def _bunch(loader: Callable[..., Any], name: str, task: str, **kw: Any) -> Table:
    b = loader(**kw)
    y = b.target.astype(str) if task == "classification" else b.target.astype(np.float64)
    source = f"sklearn.datasets.{loader.__name__} (bundled)"
    return Table(name, task, source, tuple(_clean(c) for c in b.feature_names), b.data, y)


def _friedman1() -> Table:
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=2000, n_features=10, noise=1.0, random_state=0)
    return Table("friedman1", "regression", "sklearn make_friedman1(2000, 10, noise=1, seed 0)",
                 tuple(f"x{j}" for j in range(10)), x, y)  # fmt: skip


def _breast_cancer_repo() -> Table:
    path = ROOT / "examples" / "data" / "breast_cancer.csv"
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    feats = [c for c in header if c not in ("id", "diagnosis")]
    at = [header.index(c) for c in feats]
    x = np.array([[float(r[i]) for i in at] for r in body])
    y = np.array([r[header.index("diagnosis")] for r in body])
    return Table("breast_cancer", "classification", "examples/data/breast_cancer.csv (repo)",
                 tuple(feats), x, y)  # fmt: skip


def load_table(name: str) -> Table:
    """One of ``TABLES`` (nothing is downloaded)."""
    from sklearn import datasets as ds

    makers: dict[str, Callable[[], Table]] = {
        "digits": lambda: _bunch(ds.load_digits, "digits", "classification"),
        "breast_cancer": _breast_cancer_repo,
        "wine": lambda: _bunch(ds.load_wine, "wine", "classification"),
        "iris": lambda: _bunch(ds.load_iris, "iris", "classification"),
        "diabetes": lambda: _bunch(ds.load_diabetes, "diabetes", "regression", scaled=False),
        "friedman1": _friedman1,
    }
    if name not in makers:
        raise ValueError(f"unknown quality table {name!r}; choose from {sorted(makers)}")
    return makers[name]()


TABLES = ("digits", "breast_cancer", "wine", "iris", "diabetes", "friedman1")


def write_csv(table: Table, path: Path) -> Path:
    """The table as a CSV: its feature columns, then ``target``; floats written exactly."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow([*table.columns, LABEL])
        for xs, y in zip(table.x.tolist(), table.y.tolist(), strict=True):
            out.writerow([*(repr(float(v)) for v in xs), y if isinstance(y, str) else repr(y)])
    return path


def even_views(columns: tuple[str, ...], n: int = N_VIEWS) -> list[dict[str, Any]]:
    """``min(n, len(columns))`` contiguous column groups, one expert each, sizes within one."""
    groups = np.array_split(np.arange(len(columns)), min(n, len(columns)))
    return [{"name": f"part_{i}", "columns": [columns[j] for j in g]}
            for i, g in enumerate(groups)]  # fmt: skip


def table_config(table: Table, csv_path: Path | None, run_dir: Path) -> dict[str, Any]:
    """The default config, one-table mode on ``csv_path``: only the data section, the run
    directory, and ports (free ones, metrics off, no serving door) are set. ``digits`` keeps
    the default data section too (``data.source: digits``, quadrants): ``make run``'s run."""
    from bench.e2e import free_ports

    expert_port, reducer_port = free_ports(2)
    cfg: dict[str, Any] = {
        "run_id": f"quality-{table.name}",
        "run_dir": str(run_dir),
        "network": {"expert_port": expert_port, "reducer_port": reducer_port, "serve_port": 0},
        "metrics": {"broker_port": 0, "reducer_port": 0, "expert_base_port": 0},
    }  # fmt: skip
    if csv_path is not None:
        cfg["data"] = {"source": "csv", "path": str(csv_path), "label": LABEL,
                       "task": table.task, "views": even_views(table.columns)}  # fmt: skip
    return cfg


def split_data(cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """The table as TRACI reads it (``raw_table``) and its train/test rows as TRACI splits it
    (``split_index``): x_train, y_train, x_test, y_test, train, test (row numbers)."""
    from traci_ml.core.config import validate
    from traci_ml.core.data.split import split_index
    from traci_ml.core.data.tables import raw_table

    config = validate(cfg)
    x, y, _, _ = raw_table(config)
    train, test = split_index(len(x), config)
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test],
            "train": train, "test": test}  # fmt: skip


def check_split(test: np.ndarray, scored: list[dict[str, str]]) -> None:
    """Raise unless ``eval_predictions.csv``'s rows (``row``: position in the test split,
    ``id``: row number in the table) are exactly the test rows ``split_index`` gave."""
    got = {int(r["row"]): int(r["id"]) for r in scored}
    want = {i: int(t) for i, t in enumerate(test)}
    if got != want:
        wrong = sum(got.get(i) != t for i, t in want.items()) + len(set(got) - set(want))
        raise RuntimeError(
            f"quality bench: the run scored other rows than the test split "
            f"({wrong} of {len(want)} differ): the comparison would be unfair"
        )


def score(task: str, y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """accuracy (classification), or r2 and rmse (regression)."""
    if task == "classification":
        return {"accuracy": float(np.mean(y_true == y_pred))}
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    mse = float(np.mean((y_true - y_pred) ** 2))
    return {"r2": 1.0 - mse / float(np.var(y_true)), "rmse": mse**0.5}


def traci_score(task: str, scored: list[dict[str, str]], classes: list[str] | None = None
                ) -> dict[str, float]:  # fmt: skip
    """TRACI's test metric from ``eval_predictions.csv`` (labels and predictions in the
    label's units), computed by ``score`` as the baselines' are."""
    if task == "classification":
        truth = np.array([r["label"] for r in scored])
        return score(task, truth, np.array([r["prediction"] for r in scored]))
    return score(task, np.array([float(r["label"]) for r in scored]),
                 np.array([float(r["prediction"]) for r in scored]))  # fmt: skip


def baselines(task: str, data: dict[str, np.ndarray], seed: int = 0) -> dict[str, dict[str, Any]]:
    """One-process baselines on all features, fit on the train split, scored on the test
    split: ``linear`` (standardised LogisticRegression / Ridge, scikit-learn defaults) and
    ``boosting`` (HistGradientBoosting, defaults). Each with its fit time."""
    import time

    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if task == "classification":
        models = {"linear": make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)),
                  "boosting": HistGradientBoostingClassifier(random_state=seed)}  # fmt: skip
    else:
        models = {"linear": make_pipeline(StandardScaler(), Ridge()),
                  "boosting": HistGradientBoostingRegressor(random_state=seed)}  # fmt: skip
    out: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        t = time.perf_counter()
        model.fit(data["x_train"], data["y_train"])
        pred = model.predict(data["x_test"])
        out[name] = {**score(task, data["y_test"], pred), "fit_s": time.perf_counter() - t,
                     "model": _describe(model)}  # fmt: skip
    return out


def _describe(model: Any) -> str:
    steps = getattr(model, "steps", None)
    return " + ".join(type(s).__name__ for _, s in steps) if steps else type(model).__name__
