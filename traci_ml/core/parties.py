"""Party tables: one party's own columns, read from its own file (issue 10, first step).

An expert party holds a table of its id column and its feature columns; the label holder (the
reducer) holds an id column and a label column. :func:`read_party` and :func:`read_labels` read
one such file, CSV or Parquet, and nothing else in it: only the id column and the requested
columns are decoded (pyarrow ``columns=`` / ``include_columns``), batch by batch, straight into
one float32 array, so the peak memory stays near the size of the result.

Every problem is a :class:`~traci_ml.core.errors.DataError` with one line that names the file, the
column and, where there is one, the row: ``line N`` for CSV (the header is line 1), ``row N``
(0-based) for Parquet.

Not here yet (see docs/parties.md): aligning the parties' rows by id, the config keys, the
service wiring.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from traci_ml.core.errors import DataError
from traci_ml.core.ids import INT_ID

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
BATCH_ROWS = 65_536  # Parquet rows decoded at a time
CSV_BLOCK = 1 << 20  # CSV bytes parsed at a time
# A CSV id column is "int" when every cell is a plain decimal integer that fits int64 ("007"
# keeps its zeros: it stays a string, and so do all ids of that file).
_INT_ID = f"^{INT_ID}$"

Where = Callable[[int], str]  # 0-based data row -> "line N" / "row N"


AUDIT_EVENT = "traci_ml.core.data.read"  # sys.audit event: a data file is about to be read


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
        _check_rows(path, pf.metadata.num_rows, id_column)
        id_type = _parquet_id_type(path, pf, id_column)
        batches = _parquet_batches(path, pf, [id_column, *columns])
        ids, values = _fill(path, batches, where, id_column, columns, pf.metadata.num_rows, True)
    else:
        where = _csv_lines(path)
        _csv_header(path, wanted)
        types = {id_column: pa.string(), **{c: pa.float32() for c in columns}}
        batches = _csv_batches(path, [id_column, *columns], types, where, columns)
        ids, values = _fill(path, batches, where, id_column, columns, _csv_estimate(path), False)
        id_type = "str"
    ids, id_type = _ids(path, ids, id_type, id_column, where, fmt)
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
        _check_rows(path, pf.metadata.num_rows, id_column)
        id_type = _parquet_id_type(path, pf, id_column)
        try:
            table = pf.read(columns=[id_column, label_column])
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: cannot read Parquet columns: {_one_line(exc)}") from None
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
            raise DataError(f"{path}: cannot read CSV: {_one_line(exc)}") from None
        _check_rows(path, table.num_rows, id_column)
        id_type = "str"
    ids, id_type = _ids(path, table.column(id_column).chunks, id_type, id_column, where, fmt)
    labels = _labels(path, table.column(label_column), label_column, where, trim=fmt == "csv")
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


def _check_rows(path: Path, rows: int, id_column: str) -> None:
    if rows == 0:
        raise DataError(f"{path}: zero data rows (id column {id_column!r}): nothing to read")


def _open_parquet(path: Path, wanted: Sequence[tuple[str, str]]) -> tuple[pq.ParquetFile, Where]:
    try:
        # pre_buffer=False: decode a column chunk as it is read, not a whole row group ahead
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {_one_line(exc)}") from None
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
        with path.open(newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file: {_one_line(exc)}") from None
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
        with path.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
            reader = csv.reader(fh)
            before, data = 0, -1  # data -1: the header
            for record in reader:
                start, before = before + 1, reader.line_num
                if record:
                    if data == row:
                        return f"line {start}"
                    data += 1
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
        raise DataError(f"{path}: cannot read CSV: {_one_line(exc)}") from None


def _parquet_batches(
    path: Path, pf: pq.ParquetFile, columns: list[str]
) -> Iterator[pa.RecordBatch]:
    try:
        yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: cannot read Parquet columns: {_one_line(exc)}") from None


def _explain_csv(path: Path, exc: Exception, where: Where, features: Sequence[str]) -> NoReturn:
    """pyarrow stopped on the file: find the first bad row and cell the slow way (error path)."""
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        before = reader.line_num
        for record in reader:
            start, before = before + 1, reader.line_num
            if record and len(record) != len(header):
                raise DataError(
                    f"{path} line {start}: {len(record)} fields, the header has {len(header)}"
                )
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
                _as_float32(path, batch.column(name), name, offset, where)
            offset += batch.num_rows
    raise DataError(f"{path}: cannot read CSV: {_one_line(exc)}") from None


# ---- decoding -----------------------------------------------------------------------------


def _fill(
    path: Path,
    batches: Iterator[pa.RecordBatch],
    where: Where,
    id_column: str,
    columns: tuple[str, ...],
    rows: int,
    exact: bool,
) -> tuple[list[pa.Array], np.ndarray]:
    """Copy each batch's feature columns into one float32 array; keep the id column's chunks.

    ``rows`` is the row count (``exact``) or an estimate: the array then grows in place (a big
    block is remapped, not copied) and shrinks to the rows read at the end."""
    values = np.empty((rows, len(columns)), dtype=np.float32)
    ids: list[pa.Array] = []
    offset = 0
    for batch in batches:
        n = batch.num_rows
        if offset + n > len(values):
            if exact:
                raise DataError(f"{path}: holds more rows than its metadata says ({rows})")
            values.resize((max(offset + n, len(values) * 5 // 4), len(columns)), refcheck=False)
        block = values[offset : offset + n]
        for j, name in enumerate(columns):
            block[:, j] = _as_float32(path, batch.column(name), name, offset, where)
        bad = ~np.isfinite(block)
        if bad.any():
            i, j = (int(k) for k in np.argwhere(bad)[0])
            value = batch.column(columns[j])[i].as_py()
            raise DataError(
                f"{path} {where(offset + i)}: feature column {columns[j]!r} value {value!r} is "
                "NaN or Inf (or beyond float32), not a usable feature"
            )
        ids.append(batch.column(id_column))
        offset += n
        del block  # no view into ``values`` survives a resize
        pa.default_memory_pool().release_unused()
    if exact and offset != rows:
        raise DataError(f"{path}: holds {offset} rows, its metadata says {rows}")
    _check_rows(path, offset, id_column)
    if offset != len(values):
        values.resize((offset, len(columns)), refcheck=False)
    return ids, values


def _as_float32(path: Path, arr: pa.Array, name: str, offset: int, where: Where) -> np.ndarray:
    if arr.null_count:
        i = _first_true(pc.is_null(arr))
        raise DataError(
            f"{path} {where(offset + i)}: feature column {name!r} is empty, a number is needed"
        )
    t = arr.type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return arr.cast(pa.float32(), safe=False).to_numpy(zero_copy_only=False)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            return arr.cast(pa.float32()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:  # bisect to the first cell that does not parse
            lo, hi = 0, len(arr)  # arr[:lo] parses, arr[:hi] does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                try:
                    arr.slice(0, mid).cast(pa.float32())
                    lo = mid
                except pa.ArrowInvalid:
                    hi = mid
            value = arr[hi - 1].as_py()
            raise DataError(
                f"{path} {where(offset + hi - 1)}: feature column {name!r} value {value!r} is "
                "not a number"
            ) from None
    raise DataError(f"{path}: feature column {name!r} has type {t}, not a number")


def _ids(
    path: Path, chunks: list[pa.Array], id_type: str, id_column: str, where: Where, fmt: str
) -> tuple[np.ndarray, str]:
    col = pa.chunked_array(chunks)
    if col.null_count:
        i = _first_true(pc.is_null(col))
        raise DataError(f"{path} {where(i)}: id column {id_column!r} is empty")
    if id_type == "str":
        if fmt == "csv":
            col = pc.utf8_trim_whitespace(col)
        lengths = pc.utf8_length(col)
        if pc.min(lengths).as_py() == 0:
            i = _first_true(pc.equal(lengths, 0))
            raise DataError(f"{path} {where(i)}: id column {id_column!r} is empty")
        width = pc.max(lengths).as_py()
        del lengths
        if fmt == "csv" and pc.all(pc.match_substring_regex(col, _INT_ID)).as_py():
            col, id_type = col.cast(pa.int64()), "int"
    if id_type == "int":
        try:
            col = col.cast(pa.int64())
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path}: id column {id_column!r}: {_one_line(exc)}") from None
        ids = np.empty(len(col), dtype=np.int64)
    else:  # a fixed-width unicode array, filled chunk by chunk (no list of all ids at once)
        ids = np.empty(len(col), dtype=f"<U{width}")
    _copy_into(ids, col)  # numpy owns the result: no view keeps pyarrow's buffers alive
    del col
    chunks.clear()  # the caller's list: pyarrow's copy of the ids goes before the sort below
    ordered = np.sort(ids)  # one copy of the ids (pyarrow's count_distinct hashes at ~100 B/id)
    repeated = bool((ordered[1:] == ordered[:-1]).any())
    del ordered
    if repeated:
        first, second = _first_duplicate(ids)
        raise DataError(
            f"{path}: id column {id_column!r} repeats id {ids[second].item()!r}: "
            f"{where(first)} and {where(second)}"
        )
    return ids, id_type


def _labels(path: Path, col: pa.ChunkedArray, name: str, where: Where, *, trim: bool) -> np.ndarray:
    if col.null_count:
        i = _first_true(pc.is_null(col))
        raise DataError(f"{path} {where(i)}: label column {name!r} is empty")
    t = col.type
    if pa.types.is_integer(t):
        return np.array(col.cast(pa.int64()).to_numpy())  # a copy numpy owns
    if pa.types.is_floating(t):
        labels = np.array(col.cast(pa.float64()).to_numpy())
        bad = ~np.isfinite(labels)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{path} {where(i)}: label column {name!r} value {float(labels[i])!r} is NaN or Inf"
            )
        return labels
    if pa.types.is_boolean(t):
        return col.to_numpy()
    try:
        text = col.cast(pa.string())
    except pa.ArrowException:
        raise DataError(f"{path}: label column {name!r} has type {t}") from None
    if trim:
        text = pc.utf8_trim_whitespace(text)
    lengths = pc.utf8_length(text)
    if pc.min(lengths).as_py() == 0:
        i = _first_true(pc.equal(lengths, 0))
        raise DataError(f"{path} {where(i)}: label column {name!r} is empty")
    return np.asarray(text.to_numpy(zero_copy_only=False).astype(str))


def _copy_into(out: np.ndarray, col: pa.ChunkedArray) -> None:
    offset = 0
    for chunk in col.chunks:
        out[offset : offset + len(chunk)] = chunk.to_numpy(zero_copy_only=False)
        offset += len(chunk)


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int:
    return int(pc.index(mask, True).as_py())


def _first_duplicate(ids: np.ndarray) -> tuple[int, int]:
    """(first row, later row) of the id whose second occurrence comes first."""
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    second = int(order[same + 1].min())
    first = int(np.flatnonzero(ids == ids[second])[0])
    return first, second


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
