"""A real `traci up` run, then the trained model offline: `traci predict --split test` equals
the reducer's own final evaluation row by row, and the TorchScript and ONNX exports reproduce
`traci predict`.

The run uses the default pipelined window (2): an expert sends an eval batch only after its
in-flight train steps are applied, so the final evaluation sees the checkpoint's target
(docs/predict.md, "Exactness")."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from traci_ml import predict as P
from traci_ml.cli import main
from traci_ml.export import export

pytestmark = pytest.mark.integration
TRACI = [sys.executable, "-m", "traci_ml.cli"]
CLASSES = tuple(str(k) for k in range(10))


def read_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


def probs(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])


@pytest.mark.timeout(300)
def test_offline_prediction_equals_the_reducers_final_eval(run_config, tmp_path, capsys):
    path, cfg = run_config(
        {"expert": {"window": 2}, "train": {"steps": 200, "eval_every": 0, "checkpoint_every": 0}}
    )
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = Path(cfg["run_dir"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 200 and (run / "preprocess.json").exists()

    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(run), "--split", "test", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    offline, served = read_rows(out), read_rows(run / "eval_predictions.csv")
    assert len(offline) == len(served) == summary["eval_history"][-1]["samples"] == 359
    assert all(r["absent"] == "" for r in served)  # every expert present at the final eval
    for key in ("row", "label", "prediction"):
        assert [r[key] for r in offline] == [r[key] for r in served], key
    np.testing.assert_allclose(probs(offline), probs(served), rtol=1e-5, atol=1e-7)
    hits = sum(r["prediction"] == r["label"] for r in offline)
    assert hits / len(offline) == pytest.approx(summary["test_accuracy"], abs=1e-7)
    assert f"test accuracy {hits / len(offline):.4f}" in err
    print(f"accuracy: reducer {summary['test_accuracy']:.6f}, offline {hits}/{len(offline)}")

    predictor = P.load_predictor(run)
    x, _ = P.split_rows(predictor.config, predictor.preprocess, "test")
    want = probs(offline)
    ts = export(run, "torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit in torch 2.13
        module = torch.jit.load(str(ts))
    with torch.no_grad():
        np.testing.assert_allclose(
            module(torch.from_numpy(x))[1].numpy(), want, rtol=1e-5, atol=1e-7
        )
    onnx_path = export(run, "onnx")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"features": x})[1], want, rtol=1e-5, atol=1e-6)
    print(f"exports: torchscript {ts.stat().st_size:,} B, onnx {onnx_path.stat().st_size:,} B")
