"""Party tables: one party's own columns, read from its own file (issue 10, first step).

An expert party holds a table of its id column and its feature columns; the label holder (the
reducer) holds an id column and a label column. :func:`read_party` and :func:`read_labels` read
one such file, CSV or Parquet, and nothing else in it: only the id column and the requested
columns are decoded (pyarrow ``columns=`` / ``include_columns``), batch by batch, straight into
one float32 array, so the peak memory stays near the size of the result.

Every problem is a :class:`~traci_ml.core.errors.DataError` with one line that names the file, the
column and, where there is one, the row: ``line N`` for CSV (the header is line 1), ``row N``
(0-based) for Parquet.

What it shares with the one CSV table reader (``reader``): the line numbers of a CSV file on
its error paths (``reader.records``: blank lines skipped but counted, a record named by its
first line), a ragged record's message (``reader.ragged``), the encoding and the audit event.
What stays its own, and why: the cells are parsed by pyarrow, streamed into float32 without
a text copy of the table (the reader holds every cell as text: fine for a training table or
rows to predict, not for a party's table that may be most of its memory), and pyarrow reads
a few cells unlike Python's ``float`` (spaces around a number); Parquet; ids and labels typed
as the file holds them; and its messages (role-named columns, ``the file has [...]``),
which tests and docs quote.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from traci_ml.core.data.arrow import (
    Where,
    as_float32,
    check_rows,
    fill,
    id_array,
    label_array,
    one_line,
)
from traci_ml.core.data.reader import AUDIT_EVENT, ENCODING, ragged, records
from traci_ml.core.errors import DataError

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
BATCH_ROWS = 65_536  # Parquet rows decoded at a time
CSV_BLOCK = 1 << 20  # CSV bytes parsed at a time


@dataclass(frozen=True, eq=False)
class PartyTable:
    """One expert party's rows: ``values[i]`` are the features of the row with id ``ids[i]``."""

    path: Path
    id_column: str
    ids: np.ndarray  # (n,) int64, or a numpy unicode array
    id_type: str  # "int" or "str"
    columns: tuple[str, ...]
    values: np.ndarray  # (n, len(columns)) float32, C-contiguous

    @property
    def rows(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class LabelTable:
    """The label holder's rows: ``labels[i]`` is the label of the row with id ``ids[i]``."""

    path: Path
    id_column: str
    ids: np.ndarray
    id_type: str
    label_column: str
    labels: np.ndarray  # int64, float64, bool or unicode: as the file holds them

    @property
    def rows(self) -> int:
        return len(self.ids)


def read_party(
    path: str | os.PathLike[str],
    *,
    id_column: str,
    columns: Sequence[str],
    fmt: str | None = None,
) -> PartyTable:
    """Read ``id_column`` and ``columns`` (as float32) from one party's CSV or Parquet file."""
    path = Path(path)
    sys.audit(AUDIT_EVENT, str(path))  # what a process reads (tests check who reads what)
    columns = tuple(columns)
    if not columns:
        raise DataError(f"{path}: no feature columns requested (id column {id_column!r})")
    for i, c in enumerate(columns):
        if c == id_column:
            raise DataError(f"{path}: column {c!r} is the id column, it cannot be a feature")
        if c in columns[:i]:
            raise DataError(f"{path}: feature column {c!r} is requested twice")
    fmt = _format(path, fmt, id_column)
    wanted = [(id_column, "id")] + [(c, "feature") for c in columns]
    if fmt == "parquet":
        pf, where = _open_parquet(path, wanted)
        check_rows(path, pf.metadata.num_rows, id_column)
        id_type = _parquet_id_type(path, pf, id_column)
        batches = _parquet_batches(path, pf, [id_column, *columns])
        ids, values = fill(path, batches, where, id_column, columns, pf.metadata.num_rows, True)
    else:
        where = _csv_lines(path)
        _csv_header(path, wanted)
        types = {id_column: pa.string(), **{c: pa.float32() for c in columns}}
        batches = _csv_batches(path, [id_column, *columns], types, where, columns)
        ids, values = fill(path, batches, where, id_column, columns, _csv_estimate(path), False)
        id_type = "str"
    ids, id_type = id_array(path, ids, id_type, id_column, where, fmt)
    return PartyTable(path, id_column, ids, id_type, columns, values)


def read_labels(
    path: str | os.PathLike[str],
    *,
    id_column: str,
    label_column: str,
    fmt: str | None = None,
) -> LabelTable:
    """Read ``id_column`` and ``label_column`` from the label holder's CSV or Parquet file.

    Labels keep the file's type (strings stay strings, numbers stay numbers); the caller decides
    the classes."""
    path = Path(path)
    sys.audit(AUDIT_EVENT, str(path))
    if label_column == id_column:
        raise DataError(f"{path}: column {label_column!r} cannot be both the id and the label")
    fmt = _format(path, fmt, id_column)
    wanted = [(id_column, "id"), (label_column, "label")]
    if fmt == "parquet":
        pf, where = _open_parquet(path, wanted)
        check_rows(path, pf.metadata.num_rows, id_column)
        id_type = _parquet_id_type(path, pf, id_column)
        try:
            table = pf.read(columns=[id_column, label_column])
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read Parquet columns: {one_line(exc)}") from None
    else:
        where = _csv_lines(path)
        _csv_header(path, wanted)
        try:  # read whole (a small table): pyarrow infers the label's type from every row
            table = pacsv.read_csv(
                path,
                convert_options=_csv_convert([id_column, label_column], {id_column: pa.string()}),
            )
        except pa.ArrowInvalid as exc:
            _explain_csv(path, exc, where, ())
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read CSV: {one_line(exc)}") from None
        check_rows(path, table.num_rows, id_column)
        id_type = "str"
    ids, id_type = id_array(path, table.column(id_column).chunks, id_type, id_column, where, fmt)
    labels = label_array(path, table.column(label_column), label_column, where, trim=fmt == "csv")
    return LabelTable(path, id_column, ids, id_type, label_column, labels)


def check_id_types(tables: Sequence[PartyTable | LabelTable]) -> None:
    """All parties must key their rows the same way: int ids never match str ids."""
    if not tables:
        return
    first = tables[0]
    for t in tables[1:]:
        if t.id_type != first.id_type:
            raise DataError(
                f"{t.path}: id column {t.id_column!r} holds {t.id_type} ids but {first.path} "
                f"(id column {first.id_column!r}) holds {first.id_type} ids: rows can only be "
                "aligned by ids of one type"
            )


# ---- files and headers --------------------------------------------------------------------


def _format(path: Path, fmt: str | None, id_column: str) -> str:
    if fmt is None:
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"{path}: cannot tell the format from the suffix {path.suffix!r} (use .csv, "
                ".parquet or .pq, or pass fmt='csv' or 'parquet')"
            )
    elif fmt not in ("csv", "parquet"):
        raise DataError(f"{path}: unknown format {fmt!r} (csv or parquet)")
    if not path.exists():
        raise DataError(f"{path}: no such file (the table with id column {id_column!r})")
    if not path.is_file():
        raise DataError(f"{path}: not a file (the table with id column {id_column!r})")
    return fmt


def _require(path: Path, names: Sequence[str], wanted: Sequence[tuple[str, str]]) -> None:
    for role in ("id", "label", "feature"):
        missing = [c for c, r in wanted if r == role and c not in names]
        if missing:
            what = f"column {missing[0]!r}" if len(missing) == 1 else f"columns {missing[:10]}"
            more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
            shown = f"first 10 of {len(names)}: " if len(names) > 10 else ""
            raise DataError(
                f"{path}: no {role} {what}{more}; the file has {shown}{list(names[:10])}"
            )
    for c, role in wanted:
        if names.count(c) > 1:
            raise DataError(
                f"{path}: {role} column {c!r} appears {names.count(c)} times in the header"
            )


def _open_parquet(path: Path, wanted: Sequence[tuple[str, str]]) -> tuple[pq.ParquetFile, Where]:
    try:
        # pre_buffer=False: decode a column chunk as it is read, not a whole row group ahead
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {one_line(exc)}") from None
    _require(path, pf.schema_arrow.names, wanted)
    return pf, lambda i: f"row {i}"


def _parquet_id_type(path: Path, pf: pq.ParquetFile, id_column: str) -> str:
    t = pf.schema_arrow.field(id_column).type
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    raise DataError(f"{path}: id column {id_column!r} has type {t}: ids are integers or strings")


def _csv_header(path: Path, wanted: Sequence[tuple[str, str]]) -> None:
    try:
        with path.open(newline="", encoding=ENCODING) as fh:  # the first line, blank or not
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file: {one_line(exc)}") from None
    if not header:
        raise DataError(f"{path}: empty file, no header line (id column {wanted[0][0]!r})")
    _require(path, header, wanted)


def _csv_estimate(path: Path) -> int:
    """Data rows, estimated from the first MiB (only sizes the first allocation)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(1 << 20)
    lines = max(head.count(b"\n"), 1)
    return max(int(size / (len(head) / lines) * 1.02) + 16, 16)


def _csv_lines(path: Path) -> Where:
    """0-based data row -> ``line N`` (the header is line 1), as pyarrow counts rows: blank lines
    are skipped, a quoted field may span lines. Only called to word an error: scans the file."""

    def where(row: int) -> str:
        with path.open(newline="", encoding=ENCODING, errors="replace") as fh:
            for data, (line, _) in enumerate(records(fh), start=-1):  # -1: the header
                if data == row:
                    return f"line {line}"
        return f"data row {row}"

    return where


def _csv_convert(include: list[str], types: dict[str, pa.DataType]) -> pacsv.ConvertOptions:
    return pacsv.ConvertOptions(
        include_columns=include,
        column_types=types,
        null_values=[""],  # an empty cell; "NaN" and "nan" are numbers, caught as not finite
        strings_can_be_null=False,
        timestamp_parsers=[],  # a label that looks like a date stays a string
    )


def _csv_batches(
    path: Path,
    include: list[str],
    types: dict[str, pa.DataType],
    where: Where,
    features: Sequence[str],
) -> Iterator[pa.RecordBatch]:
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=CSV_BLOCK),
            convert_options=_csv_convert(include, types),
        )
        yield from reader
    except pa.ArrowInvalid as exc:
        _explain_csv(path, exc, where, features)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read CSV: {one_line(exc)}") from None


def _parquet_batches(
    path: Path, pf: pq.ParquetFile, columns: list[str]
) -> Iterator[pa.RecordBatch]:
    try:
        yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read Parquet columns: {one_line(exc)}") from None


def _explain_csv(path: Path, exc: Exception, where: Where, features: Sequence[str]) -> NoReturn:
    """pyarrow stopped on the file: find the first bad row and cell the slow way (error path)."""
    with path.open(newline="", encoding=ENCODING, errors="replace") as fh:
        rows = records(fh)
        _, header = next(rows)
        for line, record in rows:
            if len(record) != len(header):
                raise ragged(path, line, len(record), len(header))
    if features:  # re-scan the feature columns as text, one column of one batch at a time
        convert = pacsv.ConvertOptions(
            include_columns=list(features),
            column_types=dict.fromkeys(features, pa.string()),
            null_values=[""],
            strings_can_be_null=True,  # an empty cell is reported as empty, not as text
        )
        offset = 0
        reader = pacsv.open_csv(
            path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK), convert_options=convert
        )
        for batch in reader:
            for name in features:
                as_float32(path, batch.column(name), name, offset, where)
            offset += batch.num_rows
    raise DataError(f"{path}: cannot read CSV: {one_line(exc)}") from None
