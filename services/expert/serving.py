"""An expert's side of served prediction (docs/serving.md): from a QUERY's raw feature rows
and column names to this expert's standardised view, exactly as training saw its rows.

The statistics are the run's own (``preprocess.json``, ``traci_ml.core.data.preprocess``,
written by the reducer when the run started, or derived from the data source the same way),
so a served row and an offline ``traci predict`` row reach the target network as the same
numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from traci_ml.core.config import Config
from traci_ml.core.data import load_preprocess
from traci_ml.core.errors import TraciError

MAX_PICKS = 64  # column lists remembered (clients usually send one)


class QueryView:
    """Picks and standardises one expert's view out of served feature rows."""

    def __init__(self, columns: tuple[str, ...], mean: np.ndarray, std: np.ndarray) -> None:
        self.columns = columns  # the view's columns, in the order the network reads them
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)  # (F_i,)
        self._picks: dict[tuple[str, ...], np.ndarray | list[str]] = {}

    @classmethod
    def for_expert(cls, config: Config, run_path: Path, expert_id: int) -> QueryView:
        """The view of expert ``expert_id`` with the run's training statistics."""
        prep = load_preprocess(run_path, config)
        if expert_id >= len(prep.views):
            raise TraciError(f"the run's preprocessing has no view {expert_id}")
        name, columns = prep.views[expert_id]
        at = np.array(prep.view_index(expert_id), dtype=np.int64)
        return cls(tuple(columns), prep.mean[at], prep.std[at])

    def pick(self, columns: tuple[str, ...]) -> np.ndarray | list[str]:
        """Index of each view column within ``columns``, or the view columns missing."""
        pick = self._picks.get(columns)
        if pick is None:
            where = {c: i for i, c in enumerate(columns)}
            missing = [c for c in self.columns if c not in where]
            pick = missing or np.array([where[c] for c in self.columns], dtype=np.int64)
            if len(self._picks) >= MAX_PICKS:
                self._picks.pop(next(iter(self._picks)))
            self._picks[columns] = pick
        return pick

    def inputs(self, rows: np.ndarray, pick: np.ndarray) -> np.ndarray:
        """(R, F) raw rows -> (R, F_i) float32 standardised view, as training computed it."""
        return (rows[:, pick] - self.mean) / self.std
