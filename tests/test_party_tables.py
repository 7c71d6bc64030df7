"""Party tables (issue 10, first step): traci_ml.core.data.parties reads one party's own columns
from its own CSV or Parquet file, with one-line errors naming file, column and row;
traci_ml.app.partygen writes synthetic vertically split datasets. Real files in tmp_path, all
fast."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from traci_ml.app import partygen
from traci_ml.core.data.parties import check_id_types, read_labels, read_party
from traci_ml.core.errors import DataError


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def write_parquet(path: Path, columns: dict[str, list | pa.Array]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


class expect_error:  # noqa: N801  (used like pytest.raises)
    """A DataError whose message is one line and contains every one of ``parts``."""

    def __init__(self, *parts: object) -> None:
        self.parts = [str(p) for p in parts]

    def __enter__(self) -> expect_error:
        self.ctx = pytest.raises(DataError)
        self.info = self.ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> bool:
        handled = self.ctx.__exit__(*exc)  # type: ignore[arg-type]
        message = str(self.info.value)
        assert "\n" not in message, message
        for part in self.parts:
            assert part in message, f"{part!r} not in {message!r}"
        self.message = message
        return bool(handled)


# ---- the generator and a round trip ---------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_generated_dataset_round_trips(tmp_path: Path, fmt: str) -> None:
    info = partygen.generate(
        tmp_path, rows=3000, parties=3, features=10, overlap=0.7, classes=5, fmt=fmt, seed=1
    )
    labels = read_labels(info["labels"]["path"], id_column="id", label_column="label")
    assert labels.id_type == "int" and labels.ids.dtype == np.int64
    assert labels.rows == 3000 and len(np.unique(labels.ids)) == 3000
    assert labels.labels.dtype == np.int64 and len(np.unique(labels.labels)) >= 3
    assert not np.array_equal(labels.ids, np.sort(labels.ids))  # shuffled, not by id
    parties = []
    for k, spec in enumerate(info["parties"]):
        assert spec["columns"] == [f"p{k}_f{j}" for j in range(len(spec["columns"]))]
        t = read_party(spec["path"], id_column="id", columns=spec["columns"])
        assert t.values.dtype == np.float32 and t.values.flags.c_contiguous
        assert t.values.shape == (spec["rows"], len(spec["columns"]))
        assert abs(t.rows / 3000 - 0.7) < 0.01
        assert np.isin(t.ids, labels.ids).all()  # a subset of the label holder's ids
        assert abs(float(t.values.mean())) < 0.1 and abs(float(t.values.std()) - 1) < 0.1
        parties.append(t)
    assert [len(p.columns) for p in parties] == [4, 3, 3]
    check_id_types([labels, *parties])
    # each file in its own order: rows line up only by id
    assert not np.array_equal(parties[0].ids, parties[1].ids)
    assert not np.array_equal(parties[0].ids, labels.ids[: parties[0].rows])


def test_csv_and_parquet_hold_the_same_values(tmp_path: Path) -> None:
    kw = dict(rows=500, parties=2, features=6, overlap=0.5, classes=3, seed=7)
    a = partygen.generate(tmp_path / "a", fmt="parquet", **kw)  # type: ignore[arg-type]
    b = partygen.generate(tmp_path / "b", fmt="csv", **kw)  # type: ignore[arg-type]
    for pa_, pb in zip(a["parties"], b["parties"], strict=True):
        x = read_party(pa_["path"], id_column="id", columns=pa_["columns"])
        y = read_party(pb["path"], id_column="id", columns=pb["columns"])
        np.testing.assert_array_equal(x.ids, y.ids)
        np.testing.assert_array_equal(x.values, y.values)  # float32 survives the CSV text


def test_generator_cli_prints_what_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [str(tmp_path), "--rows", "200", "--parties", "2", "--features", "4", "--format", "csv"]
    assert partygen.main(argv) == 0
    out = capsys.readouterr().out
    assert "labels.csv: 200 rows" in out and "party-1.csv: 140 rows" in out
    assert partygen.main([str(tmp_path), "--features", "1", "--parties", "2"]) == 2


def test_large_parquet_party_stays_float32(tmp_path: Path) -> None:
    info = partygen.generate(
        tmp_path, rows=200_000, parties=1, features=8, overlap=1.0, classes=4, fmt="parquet"
    )
    spec = info["parties"][0]
    t = read_party(spec["path"], id_column="id", columns=spec["columns"])
    assert t.values.dtype == np.float32  # never float64 on the way
    assert t.values.nbytes == 200_000 * 8 * 4
    assert t.ids.dtype == np.int64 and t.rows == 200_000


# ---- only the requested columns -------------------------------------------------------------


def test_parquet_reads_only_the_requested_columns(tmp_path: Path) -> None:
    rows = 400
    huge = pa.array(["x" * 50_000] * rows)  # 20 MB of text the party does not ask for
    path = write_parquet(
        tmp_path / "p.parquet",
        {
            "id": list(range(rows)),
            "notes": huge,
            "a": np.arange(rows, dtype=np.float64),
            "b": np.ones(rows, np.float32),
        },
    )
    del huge
    before = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(before)  # its own statistics, peak included
    pa.set_memory_pool(pool)
    try:
        t = read_party(path, id_column="id", columns=["b", "a"])
    finally:
        pa.set_memory_pool(before)
    assert t.columns == ("b", "a")
    np.testing.assert_array_equal(t.values[:, 1], np.arange(rows, dtype=np.float32))
    assert t.values.dtype == np.float32
    assert pool.max_memory() < 1_000_000, pool.max_memory()  # the 20 MB column never decoded
    assert pool.bytes_allocated() == 0  # the result is numpy's: no arrow buffer kept alive


def test_csv_reads_only_the_requested_columns(tmp_path: Path) -> None:
    # the extra columns hold text, an empty cell and NaN: none of it is converted or checked
    path = write_csv(tmp_path / "p.csv", "id,note,a,junk,b\n7,hello,1.5,,2\n3,world,-1,nan,4e2\n")
    t = read_party(path, id_column="id", columns=["b", "a"])
    assert t.ids.tolist() == [7, 3] and t.id_type == "int"
    np.testing.assert_array_equal(t.values, np.array([[2, 1.5], [400, -1]], np.float32))


def test_string_ids_and_labels_keep_their_type(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "l.csv", "id,label\n007,cat\n7, dog\nabc,cat\n")
    t = read_labels(path, id_column="id", label_column="label")
    assert t.id_type == "str" and t.ids.tolist() == ["007", "7", "abc"]  # "007" stays text
    assert t.labels.tolist() == ["cat", "dog", "cat"]
    nums = write_parquet(tmp_path / "l.parquet", {"id": ["u1", "u2"], "y": [0.5, 2.0]})
    t = read_labels(nums, id_column="id", label_column="y")
    assert t.id_type == "str" and t.labels.dtype == np.float64


def test_check_id_types_names_both_files(tmp_path: Path) -> None:
    ints = read_party(
        write_csv(tmp_path / "a.csv", "id,x\n1,0\n2,0\n"), id_column="id", columns=["x"]
    )
    strs = read_party(
        write_parquet(tmp_path / "b.parquet", {"uid": ["1", "2"], "x": [0.0, 1.0]}),
        id_column="uid",
        columns=["x"],
    )
    check_id_types([ints, ints])
    with expect_error("a.csv", "b.parquet", "'uid'", "'id'", "str", "int"):
        check_id_types([ints, strs])


# ---- errors: one line naming the file, the column and the row --------------------------------


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with expect_error(tmp_path / "nope.parquet", "no such file", "'id'"):
        read_party(tmp_path / "nope.parquet", id_column="id", columns=["x"])
    with expect_error(tmp_path / "t.txt", "'.txt'"):
        read_party(write_csv(tmp_path / "t.txt", "id,x\n1,2\n"), id_column="id", columns=["x"])
    t = read_party(tmp_path / "t.txt", id_column="id", columns=["x"], fmt="csv")
    assert t.rows == 1


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_missing_columns_list_what_the_file_has(tmp_path: Path, fmt: str) -> None:
    names = ["id"] + [f"c{i}" for i in range(12)]
    if fmt == "csv":
        path = write_csv(tmp_path / "p.csv", ",".join(names) + "\n" + ",".join(["1"] * 13) + "\n")
    else:
        path = write_parquet(tmp_path / "p.parquet", {n: [1.0] for n in names})
    with expect_error(path, "no id column 'key'", "first 10 of 13", "'c8'") as e:
        read_party(path, id_column="key", columns=["c0"])
    assert "'c9'" not in e.message
    with expect_error(path, "no feature columns ['zz', 'yy']"):
        read_party(path, id_column="id", columns=["c0", "zz", "yy"])
    with expect_error(path, "no label column 'label'"):
        read_labels(path, id_column="id", label_column="label")


@pytest.mark.parametrize(
    ("fmt", "where"), [("csv", "line 3 and line 5"), ("parquet", "row 1 and row 3")]
)
def test_duplicate_ids_name_the_id_and_both_rows(tmp_path: Path, fmt: str, where: str) -> None:
    ids = ["a", "b", "c", "b", "a"]  # "b" is the first id seen twice
    if fmt == "csv":
        path = write_csv(tmp_path / "p.csv", "id,x\n" + "".join(f"{i},1\n" for i in ids))
    else:
        path = write_parquet(tmp_path / "p.parquet", {"id": ids, "x": [1.0] * 5})
    with expect_error(path, "id column 'id'", "repeats id 'b'", where):
        read_party(path, id_column="id", columns=["x"])
    if fmt == "parquet":
        path = write_parquet(tmp_path / "q.parquet", {"id": [5, 6, 5], "y": [1, 2, 3]})
        with expect_error(path, "repeats id 5", "row 0 and row 2"):
            read_labels(path, id_column="id", label_column="y")


def test_csv_errors_name_the_line(tmp_path: Path) -> None:
    def case(body: str, *parts: str, label: bool = False) -> None:
        path = write_csv(tmp_path / "p.csv", body)
        with expect_error(path, *parts):
            if label:
                read_labels(path, id_column="id", label_column="y")
            else:
                read_party(path, id_column="id", columns=["x", "z"])

    case("id,x,z\n1,1,2\n,3,4\n", "line 3", "id column 'id' is empty")
    case("id,x,z\n1,1,2\n2,,4\n", "line 3", "feature column 'x' is empty")
    case("id,x,z\n1,1,2\n2,3,abc\n", "line 3", "feature column 'z' value 'abc' is not a number")
    case("id,x,z\n1,1,2\n2,3,4\n3,nan,4\n", "line 4", "column 'x' value nan is NaN or Inf")
    case("id,x,z\n1,1,2\n2,-inf,4\n", "line 3", "column 'x' value -inf is NaN or Inf")
    case("id,x,z\n1,1,2\n2,3\n", "line 3", "2 fields, the header has 3")
    case("id,x,z\n", "zero data rows", "'id'")
    case("", "empty file", "'id'")
    # blank lines and a quoted field over two lines still count as file lines
    case('id,x,z\n\n1,1,2\n"2\n",3,4\n4,x,1\n', "line 6", "'x' value 'x' is not a number")
    case("id,y\n1,cat\n2, \n", "line 3", "label column 'y' is empty", label=True)
    case("id,y\n1,3\n2,\n", "line 3", "label column 'y' is empty", label=True)


def test_csv_bad_cell_far_into_the_file(tmp_path: Path) -> None:
    rows = [f"{i},{i}.5,1" for i in range(60_000)]  # several pyarrow blocks
    rows[54_321] = "54321,1.5,oops"
    path = write_csv(tmp_path / "p.csv", "id,x,z\n" + "\n".join(rows) + "\n")
    with expect_error(path, "line 54323", "column 'z' value 'oops' is not a number"):
        read_party(path, id_column="id", columns=["x", "z"])


def test_parquet_errors_name_the_row(tmp_path: Path) -> None:
    def case(cols: dict, *parts: str, label: bool = False) -> None:
        path = write_parquet(tmp_path / "p.parquet", cols)
        with expect_error(path, *parts):
            if label:
                read_labels(path, id_column="id", label_column="y")
            else:
                read_party(path, id_column="id", columns=["x"])

    case({"id": [1, None, 3], "x": [1.0, 2.0, 3.0]}, "row 1", "id column 'id' is empty")
    case({"id": ["a", "", "c"], "x": [1.0, 2.0, 3.0]}, "row 1", "id column 'id' is empty")
    case({"id": [1, 2, 3], "x": [1.0, None, 3.0]}, "row 1", "feature column 'x' is empty")
    case({"id": [1, 2, 3], "x": ["1", "2", "two"]}, "row 2", "'x' value 'two' is not a number")
    case({"id": [1, 2, 3], "x": [1.0, 2.0, np.inf]}, "row 2", "'x' value inf is NaN or Inf")
    case({"id": [1, 2], "x": [1e300, 0.0]}, "row 0", "'x' value 1e+300", "beyond float32")
    case({"id": [1.5, 2.5], "x": [1.0, 2.0]}, "id column 'id' has type double")
    case({"id": [1, 2], "y": ["a", None]}, "row 1", "label column 'y' is empty", label=True)
    case({"id": [1, 2], "y": [np.nan, 1.0]}, "row 0", "label column 'y' value nan", label=True)
    empty = {"id": pa.array([], pa.int64()), "x": pa.array([], pa.float64())}
    case(empty, "zero data rows", "'id'")


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.parquet", "id,x\n1,2\n")
    with expect_error(path, "not a readable Parquet file"):
        read_party(path, id_column="id", columns=["x"])


def test_party_columns_must_be_features(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.csv", "id,x\n1,2\n")
    with expect_error(path, "'id' is the id column"):
        read_party(path, id_column="id", columns=["x", "id"])
    with expect_error(path, "'x' is requested twice"):
        read_party(path, id_column="id", columns=["x", "x"])
    with expect_error(path, "no feature columns requested"):
        read_party(path, id_column="id", columns=[])


def test_error_messages_are_single_lines_with_the_path(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.csv", 'id,x\n1,"2\n3"\n')
    with expect_error(path) as e:
        read_party(path, id_column="id", columns=["x"])
    assert re.search(r"line 2", e.message), e.message


def test_csv_values_grow_past_a_low_row_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from traci_ml.core.data import parties

    monkeypatch.setattr(parties, "_csv_estimate", lambda path: 16)
    rows = "".join(f"{i},{i},{-i}\n" for i in range(30_000))
    t = read_party(
        write_csv(tmp_path / "p.csv", "id,x,z\n" + rows), id_column="id", columns=["x", "z"]
    )
    assert t.values.shape == (30_000, 2) and t.values.flags.c_contiguous and t.values.flags.owndata
    np.testing.assert_array_equal(t.values[:, 0], np.arange(30_000, dtype=np.float32))
    np.testing.assert_array_equal(t.values[:, 1], -t.ids.astype(np.float32))


def test_csv_label_type_comes_from_every_row(tmp_path: Path) -> None:
    # the first pyarrow block holds only numbers: a streaming reader would fail on 'cat'
    body = "".join(f"{i},{i % 3}\n" for i in range(120_000)) + "120000,cat\n"
    t = read_labels(
        write_csv(tmp_path / "l.csv", "id,y\n" + body), id_column="id", label_column="y"
    )
    assert t.labels.dtype.kind == "U" and t.labels[-1] == "cat" and t.labels[0] == "0"
