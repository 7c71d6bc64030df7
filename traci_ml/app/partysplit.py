"""Split a one-table run into party files: what each party would hold in a real deployment.

    python -m traci_ml.app.partysplit OUT_DIR [--config RUN.yaml] [--overlap 0.7] \\
        [--format csv|parquet] [--seed 0] [--id-type int|str]

reads the config's one table (digits by default, or its CSV) and writes, for each view, a
file with an ``id`` column and the view's columns only (``<view>.<ext>``), and ``labels.<ext>``
(``id``, ``label``). The id of a row is its number in the table (``--id-type str``:
``row-000042-id``). Each party keeps a random ``--overlap`` share of the ids, the labels a
random ``--labelled`` share (default: all; the others are rows no label covers), and
every file has its own shuffled row order, so rows line up only by id. It also writes
``parties.yaml``, the config that trains on these files (``data.source: parties``).
With ``--overlap 1`` and int ids, a parties run splits, standardises and schedules exactly
the rows of the one-table run (docs/parties.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from traci_ml.core.config import Config, load_config
from traci_ml.core.data import view_specs
from traci_ml.core.errors import DataError, TraciError


def split_run(
    config: Config,
    out_dir: str | Path,
    *,
    overlap: float = 1.0,
    fmt: str = "csv",
    seed: int = 0,
    id_type: str = "int",
    labelled: float = 1.0,
) -> Path:
    """Write the party files and ``parties.yaml``; returns the config's path."""
    from traci_ml.core.data import raw_table

    if not 0.0 < overlap <= 1.0 or not 0.0 < labelled <= 1.0:
        raise DataError(f"partysplit: overlap {overlap} and labelled {labelled} must be in (0, 1]")
    if fmt not in ("csv", "parquet"):
        raise DataError(f"partysplit: unknown format {fmt!r} (csv or parquet)")
    if config.data.task != "classification" and config.data.source != "csv":
        raise DataError("partysplit: regression tables come from data.source csv")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, y, columns, classes = raw_table(config)
    n = len(x)
    ids: np.ndarray = np.arange(n, dtype=np.int64)
    if id_type == "str":
        ids = np.array([f"row-{i:06d}-id" for i in range(n)])
    rng = np.random.default_rng([seed, 0x5917])
    labels = np.array([classes[int(k)] for k in y]) if classes else y
    order = rng.permutation(n)[: max(2, int(round(n * labelled)))]
    _write(out / f"labels.{fmt}", {"id": ids[order], "label": labels[order]}, fmt)
    index = {c: i for i, c in enumerate(columns)}
    views = []
    for view in view_specs(config.data):
        keep = rng.permutation(n)[: max(1, int(round(n * overlap)))]
        table: dict[str, Any] = {"id": ids[keep]}
        for c in view.columns:
            table[c] = x[keep, index[c]]
        path = out / f"{view.name}.{fmt}"
        _write(path, table, fmt)
        entry = {"name": view.name, "path": str(path), "columns": list(view.columns)}
        if view.model is not None:
            entry["model"] = view.model.model_dump(mode="json")
        views.append(entry)
    raw = config.to_dict()
    raw["data"] = {
        "source": "parties",
        "task": config.data.task,
        "test_fraction": config.data.test_fraction,
        "labels": {"path": str(out / f"labels.{fmt}"), "label": "label"},
        "views": views,
    }
    path = out / "parties.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _write(path: Path, columns: dict[str, np.ndarray], fmt: str) -> None:
    table = pa.table(columns)
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m traci_ml.app.partysplit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("out_dir")
    ap.add_argument("--config", help="the one-table run's config (default: built-in digits)")
    ap.add_argument("--overlap", type=float, default=1.0, help="share of the ids each party keeps")
    ap.add_argument("--format", choices=("csv", "parquet"), default="csv")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--id-type", choices=("int", "str"), default="int")
    ap.add_argument(
        "--labelled",
        type=float,
        default=1.0,
        help="share of the ids the label file keeps (the others: unlabelled rows)",
    )
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config)
        path = split_run(config, args.out_dir, overlap=args.overlap, fmt=args.format,
                         seed=args.seed, id_type=args.id_type,
                         labelled=args.labelled)  # fmt: skip
    except TraciError as exc:
        print(f"partysplit: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the party files and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
