"""Row ids as users give them (``--ids``, ``predict_ids``, ``traci request --ids``): parsed
by the rule a party's CSV id column is read with (``traci_ml.core.data.parties``). No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from traci_ml.core.errors import DataError

# A text id is an int when every cell is a plain decimal integer that fits int64 ("007" keeps
# its zeros, so all of that list's ids stay str); core.data.parties reads CSV id columns so.
INT_ID = r"-?(0|[1-9][0-9]{0,17})"
_INT_ID = re.compile(INT_ID)


def id_kind(ids: np.ndarray) -> str:
    return "int" if ids.dtype.kind in "iu" else "str"


def parse_ids(cells: Sequence[str], where: Sequence[str] | str = "--ids") -> np.ndarray:
    """Ids from text cells: int64 when every cell is a plain decimal integer, else str.
    ``where``: one place for all (``--ids``) or one per cell (``ids.csv line 3``)."""
    text = [c.strip() for c in cells]
    for i, c in enumerate(text):
        if not c:
            at = where if isinstance(where, str) else where[i]
            raise DataError(f"{at}: id {i} is empty")
    if all(_INT_ID.fullmatch(c) for c in text):
        return np.array([int(c) for c in text], dtype=np.int64)
    return np.array(text, dtype=str)


def as_ids(ids: Sequence[int] | Sequence[str] | np.ndarray) -> np.ndarray:
    """Ids given in Python (ints or strs, or a numpy integer or string array) as an array of
    one kind: int64 or str. Their type is kept (the str "12" is not the int 12)."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise DataError(f"ids must be one-dimensional, got shape {ids.shape}")
        if ids.dtype.kind in "iu":
            return ids.astype(np.int64)
        if ids.dtype.kind == "U":
            return ids
        ids = ids.tolist()
    values = list(ids)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64)
    if all(isinstance(v, (str, np.str_)) for v in values):
        return np.array(values, dtype=str)
    kinds = sorted({type(v).__name__ for v in values})
    raise DataError(f"ids must be all ints or all strs, got {', '.join(kinds)}")


def read_ids(spec: str, id_column: str = "id") -> np.ndarray:
    """``--ids``: a CSV or Parquet file with the column ``id_column``, or ids inline
    (``12,57,903``). A path that exists is read as a file."""
    path = Path(spec)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in (".parquet", ".pq"):
            return _parquet_ids(path, id_column)
        return _csv_ids(path, id_column)
    if suffix in (".csv", ".parquet", ".pq") or "/" in spec:
        raise DataError(f"--ids {spec}: no such file")
    if not spec.strip():
        raise DataError("--ids is empty: give ids (12,57,903) or a file with an id column")
    return parse_ids(spec.split(","), "--ids")


def _csv_ids(path: Path, id_column: str) -> np.ndarray:
    from traci_ml.core.data.reader import read_csv_table  # the one CSV reader

    table = read_csv_table(path)
    if not table.header:
        raise DataError(f"{path} is empty: it needs a header with the id column {id_column!r}")
    if id_column not in table.header:
        shown = list(table.header[:10]) + (["..."] if len(table.header) > 10 else [])
        raise DataError(f"{path}: no id column {id_column!r} (data.id); the file has {shown}")
    return parse_ids(table.cells(id_column), [f"{path} line {n}" for n in table.lines])


def _parquet_ids(path: Path, id_column: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if id_column not in names:
            raise DataError(f"{path}: no id column {id_column!r} (data.id); the file has "
                            f"{names[:10]}")  # fmt: skip
        col = pq.read_table(path, columns=[id_column]).column(id_column)
    except (pa.ArrowException, OSError) as exc:
        why = " ".join(str(exc).split())
        raise DataError(f"{path}: not a readable Parquet file: {why}") from None
    if col.null_count:
        raise DataError(f"{path}: id column {id_column!r} has {col.null_count} empty cell(s)")
    if pa.types.is_integer(col.type):  # the Parquet type decides, as for a party's file
        return np.asarray(col.to_numpy(), dtype=np.int64)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return np.array(col.to_pylist(), dtype=str)
    raise DataError(f"{path}: id column {id_column!r} has type {col.type}: ids are integers or "
                    "strings")  # fmt: skip
