"""Decoding a party's columns with pyarrow (``parties``): feature columns straight into one
float32 array, batch by batch; the id column into int64 or fixed-width text ids; the label
column as the file holds it. Every problem is a one-line ``DataError`` naming the file, the
column and, through ``where``, the row (``line N`` for CSV, ``row N`` for Parquet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from traci_ml.core.errors import DataError
from traci_ml.core.ids import INT_ID

# A CSV id column is "int" when every cell is a plain decimal integer that fits int64 ("007"
# keeps its zeros: it stays a string, and so do all ids of that file).
_INT_ID = f"^{INT_ID}$"

Where = Callable[[int], str]  # 0-based data row -> "line N" / "row N"


def check_rows(path: Path, rows: int, id_column: str) -> None:
    if rows == 0:
        raise DataError(f"{path}: zero data rows (id column {id_column!r}): nothing to read")


def fill(
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
            block[:, j] = as_float32(path, batch.column(name), name, offset, where)
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
    check_rows(path, offset, id_column)
    if offset != len(values):
        values.resize((offset, len(columns)), refcheck=False)
    return ids, values


def as_float32(path: Path, arr: pa.Array, name: str, offset: int, where: Where) -> np.ndarray:
    if arr.null_count:
        i = first_true(pc.is_null(arr))
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


def id_array(
    path: Path, chunks: list[pa.Array], id_type: str, id_column: str, where: Where, fmt: str
) -> tuple[np.ndarray, str]:
    col = pa.chunked_array(chunks)
    if col.null_count:
        i = first_true(pc.is_null(col))
        raise DataError(f"{path} {where(i)}: id column {id_column!r} is empty")
    if id_type == "str":
        if fmt == "csv":
            col = pc.utf8_trim_whitespace(col)
        lengths = pc.utf8_length(col)
        if pc.min(lengths).as_py() == 0:
            i = first_true(pc.equal(lengths, 0))
            raise DataError(f"{path} {where(i)}: id column {id_column!r} is empty")
        width = pc.max(lengths).as_py()
        del lengths
        if fmt == "csv" and pc.all(pc.match_substring_regex(col, _INT_ID)).as_py():
            col, id_type = col.cast(pa.int64()), "int"
    if id_type == "int":
        try:
            col = col.cast(pa.int64())
        except pa.ArrowInvalid as exc:
            raise DataError(f"{path}: id column {id_column!r}: {one_line(exc)}") from None
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


def label_array(
    path: Path, col: pa.ChunkedArray, name: str, where: Where, *, trim: bool
) -> np.ndarray:
    if col.null_count:
        i = first_true(pc.is_null(col))
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
        i = first_true(pc.equal(lengths, 0))
        raise DataError(f"{path} {where(i)}: label column {name!r} is empty")
    return np.asarray(text.to_numpy(zero_copy_only=False).astype(str))


def _copy_into(out: np.ndarray, col: pa.ChunkedArray) -> None:
    offset = 0
    for chunk in col.chunks:
        out[offset : offset + len(chunk)] = chunk.to_numpy(zero_copy_only=False)
        offset += len(chunk)


def first_true(mask: pa.Array | pa.ChunkedArray) -> int:
    return int(pc.index(mask, True).as_py())


def _first_duplicate(ids: np.ndarray) -> tuple[int, int]:
    """(first row, later row) of the id whose second occurrence comes first."""
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    same = np.flatnonzero(ordered[1:] == ordered[:-1])
    second = int(order[same + 1].min())
    first = int(np.flatnonzero(ids == ids[second])[0])
    return first, second


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
