"""`traci request` and the client name the cell that is not a number (issue 9): a feature
column with one bad cell used to reach the front door as a missing column. Missing columns
are still reported as missing. The cluster side is a real BrokerService on loopback TCP: it answers
``missing_columns`` itself, before any expert is needed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from traci_ml.app import cli
from traci_ml.app.client import ServeError, _as_rows
from traci_ml.core.config import Config
from traci_ml.services.broker.service import BrokerService

pytestmark = pytest.mark.timeout(60)
VIEWS = [{"name": "left", "columns": ["a"]}, {"name": "right", "columns": ["b", "c"]}]


@pytest.fixture
def front_door(tmp_path: Path) -> Iterator[str]:
    """A broker whose experts read a, b and c; yields its front door's endpoint."""
    config = Config.model_validate({
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "csv", "path": str(tmp_path / "unused.csv"), "label": "y",
                 "views": VIEWS},
        "metrics": {"broker_port": 0},
    })  # fmt: skip
    any_port = "tcp://127.0.0.1:*"
    broker = BrokerService(config, expert_endpoint=any_port, reducer_endpoint=any_port,
                    client_endpoint=any_port)  # fmt: skip
    thread = threading.Thread(target=broker.run)
    thread.start()
    try:
        yield broker.client_endpoint
    finally:
        broker.stop()
        thread.join(10)


def request(endpoint: str, path: Path, *extra: str) -> int:
    return cli.main(["request", "--endpoint", endpoint, "--input", str(path), "--timeout", "5",
                     "--log-level", "ERROR", *extra])  # fmt: skip


def test_a_non_numeric_cell_is_named_not_reported_missing(front_door, tmp_path, capsys) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b,c,label\n1,2,3,cat\n4,five,6,dog\n")
    assert request(front_door, rows) == 2
    err = capsys.readouterr().err
    assert (
        f"traci request: error: {rows}: column 'b' holds a non-numeric value 'five' at line 3"
        in err
    )
    assert "a feature column must hold only numbers" in err
    assert "answered missing_columns (expert 1 (right) reads column(s) the request lacks: b)" in err
    assert "'label'" not in err  # a label of names is not a feature: left out, not blamed


def test_a_missing_column_is_still_reported_missing(front_door, tmp_path, capsys) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b,label\n1,2,cat\n4,5,dog\n")
    assert request(front_door, rows) == 2
    err = capsys.readouterr().err
    assert "error: missing_columns: expert 1 (right) reads column(s) the request lacks: c" in err
    assert "non-numeric" not in err


def test_named_columns_are_checked_before_sending(tmp_path, capsys) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b,c\n1,2,3\n4,5,6\n\n7,8,x9\n")
    # nothing listens there: the bad cell is found before anything is sent
    assert request("tcp://127.0.0.1:9", rows, "--columns", "a,c") == 2
    err = capsys.readouterr().err
    assert f"{rows}: column 'c' holds a non-numeric value 'x9' at line 5" in err


def test_named_missing_columns_stay_missing(tmp_path, capsys) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("a,b\n1,2\n")
    assert request("tcp://127.0.0.1:9", rows, "--columns", "a,zz") == 2
    assert "lacks 1 feature column(s): zz" in capsys.readouterr().err


def test_missing_columns_details_are_parsed() -> None:
    assert cli.lacking_columns("expert 1 (right) reads column(s) the request lacks: b, c") == (
        {"b", "c"},
        False,
    )
    assert cli.lacking_columns("expert-1 lacks column(s) b, c (+3 more)") == ({"b", "c"}, True)


def test_non_numeric_cells_of_a_csv(tmp_path) -> None:
    rows = tmp_path / "rows.csv"
    rows.write_text("a, b ,label\n1,2,cat\n3,,dog\n")
    assert cli.non_numeric_cells(str(rows)) == {"b": (3, "", True), "label": (2, "cat", False)}
    assert cli.non_numeric_cells(str(tmp_path / "absent.csv")) == {}


@pytest.mark.parametrize(
    ("rows", "columns", "detail"),
    [
        ({"a": [1, 2], "b": [3, "x"]}, None, "column 'b' row 1 holds 'x', not a number"),
        ([[1, 2], ["y", 3]], ["a", "b"], "column 'a' row 1 holds 'y', not a number"),
        ([1, "z"], ["a", "b"], "column 'b' row 0 holds 'z', not a number"),
        ({"a": [1]}, ["a", "c"], "rows lack column(s) c"),
    ],
)
def test_client_names_the_cell_that_is_not_a_number(rows, columns, detail) -> None:
    with pytest.raises(ServeError) as exc:
        _as_rows(rows, columns)
    assert (exc.value.status, exc.value.detail) == ("bad_request", detail)
