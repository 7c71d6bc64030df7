"""Datasets and views: every process loads the same table and keeps only what it needs.

An expert reads only its view's feature columns; the reducer reads only the labels. The split
(train/test by ``seed``) and standardisation (on the train part) are pure functions of the
config, so every process derives identical arrays without shipping data over the wire.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from traci_ml.core.align import RowMap
from traci_ml.core.config import Config, DataConfig, ViewConfig
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
    task = cfg.task
    if cfg.source == "digits":
        x, y, columns, classes = _digits()
        task = "classification"
    elif cfg.source == "synthetic":
        x, y, columns, classes = _synthetic(cfg, config.seed)
        task = "classification"
    else:
        x, y, columns, classes = _read_csv(cfg)
    source = cfg.path or cfg.source
    _check_views(views, columns, source=source)
    ds = _split(x, y, columns, views, classes, task, cfg.test_fraction, config.seed)
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


def _digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    sys.audit("traci_ml.core.data.read", "digits")  # parties.AUDIT_EVENT
    bunch = load_digits()
    columns = tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8))
    classes = tuple(str(i) for i in range(10))
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64), columns, classes


def _synthetic(
    cfg: DataConfig, seed: int
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    spec = cfg.synthetic
    rng = np.random.default_rng([seed, 0x5A7])
    x = rng.standard_normal((spec.rows, spec.features), dtype=np.float32)
    hidden = np.tanh(x @ rng.standard_normal((spec.features, 64)).astype(np.float32) / 8)
    logits = hidden @ rng.standard_normal((64, spec.classes)).astype(np.float32)
    y = logits.argmax(axis=1).astype(np.int64)
    columns = tuple(f"x{j}" for j in range(spec.features))
    return x, y, columns, tuple(str(c) for c in range(spec.classes))


def _read_csv(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[str, ...]]:
    path = Path(cfg.path or "")
    views: list[ViewConfig] = list(cfg.views)  # type: ignore[arg-type]  # csv: always a list
    for v in views:  # before any cell is read: a label among the features is the config's fault
        if cfg.label in v.columns:
            raise DataError(
                f"data.views: view {v.name!r} reads the label column {cfg.label!r} as a "
                f"feature: the model would be handed the answer (remove {cfg.label!r} from it)"
            )
    sys.audit("traci_ml.core.data.read", str(path))  # parties.AUDIT_EVENT: who reads what
    try:
        with path.open(newline="") as fh:
            reader = csv.reader(fh)
            # (file line, cells): blank lines carry no data but count for line numbers
            rows = [(reader.line_num, row) for row in reader if row]
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"data file {path} is not a readable CSV: {exc}") from None
    if len(rows) < 3:
        raise DataError(f"data file {path} needs a header and at least two rows")
    header = [h.strip() for h in rows[0][1]]
    repeated = [h for i, h in enumerate(header) if h in header[:i]]
    if repeated:
        names = list(dict.fromkeys(repeated))
        raise DataError(
            f"data file {path}: header repeats column name(s) {names}: every column needs "
            "its own name (which one would a view read?)"
        )
    if cfg.label not in header:
        raise DataError(f"data file {path} has no label column {cfg.label!r}")
    label_at = header.index(cfg.label)
    wanted = {c for v in views for c in v.columns}
    missing = sorted(wanted - set(header))
    if missing:
        raise DataError(f"data file {path} has no column(s) {missing}")
    used = sorted(wanted, key=header.index)
    at = [header.index(c) for c in used]
    x = np.empty((len(rows) - 1, len(used)), dtype=np.float32)
    labels = []
    for i, (line, row) in enumerate(rows[1:]):
        if len(row) != len(header):
            raise DataError(f"{path} line {line}: {len(row)} fields, header has {len(header)}")
        for j, col in enumerate(at):
            try:
                x[i, j] = float(row[col])
            except ValueError:
                raise DataError(
                    f"{path} line {line}: column {header[col]!r} ({_readers(views, header[col])}) "
                    f"value {row[col]!r} is not a number"
                ) from None
        labels.append(row[label_at].strip())
    finite = np.isfinite(x)
    if not finite.all():
        i, j = (int(k) for k in np.argwhere(~finite)[0])
        line, row = rows[1 + i]
        raise DataError(
            f"{path} line {line}: column {used[j]!r} ({_readers(views, used[j])}) value "
            f"{row[at[j]]!r} is NaN or Inf, not a usable feature value"
        )
    if cfg.task == "classification":
        classes = tuple(sorted(set(labels), key=_natural))
        ids = {c: i for i, c in enumerate(classes)}
        return x, np.array([ids[v] for v in labels], dtype=np.int64), tuple(used), classes
    try:
        y = np.array([float(v) for v in labels], dtype=np.float32)
    except ValueError:
        raise DataError(f"data file {path}: label column {cfg.label!r} is not numeric") from None
    return x, y, tuple(used), ()


def _readers(views: list[ViewConfig], column: str) -> str:
    """``view 'a'`` or ``views 'a', 'b'``: who reads ``column``."""
    names = [repr(v.name) for v in views if column in v.columns]
    return ("view " if len(names) == 1 else "views ") + ", ".join(names)


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


def _natural(label: str) -> tuple[int, float, str]:
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


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
    test_fraction: float,
    seed: int,
) -> Dataset:
    n = len(x)
    order = np.random.default_rng([seed, 0xDA7A]).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    if len(train) < 2:
        raise DataError(f"only {len(train)} training rows after a {test_fraction} test split")
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std < 1e-8] = 1.0  # constant columns (digits has some) stay at zero
    xs = ((x - mean) / std).astype(np.float32)
    y_mean, y_std = 0.0, 1.0
    if task == "regression":
        y_mean, y_std = float(y[train].mean()), float(y[train].std() or 1.0)
        y = ((y - y_mean) / y_std).astype(np.float32)
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
    from traci_ml.core.parties import read_labels

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
        values, inverse = np.unique(raw, return_inverse=True)
        names = [str(v) for v in values.tolist()]
        classes = tuple(sorted(set(names), key=_natural))
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[n] for n in names], dtype=np.int64)[inverse.reshape(-1)]
        y_mean, y_std = 0.0, 1.0
    else:
        if raw.dtype.kind not in "iuf":
            raise DataError(f"{spec.path}: label column {spec.label!r} holds {raw.dtype.kind!r} "
                            "values: regression needs numbers")  # fmt: skip
        yf = raw.astype(np.float64)
        y_mean = float(yf[: rows.n_train].mean())
        y_std = float(yf[: rows.n_train].std() or 1.0)
        y = ((yf - y_mean) / y_std).astype(np.float32)
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


@dataclass
class ExpertData:
    """One expert's own rows: ``table`` (n, F) float32 and their ``ids``; ``rows`` maps the
    schedule's rows to them (``None`` until aligned). Standardised on its own training rows
    (``standardise``), the one-table mode's arrays arrive standardised already."""

    name: str
    columns: tuple[str, ...]
    table: np.ndarray
    ids: np.ndarray
    id_type: str
    source: str  # the file (parties) or the one table, for messages
    rows: RowMap | None = None
    mean: np.ndarray | None = None  # parties: the standardisation applied to ``table``
    std: np.ndarray | None = None

    def align(self, rows: RowMap) -> None:
        """Adopt the schedule's row map and standardise on the training rows held."""
        if rows.held()[0] == 0:
            raise DataError(f"{self.source}: none of its {len(self.ids)} ids is among the "
                            f"{rows.n_train} labelled training rows: zero overlap with the label "
                            f"holder (is the id column right?)")  # fmt: skip
        own = rows.train_rows()
        if own is not None and self.mean is None:
            self.standardise(*_column_stats(self.table, np.sort(own)))
        self.rows = rows

    def standardise(self, mean: np.ndarray, std: np.ndarray) -> None:
        std = np.where(std < 1e-8, 1.0, std)
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        self.table -= self.mean
        self.table /= self.std


def _column_stats(table: np.ndarray, rows: np.ndarray, chunk_bytes: int = 4 << 20):
    """(mean, std) per column over ``rows`` of ``table``, in float64, a chunk of rows (about
    ``chunk_bytes`` of float64) at a time: never a copy of the training rows (a party's table
    may be most of its memory)."""
    chunk = max(256, chunk_bytes // (8 * max(table.shape[1], 1)))
    total = np.zeros(table.shape[1], np.float64)
    for start in range(0, len(rows), chunk):
        total += table[rows[start : start + chunk]].sum(axis=0, dtype=np.float64)
    mean = total / max(len(rows), 1)
    squares = np.zeros(table.shape[1], np.float64)
    for start in range(0, len(rows), chunk):
        part = table[rows[start : start + chunk]].astype(np.float64) - mean
        squares += (part * part).sum(axis=0)
    return mean, np.sqrt(squares / max(len(rows), 1))


def load_expert_data(config: Config, expert_id: int) -> ExpertData:
    """Expert ``expert_id``'s rows: its own file (parties; not yet aligned), or its view's
    columns of the one table (aligned by row number)."""
    from traci_ml.core.parties import read_party

    cfg = config.data
    views = view_specs(cfg)
    if not 0 <= expert_id < len(views):
        raise DataError(f"--id {expert_id} outside [0, {len(views)}) experts")
    view = views[expert_id]
    if cfg.source == "parties":
        t = read_party(view.path or "", id_column=view.id or cfg.id, columns=view.columns,
                       fmt=view.format)  # fmt: skip
        return ExpertData(view.name, t.columns, t.values, t.ids, t.id_type, str(view.path))
    ds = load_dataset(config)
    train, test = ds.view(expert_id, "train"), ds.view(expert_id, "test")
    n_train = len(train)
    data = ExpertData(
        view.name, tuple(view.columns), np.concatenate([train, test]),
        np.concatenate([ds.ids_train, ds.ids_test]), "int", cfg.path or cfg.source,
    )  # fmt: skip
    index = np.arange(n_train + len(test), dtype=np.int64)
    data.rows = RowMap(index[:n_train], index[n_train:], n_train, len(test))
    return data
