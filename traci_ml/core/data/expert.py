"""One expert's own rows (``ExpertData``): its party's file (parties, standardised on the
training rows it holds once aligned, less the validation rows), or its view's columns of the
one table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from traci_ml.core.align import RowMap
from traci_ml.core.config import Config
from traci_ml.core.data.dataset import load_dataset, view_specs
from traci_ml.core.data.split import floor_std
from traci_ml.core.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class ExpertData:
    """One expert's own rows: ``table`` (n, F) float32 and their ``ids``; ``rows`` maps the
    schedule's rows to them (``None`` until aligned). Standardised on its own rows among those
    training fits on (``standardise``), the one-table mode's arrays arrive standardised
    already."""

    name: str
    columns: tuple[str, ...]
    table: np.ndarray
    ids: np.ndarray
    id_type: str
    source: str  # the file (parties) or the one table, for messages
    rows: RowMap | None = None
    mean: np.ndarray | None = None  # parties: the standardisation applied to ``table``
    std: np.ndarray | None = None

    def align(self, rows: RowMap, fit: np.ndarray) -> None:
        """Adopt the schedule's row map and standardise on the rows held among ``fit``:
        the train split's positions training fits on (``split.fit_positions``; the
        validation rows are global train rows too, so every party knows its own once
        aligned and none of them shapes its statistics)."""
        if rows.held()[0] == 0:
            raise DataError(f"{self.source}: none of its {len(self.ids)} ids is among the "
                            f"{rows.n_train} labelled training rows: zero overlap with the label "
                            f"holder (is the id column right?)")  # fmt: skip
        if rows.train is not None and self.mean is None:
            local = rows.train[fit]
            own = local[local >= 0]
            if not len(own):  # it holds validation rows only: their statistics, not none
                own = rows.train_rows()
                log.warning(
                    "%s: none of its rows is among those training fits on; it is "
                    "standardised on the validation rows it holds",
                    self.source,
                )
            self.standardise(*_column_stats(self.table, np.sort(own)))
        self.rows = rows

    def standardise(self, mean: np.ndarray, std: np.ndarray) -> None:
        std = floor_std(std)
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
    from traci_ml.core.data.parties import read_party

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
