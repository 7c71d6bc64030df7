"""Datasets: the digits split and views, CSV loading, and errors that name the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from traci_ml.core.config import Config, load_config
from traci_ml.core.data import Dataset, digits_views, fit_positions, load_dataset
from traci_ml.core.errors import DataError, TraciError


def digits(seed: int = 0, **overrides: str) -> Dataset:
    return load_dataset(load_config(overrides={"seed": str(seed), **overrides}, env={}))


def fit_part(ds: Dataset, config: Config) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the train rows training fits on (no validation row): the rows the
    standardisation statistics come from."""
    fit = fit_positions(len(ds.y_train), config)
    return ds.x_train[fit], ds.y_train[fit]


@pytest.fixture(scope="module")
def ds() -> Dataset:
    return digits()


# --------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------


def test_digits_split_sizes(ds: Dataset) -> None:
    assert ds.x_train.shape == (1438, 64) and ds.x_test.shape == (359, 64)
    assert ds.y_train.shape == (1438,) and ds.y_test.shape == (359,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert (ds.task, ds.n_classes, ds.out_dim, ds.n_experts) == ("classification", 10, 10, 4)
    assert ds.classes == tuple(str(i) for i in range(10))
    assert set(np.unique(ds.y_train)) == set(range(10))


def test_digits_train_columns_are_standardised(ds: Dataset) -> None:
    x_fit, _ = fit_part(ds, load_config(overrides={"seed": "0"}, env={}))
    mean, std = x_fit.mean(axis=0), x_fit.std(axis=0)
    np.testing.assert_allclose(mean, 0.0, atol=1e-4)
    constant = std < 1e-6
    assert constant.any()  # digits has always-blank pixels: they stay at zero, not NaN
    assert not constant.all()
    np.testing.assert_allclose(std[~constant], 1.0, atol=1e-4)
    np.testing.assert_array_equal(ds.x_train[:, constant], 0.0)
    assert np.isfinite(ds.x_test).all()


def test_digits_quadrant_views_partition_the_pixels(ds: Dataset) -> None:
    names = [v.name for v in ds.views]
    assert names == ["top_left", "top_right", "bottom_left", "bottom_right"]
    column_sets = [set(ds.view_columns(i).tolist()) for i in range(4)]
    assert all(len(cols) == 16 for cols in column_sets)
    assert set().union(*column_sets) == set(range(64))  # 4 x 16 = 64: so also disjoint
    assert set(ds.views[0].columns) == {f"pixel_{r}_{c}" for r in range(4) for c in range(4)}
    assert set(ds.views[3].columns) == {f"pixel_{r}_{c}" for r in range(4, 8) for c in range(4, 8)}


def test_digits_view_reads_its_columns(ds: Dataset) -> None:
    for i in range(ds.n_experts):
        cols = ds.view_columns(i)
        train, test = ds.view(i, "train"), ds.view(i, "test")
        assert train.shape == (1438, 16) and test.shape == (359, 16)
        assert train.flags.c_contiguous and train.dtype == np.float32
        np.testing.assert_array_equal(train, ds.x_train[:, cols])
        np.testing.assert_array_equal(test, ds.x_test[:, cols])


def test_digits_halves_preset() -> None:
    halves = digits_views("halves")
    assert [v.name for v in halves] == ["top", "bottom"]
    assert [len(v.columns) for v in halves] == [32, 32]
    assert set(halves[0].columns).isdisjoint(halves[1].columns)
    assert digits(**{"data.views": "halves"}).n_experts == 2


def test_unknown_digits_preset() -> None:
    with pytest.raises(DataError, match="nope"):
        digits_views("nope")


def test_split_is_deterministic_by_seed(ds: Dataset) -> None:
    again = digits(seed=0)
    other = digits(seed=1)
    np.testing.assert_array_equal(again.x_train, ds.x_train)
    np.testing.assert_array_equal(again.y_test, ds.y_test)
    assert other.x_train.shape == ds.x_train.shape
    assert not np.array_equal(other.x_test, ds.x_test)
    assert not np.array_equal(other.y_train, ds.y_train)


def test_digits_custom_view_with_unknown_column() -> None:
    config = Config.model_validate(
        {"data": {"views": [{"name": "corner", "columns": ["pixel_0_0", "pixel_9_9"]}]}}
    )
    with pytest.raises(DataError, match="pixel_9_9"):
        load_dataset(config)


def test_data_error_is_a_traci_error() -> None:
    assert issubclass(DataError, TraciError)


# --------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------

VIEWS = [{"name": "left", "columns": ["a"]}, {"name": "right", "columns": ["c", "b"]}]


def csv_config(path: Path, *, label: str = "y", views: Any = None, **data: Any) -> Config:
    return Config.model_validate(
        {
            "data": {
                "source": "csv",
                "path": str(path),
                "label": label,
                "views": VIEWS if views is None else views,
                **data,
            }
        }
    )


def write_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "table.csv"
    path.write_text(text)
    return path


def table(n: int, label: Any) -> str:
    """A header ``a,b,y,c`` (label between features) and ``n`` rows."""
    rows = [f"{i},{2 * i % 7},{label(i)},{i * i}" for i in range(n)]
    return "a,b,y,c\n" + "\n".join(rows) + "\n"


def test_csv_classification_with_string_labels(tmp_path: Path) -> None:
    names = ["dog", "cat", "bird"]
    path = write_csv(tmp_path, table(30, lambda i: names[i % 3]))
    config = csv_config(path)
    ds = load_dataset(config)
    assert (ds.task, ds.n_classes, ds.classes) == ("classification", 3, ("bird", "cat", "dog"))
    assert ds.columns == ("a", "b", "c")  # used columns in file order, label left out
    assert ds.x_train.shape == (24, 3) and ds.x_test.shape == (6, 3)
    assert [c.tolist() for c in map(ds.view_columns, range(2))] == [[0], [2, 1]]
    labels = np.concatenate([ds.y_train, ds.y_test])
    assert np.bincount(labels).tolist() == [10, 10, 10]
    np.testing.assert_allclose(fit_part(ds, config)[0].mean(axis=0), 0.0, atol=1e-5)


def test_csv_rows_keep_their_labels_through_the_split(tmp_path: Path) -> None:
    # Column a holds the row number i and the label says whether i is even. Standardising
    # is monotone and shared by both splits, so the rank of a over all rows gives i back.
    path = write_csv(tmp_path, table(20, lambda i: "even" if i % 2 == 0 else "odd"))
    ds = load_dataset(csv_config(path, views=[{"name": "a", "columns": ["a"]}]))
    assert ds.classes == ("even", "odd")
    a = np.concatenate([ds.x_train[:, 0], ds.x_test[:, 0]])
    labels = np.concatenate([ds.y_train, ds.y_test])
    row = np.argsort(np.argsort(a))
    assert labels.tolist() == (row % 2).tolist()


def test_csv_numeric_labels_sort_naturally(tmp_path: Path) -> None:
    path = write_csv(tmp_path, table(12, lambda i: ["10", "9", "2"][i % 3]))
    assert load_dataset(csv_config(path)).classes == ("2", "9", "10")


def test_csv_regression_targets_are_standardised(tmp_path: Path) -> None:
    path = write_csv(tmp_path, table(40, lambda i: 3.0 * i + 1.0))
    config = csv_config(path, task="regression", test_fraction=0.25)
    ds = load_dataset(config)
    assert (ds.task, ds.n_classes, ds.out_dim) == ("regression", 0, 1)
    assert ds.y_train.dtype == np.float32
    _, y_fit = fit_part(ds, config)
    assert abs(float(y_fit.mean())) < 1e-5
    assert abs(float(y_fit.std()) - 1.0) < 1e-5
    original = np.concatenate([ds.y_train, ds.y_test]) * ds.y_std + ds.y_mean
    np.testing.assert_allclose(np.sort(original), 3.0 * np.arange(40) + 1.0, rtol=1e-5)


# CSV errors ----------------------------------------------------------------------------


def load_error(config: Config) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(config)
    return str(info.value)


def test_csv_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"
    message = load_error(csv_config(path))
    assert str(path) in message and "cannot read" in message


def test_csv_unknown_label_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path, table(6, lambda i: "x"))
    assert "'target'" in load_error(csv_config(path, label="target"))


def test_csv_unknown_view_column_names_the_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path, table(6, lambda i: "x"))
    views = [{"name": "left", "columns": ["a", "zz"]}]
    assert "zz" in load_error(csv_config(path, views=views))


def test_csv_non_numeric_value_names_line_and_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b,y,c\n1,2,p,3\n4,5,q,6\n7,oops,p,9\n")
    message = load_error(csv_config(path))
    assert "line 4" in message and "'b'" in message and "'oops'" in message


def test_csv_ragged_row_names_the_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b,y,c\n1,2,p,3\n4,5,q\n7,8,p,9\n")
    message = load_error(csv_config(path))
    assert "line 3" in message and "3 fields" in message and "4" in message


def test_csv_non_numeric_regression_label(tmp_path: Path) -> None:
    path = write_csv(tmp_path, table(6, lambda i: "high"))
    assert "'y'" in load_error(csv_config(path, task="regression"))


def test_csv_non_finite_feature(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b,y,c\n1,2,p,3\n4,nan,q,6\n7,8,p,9\n")
    assert "NaN or Inf" in load_error(csv_config(path))


def test_csv_too_few_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b,y,c\n1,2,p,3\n")
    assert "at least two rows" in load_error(csv_config(path))


# Bad data that trained silently before (issue 9) -----------------------------------------


def test_csv_single_training_class_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path, table(20, lambda i: "benign"))
    message = load_error(csv_config(path))
    assert "label column 'y'" in message and "1 class ('benign')" in message
    assert "16 training rows" in message and "at least two" in message


def test_csv_classes_are_counted_in_the_training_rows_only(tmp_path: Path) -> None:
    # Two classes in the file, but the only "rare" row is the one the split holds out.
    from traci_ml.core.data import split_index

    probe = csv_config(tmp_path / "table.csv", test_fraction=0.1)
    train, test = split_index(10, probe)
    assert len(test) == 1
    held_out = int(test[0])
    path = write_csv(tmp_path, table(10, lambda i: "rare" if i == held_out else "common"))
    message = load_error(csv_config(path, test_fraction=0.1))
    assert "1 class ('common') among the 9 training rows" in message
    assert "the whole table has 2" in message
    path = write_csv(tmp_path, table(10, lambda i: "rare" if i == int(train[0]) else "common"))
    assert load_dataset(csv_config(path, test_fraction=0.1)).n_classes == 2


def test_csv_two_classes_still_train(tmp_path: Path) -> None:
    path = write_csv(tmp_path, table(20, lambda i: "a" if i % 2 else "b"))
    assert load_dataset(csv_config(path)).n_classes == 2


def test_csv_regression_with_one_value_is_not_a_class_problem(tmp_path: Path) -> None:
    path = write_csv(tmp_path, table(10, lambda i: 1.5))
    assert load_dataset(csv_config(path, task="regression")).task == "regression"


def test_csv_duplicate_header_names_are_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b,y,a,c,b\n1,2,p,3,4,5\n6,7,q,8,9,0\n1,2,p,3,4,5\n")
    message = load_error(csv_config(path))
    assert "header repeats column name(s) ['a', 'b']" in message and str(path) in message


def test_csv_duplicate_of_an_unused_column_is_refused_too(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b,y,c,z,z\n1,2,p,3,4,5\n6,7,q,8,9,0\n1,2,p,3,4,5\n")
    assert "['z']" in load_error(csv_config(path))


def test_label_column_in_a_view_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path, table(20, lambda i: i % 2))
    views = [{"name": "left", "columns": ["a"]}, {"name": "leaky", "columns": ["b", "y"]}]
    message = load_error(csv_config(path, views=views))
    assert "view 'leaky'" in message and "label column 'y'" in message


def test_label_column_of_names_in_a_view_says_why(tmp_path: Path) -> None:
    # Before: "column 'y' value 'cat' is not a number", which did not say the label leaked.
    path = write_csv(tmp_path, table(20, lambda i: ["cat", "dog"][i % 2]))
    views = [{"name": "all", "columns": ["a", "y"]}]
    message = load_error(csv_config(path, views=views))
    assert "view 'all' reads the label column 'y' as a feature" in message


def test_non_numeric_feature_names_column_view_value_and_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b,y,c\n1,2,p,3\n4,5,q,6\n\n7,8,p,9\n1,2,q,n/a\n")
    message = load_error(csv_config(path))
    # line 6: the blank line 4 counts, as an editor shows it
    assert message == f"{path} line 6: column 'c' (view 'right') value 'n/a' is not a number"


def test_non_numeric_feature_of_two_views_names_both(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b,y,c\n1,2,p,3\n4,,q,6\n7,8,p,9\n")
    views = [{"name": "v1", "columns": ["a", "b"]}, {"name": "v2", "columns": ["b", "c"]}]
    message = load_error(csv_config(path, views=views))
    assert "line 3: column 'b' (views 'v1', 'v2') value '' is not a number" in message


def test_non_finite_feature_names_column_and_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "a,b,y,c\n1,2,p,3\n4,5,q,6\n7,8,p,-inf\n")
    message = load_error(csv_config(path))
    assert "line 4: column 'c' (view 'right') value '-inf'" in message


def test_data_errors_are_traci_errors_naming_the_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path, table(8, lambda i: "same"))
    with pytest.raises(TraciError, match="label column 'y'"):
        load_dataset(csv_config(path))
