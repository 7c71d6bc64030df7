"""The one-table split and standardisation: pure functions of the config, so every process
derives identical arrays without shipping data. The dataset every process loads
(``dataset``) and the preprocessing a run saves for prediction (``preprocess``) both compute
them here, so a served or offline row is standardised exactly as training's rows were.

Standardisation statistics come from the rows training fits on only (``fit_positions``: the
train split less the validation rows), never from the rows model selection scores.
"""

from __future__ import annotations

import numpy as np

from traci_ml.core.align import split_order, validation_split
from traci_ml.core.config import Config

MIN_STD = 1e-8  # a column whose std is below this is constant: std 1, it stays at zero


def split_index(n: int, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, test rows) of an ``n``-row table: a permutation drawn from the seed
    (``align.split_order``; the parties' label holder splits its sorted ids with it too)."""
    return split_order(n, config.seed, config.data.test_fraction)


def fit_positions(n_train: int, config: Config) -> np.ndarray:
    """Positions in the train split (``0..n_train-1``, sorted) of the rows training fits on:
    the train split less the validation rows, the schedule's ``fit_rows``
    (``align.validation_split`` by the run's seed and ``data.val_fraction``). Every
    standardisation statistic (features, a regression label; a party's own columns) comes
    from these rows only, so the rows model selection scores shaped none of them. With
    ``data.val_fraction: 0`` every train position, in order."""
    fit, _ = validation_split(n_train, config.seed, config.data.val_fraction)
    return fit


def floor_std(std: np.ndarray) -> np.ndarray:
    """``std`` with a constant column's (below ``MIN_STD``) set to 1, in ``std``'s dtype."""
    return np.where(std < MIN_STD, np.asarray(1.0, std.dtype), std)


def feature_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) per column of the training rows ``x``, in ``x``'s dtype; see ``floor_std``."""
    return x.mean(axis=0), floor_std(x.std(axis=0))


def target_stats(y: np.ndarray) -> tuple[float, float]:
    """(y_mean, y_std) of the training rows' regression targets (std 1 if they are all one)."""
    return float(y.mean()), float(y.std() or 1.0)


def standardise(
    values: np.ndarray, mean: np.ndarray | float, std: np.ndarray | float
) -> np.ndarray:
    """``(values - mean) / std`` as float32: features, or regression targets."""
    return ((values - mean) / std).astype(np.float32)
