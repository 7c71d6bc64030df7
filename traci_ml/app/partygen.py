"""Synthetic vertically split datasets: one label table and one feature table per party.

    python -m traci_ml.app.partygen OUT_DIR --rows 2000000 --parties 4 --features 64 \\
        --overlap 0.7 --classes 10 --format parquet --seed 0

writes ``labels.<ext>`` (``id``, ``label``: all ``rows`` ids) and ``party-<k>.<ext>`` for
k = 0 .. parties-1 (``id`` and its own columns ``p<k>_f<j>``: a random ``overlap`` share of the
ids), every file in its own shuffled row order, so rows line up only by id. Features are
Gaussian; the label is the argmax of a fixed random two-layer teacher over all features (as
``data.source: synthetic`` does), so every party carries some of the signal.

Rows are written ``chunk_rows`` at a time (one Parquet row group each). A feature value is a
pure function of (seed, entity, column), computed by a counter-based hash, so any party can
produce its rows in any order without holding its table, or anyone else's, in memory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from traci_ml.core.errors import DataError, TraciError

ID_BASE = 1_000_000_000  # ids are ID_BASE + entity: never a row position
HIDDEN = 64  # the teacher's hidden width (as data.py's synthetic source)
MAX_FEATURES = 1 << 20  # the hash counter is entity * MAX_FEATURES + column
EXT = {"parquet": "parquet", "csv": "csv"}


def generate(
    out_dir: str | os.PathLike[str],
    *,
    rows: int,
    parties: int,
    features: int,
    overlap: float,
    classes: int,
    fmt: str = "parquet",
    seed: int = 0,
    chunk_rows: int = 100_000,
) -> dict[str, Any]:
    """Write the dataset; return what was written (paths, rows, columns per file)."""
    if rows < 1 or parties < 1 or classes < 2 or chunk_rows < 1:
        raise DataError("partygen: needs rows >= 1, parties >= 1, classes >= 2, chunk_rows >= 1")
    if features > MAX_FEATURES:
        raise DataError(f"partygen: at most {MAX_FEATURES} features, not {features}")
    if features < parties:
        raise DataError(f"partygen: {features} features cannot give {parties} parties one each")
    if not 0.0 < overlap <= 1.0:
        raise DataError(f"partygen: overlap {overlap} must be in (0, 1]")
    if fmt not in EXT:
        raise DataError(f"partygen: unknown format {fmt!r} (parquet or csv)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = np.array_split(np.arange(features), parties)
    teacher = np.random.default_rng([seed, 0x5A7])
    w1 = teacher.standard_normal((features, HIDDEN)).astype(np.float32)
    w2 = teacher.standard_normal((HIDDEN, classes)).astype(np.float32)

    def labels_of(entities: np.ndarray) -> np.ndarray:
        pre = np.zeros((len(entities), HIDDEN), dtype=np.float32)
        for cols in groups:  # a party's columns at a time: a smaller peak than all of them
            pre += _features(seed, entities, int(cols[0]), len(cols)) @ w1[cols]
        return (np.tanh(pre / 8) @ w2).argmax(axis=1).astype(np.int64)

    written: dict[str, Any] = {
        "dir": str(out),
        "format": fmt,
        "rows": rows,
        "features": features,
        "classes": classes,
        "overlap": overlap,
        "seed": seed,
        "id_column": "id",
        "label_column": "label",
        "parties": [],
    }
    order = np.random.default_rng([seed, 0x1AB]).permutation(rows)
    label_schema = pa.schema([("id", pa.int64()), ("label", pa.int64())])
    path = out / f"labels.{EXT[fmt]}"
    with _Writer(path, label_schema, fmt) as w:
        for start in range(0, rows, chunk_rows):
            entities = order[start : start + chunk_rows]
            w.write([ID_BASE + entities, labels_of(entities)], chunk_rows)
    written["labels"] = {"path": str(path), "rows": rows, "columns": ["label"]}

    held = max(1, round(overlap * rows))
    for k, cols in enumerate(groups):
        names = [f"p{k}_f{j}" for j in range(len(cols))]
        schema = pa.schema([("id", pa.int64())] + [(n, pa.float32()) for n in names])
        order = np.random.default_rng([seed, 0xFA7, k]).permutation(rows)[:held]
        path = out / f"party-{k}.{EXT[fmt]}"
        with _Writer(path, schema, fmt) as w:
            for start in range(0, held, chunk_rows):
                entities = order[start : start + chunk_rows]
                x = _features(seed, entities, int(cols[0]), len(cols))
                w.write([ID_BASE + entities, *x.T], chunk_rows)
        written["parties"].append(
            {"path": str(path), "rows": held, "columns": names, "first_feature": int(cols[0])}
        )
    return written


def _features(seed: int, entities: np.ndarray, first: int, width: int) -> np.ndarray:
    """Standard normal float32 values of columns [first, first + width) for ``entities``: a
    splitmix64 hash of (seed, entity, column) gives two 32-bit uniforms, Box-Muller a normal."""
    key = _mix(np.array([seed], dtype=np.uint64))
    cells = entities.astype(np.uint64)[:, None] * np.uint64(MAX_FEATURES) + np.arange(
        first, first + width, dtype=np.uint64
    )
    h = _mix(cells ^ key)
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) / 2.0**32  # (0, 1): log is finite
    u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) / 2.0**32
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (uint64 arithmetic wraps by design)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class _Writer:
    """One output file, written a chunk at a time (a Parquet row group per chunk)."""

    def __init__(self, path: Path, schema: pa.Schema, fmt: str) -> None:
        self.schema = schema
        if fmt == "parquet":
            # random floats and unique ids: a dictionary only grows the file
            self.writer: Any = pq.ParquetWriter(path, schema, use_dictionary=False)
        else:
            self.writer = pacsv.CSVWriter(path, schema)

    def write(self, arrays: list[np.ndarray], chunk_rows: int) -> None:
        table = pa.Table.from_arrays([pa.array(a) for a in arrays], schema=self.schema)
        if isinstance(self.writer, pq.ParquetWriter):
            self.writer.write_table(table, row_group_size=chunk_rows)
        else:
            self.writer.write_table(table)

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.writer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m traci_ml.app.partygen",
        description="Write a synthetic vertically split dataset: labels + one table per party.",
    )
    ap.add_argument("out_dir")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--parties", type=int, default=4)
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--overlap", type=float, default=0.7, help="share of the ids each party holds")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--format", choices=sorted(EXT), default="parquet")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk-rows", type=int, default=100_000)
    args = ap.parse_args(argv)
    try:
        info = generate(
            args.out_dir,
            rows=args.rows,
            parties=args.parties,
            features=args.features,
            overlap=args.overlap,
            classes=args.classes,
            fmt=args.format,
            seed=args.seed,
            chunk_rows=args.chunk_rows,
        )
    except TraciError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for f in [info["labels"], *info["parties"]]:
        cols = f["columns"]  # besides the id column
        shown = ", ".join(cols) if len(cols) <= 2 else f"{cols[0]} .. {cols[-1]}"
        size = Path(f["path"]).stat().st_size
        print(f"{f['path']}: {f['rows']} rows, id + {len(cols)} ({shown}), {size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
