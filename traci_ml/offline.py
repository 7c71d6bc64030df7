"""``traci predict`` and ``traci export``: a trained run used in this process, no cluster."""

from __future__ import annotations

import argparse
import sys

from traci_ml.errors import TraciError


def run(args: argparse.Namespace) -> int:
    return run_predict(args) if args.command == "predict" else run_export(args)


def run_predict(args: argparse.Namespace) -> int:
    """``traci predict``: CSV out (stdout or --output); a --split run reports its accuracy."""
    import csv

    from traci_ml import predict as P
    from traci_ml.tensors import resolve_device

    predictor = P.load_predictor(args.run, device=str(resolve_device(args.device)))
    prep = predictor.preprocess
    if args.split:
        x, labels = P.split_rows(predictor.config, prep, args.split)
        head = {"row": list(range(len(x))), "label": labels}
    else:
        x, frame = P.read_csv(args.input, prep.columns)
        head = {"row": list(range(len(x)))}
        if prep.label in frame and prep.label not in prep.columns:
            head["label"] = frame[prep.label]
    cols = {**head, **P.predict_array(predictor, x)}
    out = sys.stdout
    try:
        if args.output:
            out = open(args.output, "w", newline="")  # noqa: SIM115
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(cols)
        for r in range(len(x)):
            writer.writerow([P.fmt_cell(v[r]) for v in cols.values()])
    except OSError as exc:
        raise TraciError(f"cannot write {args.output}: {exc.strerror}") from None
    finally:
        if out is not sys.stdout:
            out.close()
    if args.split and prep.task == "classification" and len(x):
        hits = sum(a == b for a, b in zip(labels, cols["prediction"], strict=True))
        print(f"{args.split} accuracy {hits / len(x):.4f} ({hits}/{len(x)})", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from traci_ml.export import export

    path = export(args.run, args.format, args.output)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)", file=sys.stderr)
    return 0
