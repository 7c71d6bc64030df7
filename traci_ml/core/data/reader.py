"""The one CSV table reader: a header and its records as text, then named columns as numbers.

``read_csv_table`` reads a CSV file with a header (the training table of ``data.source: csv``,
the rows of ``traci predict --input`` and of ``traci request``, an ``--ids`` file);
``CsvTable`` checks what its caller reads -- repeated header names, missing columns -- and
turns named columns into float32 (``numbers``), naming the file, line, column and value of
the first cell that is not a number. Every problem is a one-line ``DataError``.

Line numbers are the file's, as an editor shows them: the header is line 1, blank lines
carry no data but count, and a record whose quoted field spans lines is named by its first
line. A party's file is decoded by pyarrow instead (``parties``: batch by batch into one
float32 array, a table that may be most of a party's memory); its error paths number lines
with this module's ``records`` and word a ragged record with ``ragged``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from traci_ml.core.errors import DataError

AUDIT_EVENT = "traci_ml.core.data.read"  # sys.audit event: a data file is about to be read
ENCODING = "utf-8-sig"  # a byte-order mark is not part of the first column's name


def records(fh: TextIO) -> Iterator[tuple[int, list[str]]]:
    """(file line where it starts, cells) of each non-blank CSV record of ``fh``, the header
    first."""
    reader = csv.reader(fh)
    before = 0
    for record in reader:
        start, before = before + 1, reader.line_num
        if record:
            yield start, record


def ragged(path: object, line: int, fields: int, header: int) -> DataError:
    """A record whose field count is not the header's."""
    return DataError(f"{path} line {line}: {fields} fields, the header has {header}")


@dataclass(frozen=True, eq=False)
class CsvTable:
    """A CSV file's header (names stripped of spaces) and data records, every record as many
    cells as the header; ``lines[i]``: the file line of record ``i``."""

    path: Path
    file: str  # the path as given: line messages start with it
    name: str  # how other messages name the file: "data file PATH", or the path as given
    header: tuple[str, ...]
    lines: list[int]
    records: list[list[str]]

    @property
    def rows(self) -> int:
        return len(self.records)

    def cells(self, column: str) -> list[str]:
        """The text of ``column``'s cells, one per record."""
        k = self.header.index(column)
        return [record[k] for record in self.records]

    def check_unique(self, columns: Iterable[str] | None = None) -> None:
        """Refuse a header naming one of ``columns`` (None: any column) more than once."""
        names = self.header if columns is None else [h for h in self.header if h in columns]
        repeated = [h for i, h in enumerate(names) if h in names[:i]]
        if repeated:
            raise DataError(
                f"{self.name}: header repeats column name(s) {list(dict.fromkeys(repeated))}: "
                "every column needs its own name (which one would a view read?)"
            )

    def require(self, columns: Sequence[str]) -> None:
        """Refuse a table lacking any of the feature ``columns``, naming all it lacks."""
        missing = [c for c in columns if c not in self.header]
        if missing:
            raise DataError(
                f"{self.name} lacks {len(missing)} feature column(s): {', '.join(missing)}"
            )

    def numeric(self, column: str) -> bool:
        """Whether every cell of ``column`` reads as a number (NaN and Inf included)."""
        try:
            np.asarray(self.cells(column), dtype=np.float64)
        except ValueError:
            return False
        return True

    def numbers(
        self,
        columns: Sequence[str],
        *,
        about: Callable[[str], str] | None = None,
        row_numbers: bool = False,
        finite: bool = True,
    ) -> np.ndarray:
        """(rows, len(columns)) float32, C-contiguous: each cell as Python's ``float`` reads it,
        rounded to float32. The first cell (in file order) that is not a number is refused,
        and with ``finite`` the first that is NaN or Inf (or beyond float32). Messages name
        the line, the 0-based data row with ``row_numbers``, and ``about(column)`` in
        parentheses after the column (who reads it)."""
        at = [self.header.index(c) for c in columns]
        x = np.empty((self.rows, len(columns)), dtype=np.float32)
        bad = []
        with np.errstate(over="ignore"):  # beyond float32: Inf, refused below
            for j, k in enumerate(at):
                try:  # numpy reads text as float() does (rounding included), in C
                    x[:, j] = np.asarray([record[k] for record in self.records], np.float64)
                except ValueError:
                    bad.append(j)
        if bad:
            for i, record in enumerate(self.records):
                for j in bad:
                    try:
                        float(record[at[j]])
                    except ValueError:
                        raise self._cell(i, columns[j], record[at[j]], "is not a number",
                                         about, row_numbers) from None  # fmt: skip
        if finite:
            wrong = ~np.isfinite(x)
            if wrong.any():
                i, j = (int(k) for k in np.argwhere(wrong)[0])
                raise self._cell(i, columns[j], self.records[i][at[j]], "is NaN or Inf (or "
                                 "beyond float32), not a usable feature value", about,
                                 row_numbers)  # fmt: skip
        return x

    def _cell(
        self,
        i: int,
        column: str,
        value: str,
        problem: str,
        about: Callable[[str], str] | None,
        row_numbers: bool,
    ) -> DataError:
        row = f" (row {i})" if row_numbers else ""
        who = f" ({about(column)})" if about else ""
        return DataError(
            f"{self.file} line {self.lines[i]}{row}: column {column!r}{who} value {value!r} "
            f"{problem}"
        )


def read_csv_table(path: str | Path, *, name: str | None = None) -> CsvTable:
    """The header and records of a CSV file (an empty file: no header, no records); a record
    whose field count is not the header's is refused. ``name``: the file in messages
    (default: its path)."""
    file = str(path)
    name = name or file
    path = Path(path)
    header: tuple[str, ...] = ()
    lines: list[int] = []
    rows: list[list[str]] = []
    try:
        with path.open(newline="", encoding=ENCODING) as fh:
            for line, record in records(fh):
                if not header:
                    header = tuple(h.strip() for h in record)
                    continue
                if len(record) != len(header):
                    raise ragged(file, line, len(record), len(header))
                lines.append(line)
                rows.append(record)
    except OSError as exc:
        raise DataError(f"cannot read {name}: {exc.strerror}") from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{name} is not a readable CSV: {exc}") from None
    return CsvTable(path, file, name, header, lines, rows)
