"""The one-table sources (``data.source``): scikit-learn's digits, a synthetic table, a CSV file.

``raw_table(config)`` is the whole table, unstandardised: ``(x (n, F) float32, y, columns,
classes)``, the same in every process. The CSV file is read with the one table reader
(``reader.read_csv_table``). A ``parties`` run has no one table: each party reads its own
file (``parties``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from traci_ml.core.config import Config, DataConfig, ViewConfig
from traci_ml.core.data.reader import AUDIT_EVENT, read_csv_table
from traci_ml.core.errors import DataError

RawTable = tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]
PARTIES_NO_TABLE = (
    "a parties run (data.source: parties) has no one table: every expert standardises its own "
    "file; predict it by id (traci predict --ids / --split, predict_ids)"
)


def raw_table(config: Config) -> RawTable:
    """The unstandardised table training reads: (x (n, F) float32, y, columns, classes)."""
    cfg = config.data
    if cfg.source == "parties":
        raise DataError(PARTIES_NO_TABLE)
    if cfg.source == "digits":
        return digits()
    if cfg.source == "synthetic":
        return synthetic(cfg, config.seed)
    return read_csv(cfg)


def table_task(cfg: DataConfig) -> str:
    """The one table's task: digits and synthetic tables are classification."""
    return cfg.task if cfg.source == "csv" else "classification"


def digits() -> RawTable:
    """scikit-learn's copy of the UCI digits (bundled with it: no download), read from its
    file as ``sklearn.datasets.load_digits`` reads it, without importing scikit-learn: that
    import (SciPy's statistics with it) took longer than every other step of a digits
    service's start but torch's (bench/startup.py)."""
    import importlib.util

    sys.audit(AUDIT_EVENT, "digits")
    spec = importlib.util.find_spec("sklearn")  # finds the package, does not run it
    where = spec.submodule_search_locations if spec is not None else None
    path = Path(where[0]) / "datasets" / "data" / "digits.csv.gz" if where else None
    if path is not None and path.is_file():
        import gzip

        with gzip.open(path, mode="rt", encoding="utf-8") as fh:
            data = np.loadtxt(fh, delimiter=",")
        x, y = data[:, :-1], data[:, -1].astype(int)
    else:  # laid out otherwise: scikit-learn's own reader
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.data, bunch.target
    columns = tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8))
    classes = tuple(str(i) for i in range(10))
    return x.astype(np.float32), y.astype(np.int64), columns, classes


def synthetic(cfg: DataConfig, seed: int) -> RawTable:
    spec = cfg.synthetic
    rng = np.random.default_rng([seed, 0x5A7])
    x = rng.standard_normal((spec.rows, spec.features), dtype=np.float32)
    hidden = np.tanh(x @ rng.standard_normal((spec.features, 64)).astype(np.float32) / 8)
    logits = hidden @ rng.standard_normal((64, spec.classes)).astype(np.float32)
    y = logits.argmax(axis=1).astype(np.int64)
    columns = tuple(f"x{j}" for j in range(spec.features))
    return x, y, columns, tuple(str(c) for c in range(spec.classes))


def read_csv(cfg: DataConfig) -> RawTable:
    """The views' columns (in the file's order) and the label column of ``data.path``."""
    path = Path(cfg.path or "")
    views: list[ViewConfig] = list(cfg.views)  # type: ignore[arg-type]  # csv: always a list
    for v in views:  # before any cell is read: a label among the features is the config's fault
        if cfg.label in v.columns:
            raise DataError(
                f"data.views: view {v.name!r} reads the label column {cfg.label!r} as a "
                f"feature: the model would be handed the answer (remove {cfg.label!r} from it)"
            )
    sys.audit(AUDIT_EVENT, str(path))  # who reads what (tests listen)
    table = read_csv_table(path, name=f"data file {path}")
    if table.rows < 2:
        raise DataError(f"data file {path} needs a header and at least two rows")
    table.check_unique()  # every name, read or not: which one would a view read?
    if cfg.label not in table.header:
        raise DataError(f"data file {path} has no label column {cfg.label!r}")
    wanted = {c for v in views for c in v.columns}
    table.require(sorted(wanted))
    used = sorted(wanted, key=table.header.index)
    x = table.numbers(used, about=lambda column: _readers(views, column))
    labels = [v.strip() for v in table.cells(cfg.label)]
    if cfg.task == "classification":
        y, classes = class_ids(np.array(labels, dtype=object))
        return x, y, tuple(used), classes
    try:
        y = np.array([float(v) for v in labels], dtype=np.float32)
    except ValueError:
        raise DataError(f"data file {path}: label column {cfg.label!r} is not numeric") from None
    return x, y, tuple(used), ()


def class_ids(labels: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """(class id per label (n,) int64, class names): classes by the labels' text, naturally
    sorted (``natural_order``); each distinct value is named once, not once per row."""
    values, inverse = np.unique(labels, return_inverse=True)
    names = [str(v) for v in values.tolist()]
    classes = tuple(sorted(set(names), key=natural_order))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[n] for n in names], dtype=np.int64)[inverse.reshape(-1)], classes


def natural_order(label: str) -> tuple[int, float, str]:
    """Sort key of class names: numbers by value ("2" < "10"), then the rest as text."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _readers(views: list[ViewConfig], column: str) -> str:
    """``view 'a'`` or ``views 'a', 'b'``: who reads ``column``."""
    names = [repr(v.name) for v in views if column in v.columns]
    return ("view " if len(names) == 1 else "views ") + ", ".join(names)
