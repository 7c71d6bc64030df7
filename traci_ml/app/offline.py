"""``traci predict`` and ``traci export``: a trained run used in this process, no cluster."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from traci_ml.core.errors import TraciError
from traci_ml.core.rundir import RunDir


def run(args: argparse.Namespace) -> int:
    return run_predict(args) if args.command == "predict" else run_export(args)


def run_predict(args: argparse.Namespace) -> int:
    """``traci predict``: CSV out (stdout or --output), in the columns of eval_predictions.csv
    (``row``, ``id``, [``label``], ``prediction``, ``prob_<class>``..., ``absent``); a --split
    run reports its accuracy. --split and --ids go by id (every expert its own rows: a parties
    run needs every party's file), --input takes raw feature rows (one-table runs).
    --attention appends each row's attention per expert (``traci_ml/app/attention.py``)."""
    from traci_ml.app import predict as P
    from traci_ml.app.attention import recording, with_attention
    from traci_ml.core.errors import DataError
    from traci_ml.core.tensors import resolve_device

    device = resolve_device(args.device)
    if args.input is not None:
        config = RunDir(args.run).config()
        if config.data.source == "parties":
            raise DataError("--input takes raw feature rows of a one-table run; a parties run "
                            "predicts its parties' rows by id: --ids or --split")  # fmt: skip
        predictor = P.load_predictor(args.run, device=str(device), checkpoint=args.checkpoint)
        prep = predictor.preprocess
        x, frame = P.read_csv(args.input, prep.columns)
        id_column = predictor.config.data.id
        cols: dict[str, list[Any]] = {"row": list(range(len(x)))}
        has_id = id_column in frame and id_column not in prep.columns
        cols["id"] = [v.strip() for v in frame[id_column]] if has_id else list(range(len(x)))
        if prep.label in frame and prep.label not in prep.columns:
            cols["label"] = frame[prep.label]
        with recording(predictor.model.reducer, args.attention) as seen:
            out = P.predict_array(predictor, x)
        cols.update({k: list(v) for k, v in out.items()})
        cols["absent"] = [""] * len(x)  # every expert reads its view of the given rows
        write_columns(with_attention(cols, seen, predictor.config), args.output)
        return 0
    by_id = P.load_id_predictor(args.run, device=device, checkpoint=args.checkpoint)
    with recording(by_id.model.reducer, args.attention) as seen:
        if args.split:
            cols, skipped = by_id.predict_split(args.split)
            if skipped:
                print(f"{skipped} {args.split} row(s) held by no expert left out (as the "
                      "cluster's evaluation leaves them out)", file=sys.stderr)  # fmt: skip
        else:
            ids = P.read_ids(args.ids, by_id.config.data.id)
            by_id.check_kind(ids, f"--ids {args.ids}")
            cols = by_id.predict(ids)
    write_columns(with_attention(cols, seen, by_id.config), args.output)
    n = len(cols["row"])
    if args.split and by_id.task == "classification" and n:
        hits = sum(a == b for a, b in zip(cols["label"], cols["prediction"], strict=True))
        print(f"{args.split} accuracy {hits / n:.4f} ({hits}/{n})", file=sys.stderr)
    return 0


def write_columns(cols: dict[str, list[Any]], output: str | None) -> None:
    """The columns as CSV, one line per row, cells as eval_predictions.csv writes them."""
    import csv

    from traci_ml.app.predict import fmt_cell

    out = sys.stdout
    try:
        if output:
            out = open(output, "w", newline="")  # noqa: SIM115
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(cols)
        for r in range(len(cols["row"])):
            writer.writerow([fmt_cell(v[r]) for v in cols.values()])
    except OSError as exc:
        raise TraciError(f"cannot write {output}: {exc.strerror}") from None
    finally:
        if out is not sys.stdout:
            out.close()


def run_export(args: argparse.Namespace) -> int:
    """``traci export``: each step said as it begins (stderr), then the file and the times."""
    from traci_ml.app.steps import Steps

    steps = Steps("traci export")
    with steps.step("loading torch"):
        from traci_ml.app.export import export

    path = export(args.run, args.format, args.output, checkpoint=args.checkpoint, steps=steps)
    print(f"wrote {path} ({path.stat().st_size:,} bytes) in {steps.times()}", file=sys.stderr)
    return 0
