"""Issue 14: the standardisation statistics (features, a regression label, a party's own
columns) come from the rows training fits on, the train split less the validation rows
(``split.fit_positions``), never from the rows model selection scores; ``preprocess.json``
holds exactly the statistics the dataset applied; ``data.val_fraction: 0`` is as before."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from traci_ml.core.align import RowMap, positions, validation_split
from traci_ml.core.config import Config
from traci_ml.core.data import (
    derive_preprocess,
    fit_positions,
    load_dataset,
    load_expert_data,
    load_labels,
    split_index,
    standardise,
    write_preprocess,
)
from traci_ml.core.data.expert import _column_stats
from traci_ml.core.data.preprocess import Preprocess
from traci_ml.core.data.split import feature_stats, target_stats
from traci_ml.core.data.tables import raw_table
from traci_ml.core.rundir import RunDir
from traci_ml.core.schedule import make_schedule

N, SEED, EXTREME = 60, 5, 1e6


def csv_config(path: Path, val: float, task: str = "regression") -> Config:
    return Config.model_validate({"seed": SEED, "data": {
        "source": "csv", "path": str(path), "label": "y", "task": task, "val_fraction": val,
        "views": [{"name": "ab", "columns": ["a", "b"]}, {"name": "c", "columns": ["c"]}],
    }})  # fmt: skip


def write_table(path: Path, val: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A table whose validation rows (for ``val``) hold ``EXTREME`` in column a and the
    label: statistics that took them in would be far from those of the other train rows.
    Returns (x, y, the validation rows' table row numbers)."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(N, 3)).round(4)
    y = rng.normal(-1.0, 0.5, size=N).round(4)
    train, _ = split_index(N, csv_config(path, val))
    val_rows = train[validation_split(len(train), SEED, val)[1]]
    x[val_rows, 0] = EXTREME
    y[val_rows] = EXTREME
    cols = {"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": y}
    pacsv.write_csv(pa.table(cols), path)
    return x, y, val_rows


def test_fit_positions_are_the_schedules_fit_rows() -> None:
    config = Config.model_validate({"seed": SEED, "data": {"val_fraction": 0.2},
                                    "train": {"batch_size": 8}})  # fmt: skip
    schedule = make_schedule(config, 50, 10)
    np.testing.assert_array_equal(fit_positions(50, config), schedule.fit_rows)
    assert len(schedule.val_rows) == 10
    assert not set(schedule.val_rows.tolist()) & set(fit_positions(50, config).tolist())
    zero = Config.model_validate({"data": {"val_fraction": 0}})
    np.testing.assert_array_equal(fit_positions(7, zero), np.arange(7))


def test_one_table_statistics_leave_the_validation_rows_out(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    _, _, val_rows = write_table(path, 0.2)
    config = csv_config(path, 0.2)
    ds = load_dataset(config)
    raw_x, y, _, _ = raw_table(config)  # as every process reads the file
    train, test = split_index(N, config)
    fit_rows = train[fit_positions(len(train), config)]
    assert len(val_rows) == 10 and not set(val_rows.tolist()) & set(fit_rows.tolist())
    # the statistics are those of the fit rows: no validation row's extreme value in them
    fit = fit_positions(len(train), config)
    np.testing.assert_allclose(ds.x_train[fit].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train[fit].std(axis=0), 1.0, atol=1e-5)
    assert (ds.y_mean, ds.y_std) == target_stats(y[fit_rows])
    assert abs(ds.y_mean) < 10 and ds.y_std < 10  # with the validation rows: ~2e5 and ~4e5
    # the validation rows are standardised with them, so they stand far out
    val = np.setdiff1d(np.arange(len(train)), fit)
    assert (ds.x_train[val, 0] > 1e4).all() and (ds.y_train[val] > 1e4).all()
    # preprocess.json holds exactly the statistics the dataset applied
    write_preprocess(config, tmp_path / "run")
    saved = RunDir(tmp_path / "run").preprocess
    prep = Preprocess.from_json(json.loads(saved.read_text()), saved)
    want = derive_preprocess(config)
    np.testing.assert_array_equal(prep.mean, want.mean)
    np.testing.assert_array_equal(prep.std, want.std)
    assert (prep.y_mean, prep.y_std) == (ds.y_mean, ds.y_std)
    xs = standardise(raw_x, prep.mean, prep.std)
    np.testing.assert_array_equal(xs[train], ds.x_train)  # bit for bit, as served or exported
    np.testing.assert_array_equal(xs[test], ds.x_test)
    mean, std = feature_stats(raw_x[fit_rows])
    np.testing.assert_array_equal(prep.mean, mean.astype(np.float32))
    np.testing.assert_array_equal(prep.std, std.astype(np.float32))


def test_no_validation_split_keeps_the_statistics_of_the_whole_train_split(tmp_path) -> None:
    path = tmp_path / "t.csv"
    write_table(path, 0.0)
    config = csv_config(path, 0.0)
    raw_x, y, _, _ = raw_table(config)
    ds = load_dataset(config)
    train, test = split_index(N, config)
    mean, std = feature_stats(raw_x[train])  # what every version before issue 14 computed
    old = standardise(raw_x, mean, std)
    assert (
        ds.x_train.tobytes() == old[train].tobytes() and ds.x_test.tobytes() == old[test].tobytes()
    )
    assert (ds.y_mean, ds.y_std) == target_stats(y[train])
    prep = derive_preprocess(config)
    assert prep.mean.tobytes() == mean.astype(np.float32).tobytes()
    assert prep.std.tobytes() == std.astype(np.float32).tobytes()


def parties_config(tmp_path: Path, val: float) -> tuple[Config, np.ndarray]:
    """A regression parties run over ids 0..N-1 whose validation ids (for ``val``) hold
    ``EXTREME`` in the label and in the party's column; the party lacks a few ids."""
    ids = np.arange(N, dtype=np.int64)
    labels, party = tmp_path / "labels.csv", tmp_path / "p0.csv"
    pacsv.write_csv(pa.table({"id": ids, "y": np.zeros(N)}), labels)
    pacsv.write_csv(pa.table({"key": ids[::-1], "f": np.zeros(N)}), party)
    config = Config.model_validate({"seed": SEED, "data": {
        "source": "parties", "task": "regression", "val_fraction": val,
        "labels": {"path": str(labels), "label": "y"},
        "views": [{"name": "p0", "path": str(party), "id": "key", "columns": ["f"]}],
    }})  # fmt: skip
    ds = load_labels(config)
    val_ids = ds.ids_train[validation_split(len(ds.ids_train), SEED, val)[1]]
    rng = np.random.default_rng(1)
    y = rng.normal(2.0, 3.0, N).round(4)
    f = rng.normal(-4.0, 0.5, N).round(4)
    y[val_ids], f[val_ids] = EXTREME, EXTREME
    pacsv.write_csv(pa.table({"id": ids, "y": y}), labels)
    keep = ids[::-1][3:]  # the party lacks three ids
    pacsv.write_csv(pa.table({"key": keep, "f": f[keep]}), party)
    return config, val_ids


def test_parties_statistics_leave_the_validation_rows_out(tmp_path: Path) -> None:
    config, val_ids = parties_config(tmp_path, 0.2)
    ds = load_labels(config)
    fit = fit_positions(len(ds.ids_train), config)
    assert not set(ds.ids_train[fit].tolist()) & set(val_ids.tolist())
    # the label holder's target statistics
    np.testing.assert_allclose(ds.y_train[fit].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.y_train[fit].std(), 1.0, atol=1e-5)
    assert abs(ds.y_mean) < 10 and ds.y_std < 10
    # the party's own: the validation ids are global train rows, so it knows its own
    data = load_expert_data(config, 0)
    gids = np.concatenate([ds.ids_train, ds.ids_test])
    rows = RowMap.from_positions(positions(gids, data.ids), len(ds.ids_train), len(ds.ids_test))
    data.align(rows, fit)
    local = rows.train[fit]
    own = local[local >= 0]
    assert 0 < len(own) < len(fit)  # some fit rows it lacks
    np.testing.assert_allclose(data.table[own].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.table[own].std(), 1.0, atol=1e-5)
    held_val = np.isin(data.ids, val_ids)
    assert held_val.any() and (data.table[held_val] > 1e4).all()


def test_parties_without_validation_split_use_every_held_train_row(tmp_path: Path) -> None:
    config, _ = parties_config(tmp_path, 0.0)
    ds = load_labels(config)
    data = load_expert_data(config, 0)
    raw = data.table.copy()
    gids = np.concatenate([ds.ids_train, ds.ids_test])
    rows = RowMap.from_positions(positions(gids, data.ids), len(ds.ids_train), len(ds.ids_test))
    data.align(rows, fit_positions(len(ds.ids_train), config))
    mean, std = _column_stats(raw, np.sort(rows.train_rows()))  # what align used before
    assert data.mean.tobytes() == mean.astype(np.float32).tobytes()
    assert data.std.tobytes() == std.astype(np.float32).tobytes()
    labels = pacsv.read_csv(tmp_path / "labels.csv").column("y").to_numpy()
    assert (ds.y_mean, ds.y_std) == target_stats(labels[ds.ids_train])  # ids are row numbers


def test_a_party_with_validation_rows_only_is_standardised_on_them(tmp_path, caplog) -> None:
    """None of its rows is one training fits on: its columns are standardised on the
    validation rows it holds (said in the log), not left raw."""
    config, val_ids = parties_config(tmp_path, 0.2)
    ds = load_labels(config)
    f = np.random.default_rng(2).normal(5.0, 2.0, len(val_ids)).round(4)
    pacsv.write_csv(pa.table({"key": val_ids, "f": f}), tmp_path / "p0.csv")
    data = load_expert_data(config, 0)
    gids = np.concatenate([ds.ids_train, ds.ids_test])
    rows = RowMap.from_positions(positions(gids, data.ids), len(ds.ids_train), len(ds.ids_test))
    with caplog.at_level(logging.WARNING):
        data.align(rows, fit_positions(len(ds.ids_train), config))
    np.testing.assert_allclose(data.table.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.table.std(), 1.0, atol=1e-5)
    assert "validation rows it holds" in caplog.text
