"""Quality against plain baselines (issue 14, item 2): TRACI's default config on bundled
tables, beside one-process scikit-learn models fit on the same split in the same run.

For each table (``bench.quality_tables``: digits, breast cancer, wine, iris, diabetes,
friedman1): one ``traci up`` with the default config in one-table mode (the table split into
``min(4, features)`` column groups, one expert each; digits is ``make run``'s own run), and
on the same train/test split with all features a standardised LogisticRegression / Ridge
(``linear``) and HistGradientBoosting (``boosting``), scikit-learn defaults. The split is
TRACI's: the baselines fit on ``split_index``'s train rows, and the bench checks that the
rows the reducer scored (``eval_predictions.csv``: ``row`` -> ``id``) are exactly its test
rows, or it fails. TRACI's metric is computed from that file like the baselines' (accuracy;
r2 and rmse). The bar (issue 14): TRACI >= linear on every table (accuracy, or r2).

Test tables are small (iris scores 30 rows: one row is 3.3 points; diabetes' linear r2 is
0.37, 0.54, 0.52, 0.60 and 0.53 on seeds 0-4), so one split says little: every table runs
over ``SEEDS`` (each its own split, baselines refit) and the bar is judged on the mean;
``--quick`` runs seed 0 only, ``--seeds`` others. Five, not three: on seeds 0-2 a change
lifted diabetes just over its linear baseline that seeds 3 and 4 showed to be no gain
(docs/config.md "Input noise").

    python -m bench.quality [--quick] [--tables iris,wine] [--seeds 0,1] [--set train.steps=3000]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.quality_tables import (
    TABLES,
    baselines,
    check_split,
    load_table,
    split_data,
    table_config,
    traci_score,
    write_csv,
)
from traci_ml.core.rundir import RunDir

QUICK_TABLES = ("iris", "diabetes")
SEEDS = (0, 1, 2, 3, 4)  # the full section's splits; --quick: the first only
TIMEOUT_S = 900
SPLIT_NOTE = (
    "baselines fit on TRACI's own train split (split_index: seed permutation, test_fraction) "
    "read through its CSV reader; the test rows TRACI scored (eval_predictions.csv) were "
    "checked to be exactly that split's test rows"
)
VAL_NOTE = (
    "TRACI's train steps draw from the train split less its validation rows "
    "(data.val_fraction {v}: scored to select the checkpoint); the baselines fit the whole "
    "train split with fixed hyperparameters"
)


def split_note(rows: list[dict[str, Any]]) -> str:
    """How the comparison was made fair, and where TRACI held validation rows out."""
    val = max((r.get("val_fraction") or 0.0 for r in rows), default=0.0)
    return SPLIT_NOTE + (f"; {VAL_NOTE.format(v=val)}" if val else "")


def headline(task: str) -> str:
    """The metric the bar is judged on."""
    return "accuracy" if task == "classification" else "r2"


def run_table(name: str, *, seed: int = 0, overrides: dict[str, Any] | None = None,
              keep: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """One table, one seed: the baselines, then TRACI's run; their scores on the test split."""
    from traci_ml.app.api import LocalCluster

    table = load_table(name)
    with tempfile.TemporaryDirectory(prefix="traci-quality-") as tmp:
        base_dir = Path(tmp) if keep is None else keep / f"{name}-seed{seed}"
        base_dir.mkdir(parents=True, exist_ok=True)
        csv_path = None if name == "digits" else write_csv(table, base_dir / f"{name}.csv")
        cfg = {**table_config(table, csv_path, base_dir / "run"), "seed": seed}
        data = split_data(cfg)
        base = baselines(table.task, data, seed)
        cluster = LocalCluster(cfg, overrides=overrides, fresh=True)
        t = time.monotonic()
        summary = cluster.wait(timeout=TIMEOUT_S)
        wall = time.monotonic() - t
        run = RunDir(cluster.run_path)
        with run.eval_predictions.open(newline="") as f:
            scored = list(csv.DictReader(f))
        check_split(data["test"], scored)
        records = cluster.records(None)
        val = json.loads(run.config_json.read_text()).get("data", {}).get("val_fraction", 0.0)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    key = "accuracy" if table.task == "classification" else "rmse"
    return {
        "table": name, "task": table.task, "source": table.source, "seed": seed,
        "rows": len(table.x), "features": len(table.columns),
        "train_rows": len(data["train"]), "test_rows": len(data["test"]),
        "experts": summary["n_experts"], "steps": summary["steps"], "val_fraction": val,
        "traci": {**traci_score(table.task, scored), "wall_s": wall,
                  "train_s": (train[-1]["time"] - train[0]["time"]) if len(train) > 1 else 0.0,
                  "summary_test": {k: summary[k] for k in ("test_accuracy", "test_rmse",
                                                           "test_r2", "test_loss") if k in summary},
                  "best": summary.get("best"), "stop": summary.get("stop_reason"),
                  "final_train_loss": train[-1]["loss_avg"] if train else None,
                  "evals": [(r["step"], r.get(key), r.get("loss")) for r in evals]},
        **base,
    }  # fmt: skip


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table's runs over seeds: the first run's facts, each figure's mean (and per seed)."""
    first = runs[0]
    out = {k: first[k] for k in ("table", "task", "source", "rows", "features", "train_rows",
                                 "test_rows", "experts", "steps", "val_fraction")}  # fmt: skip
    out["seeds"] = [r["seed"] for r in runs]
    for who in ("traci", "linear", "boosting"):
        keys = [k for k, v in first[who].items() if isinstance(v, float)]
        out[who] = {k: statistics.fmean(r[who][k] for r in runs) for k in keys}
        out[who]["per_seed"] = {k: [r[who][k] for r in runs] for k in keys}
    out["traci"]["runs"] = [{k: r["traci"][k] for k in ("summary_test", "best", "stop",
                                                        "final_train_loss", "evals")}
                            for r in runs]  # fmt: skip
    out["linear"]["model"], out["boosting"]["model"] = first["linear"]["model"], first[
        "boosting"]["model"]  # fmt: skip
    m = headline(first["task"])
    out["metric"] = m
    out["meets_linear"] = out["traci"][m] >= out["linear"][m]
    return out


def run(*, quick: bool = False, tables: tuple[str, ...] | None = None,
        seeds: tuple[int, ...] | None = None, overrides: dict[str, Any] | None = None,
        keep: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """The section: every table over ``seeds`` (None: ``SEEDS``, or the first with ``quick``);
    rows in ``rows``, the bar (on the mean over seeds) in ``below_linear``."""
    names = tables or (QUICK_TABLES if quick else TABLES)
    seeds = seeds or (SEEDS[:1] if quick else SEEDS)
    load = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for name in names:
        runs = []
        for seed in seeds:
            r = run_table(name, seed=seed, overrides=overrides, keep=keep)
            runs.append(r)
            print("  " + line(aggregate([r])) + f"  (seed {seed})", flush=True)
        rows.append(aggregate(runs))
    return {
        "rows": rows, "seeds": list(seeds), "overrides": overrides or {},
        "below_linear": [r["table"] for r in rows if not r["meets_linear"]],
        "split": split_note(rows), "loadavg_start": load, "loadavg_end": os.getloadavg(),
    }  # fmt: skip


def line(row: dict[str, Any]) -> str:
    m, t, lin, boo = row["metric"], row["traci"], row["linear"], row["boosting"]
    extra = f" rmse {t['rmse']:.3g}/{lin['rmse']:.3g}/{boo['rmse']:.3g}" if m == "r2" else ""
    verdict = "ok" if row["meets_linear"] else "BELOW linear"
    best = [(r.get("best") or {}).get("step") for r in t.get("runs", [])]
    picked = f"  best step {','.join(str(b) for b in best)}" if any(best) else ""
    return (f"{row['table']:<13} {row['task'][:5]:<5} {row['rows']:>5} {m:<8} TRACI "
            f"{t[m]:.4f}  linear {lin[m]:.4f}  boosting {boo[m]:.4f}{extra}  TRACI "
            f"{t['wall_s']:.0f} s (train {t['train_s']:.0f} s){picked}  {verdict}")  # fmt: skip


def summary_lines(result: dict[str, Any]) -> list[str]:
    seeds = result["seeds"]
    out = [f"quality: TRACI default config vs one-process baselines on the same split "
           f"(seeds {seeds}; mean over seeds)",
           "  table         task   rows metric   TRACI / linear (std. LogReg|Ridge) / "
           "boosting (HistGB); regression: r2, rmse TRACI/linear/boosting"]  # fmt: skip
    out += ["  " + line(r) for r in result["rows"]]
    below = result["below_linear"]
    out.append(f"  bar (TRACI >= linear): {'met on every table' if not below else 'MISSED on '}"
               f"{', '.join(below)}")  # fmt: skip
    out.append(f"  split: {result['split']}")
    la, lb = result["loadavg_start"], result["loadavg_end"]
    out.append(f"  load average at start {la[0]:.1f}, at end {lb[0]:.1f} ({os.cpu_count()} CPUs)")
    return out


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Top-level figures for bench.run: the worst table's TRACI metric minus the linear
    baseline's (accuracy or r2; >= 0 meets the bar), and the tables below it."""
    margin = min(r["traci"][r["metric"]] - r["linear"][r["metric"]] for r in result["rows"])
    return {"quality_worst_margin_vs_linear": margin,
            "quality_below_linear": result["below_linear"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_TABLES)}")
    parser.add_argument("--tables", default="", help=f"comma-separated, from {', '.join(TABLES)}")
    parser.add_argument("--seeds", default="",
                        help="comma-separated seeds (default 0-4; --quick: 0)")  # fmt: skip
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every TRACI run (not the default config!)",
    )
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--keep", type=Path, help="leave each run's CSV and run directory here")
    args = parser.parse_args(argv)
    tables = tuple(t for t in args.tables.split(",") if t) or None
    seeds = tuple(int(s) for s in args.seeds.split(",") if s) or None
    overrides = dict(item.split("=", 1) for item in args.set)
    result = run(quick=args.quick, tables=tables, seeds=seeds, overrides=overrides,
                 keep=args.keep)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
