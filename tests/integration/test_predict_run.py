"""A real `traci up` run, then the trained model offline: `traci predict --split test` equals
the reducer's own final evaluation (eval_predictions.csv) row by row and column for column,
for a one-table run and for a parties run (every expert reading its own file, rows some
parties lack masked); the TorchScript and ONNX exports reproduce `traci predict`.

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

from traci_ml.app import predict as P
from traci_ml.app.cli import main
from traci_ml.app.export import export
from traci_ml.app.partysplit import split_run
from traci_ml.core.config import load_config

pytestmark = pytest.mark.integration
TRACI = [sys.executable, "-m", "traci_ml.app.cli"]
CLASSES = tuple(str(k) for k in range(10))


def read_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


def probs(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows])


def attn(rows: list[dict[str, str]]) -> np.ndarray:
    """Each row's attention columns: attn_cls, then one per expert."""
    return np.array([[float(v) for k, v in r.items() if k.startswith("attn_")] for r in rows])


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
    assert main(["predict", "--run", str(run), "--split", "test", "--attention",
                 "--output", str(out)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    offline, served = read_rows(out), read_rows(run / "eval_predictions.csv")
    assert len(offline) == len(served) == summary["test"]["samples"] == 359
    assert all(r["absent"] == "" for r in served)  # every expert present at the final eval
    assert list(offline[0]) == list(served[0])  # row, id, label, prediction, prob_*, absent, attn_*
    for key in ("row", "id", "label", "prediction", "absent"):
        assert [r[key] for r in offline] == [r[key] for r in served], key
    np.testing.assert_allclose(probs(offline), probs(served), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(attn(offline), attn(served), rtol=1e-5, atol=1e-6)
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


@pytest.mark.timeout(300)
def test_parties_split_test_equals_the_reducers_final_eval(run_config, tmp_path, capsys):
    """digits split into 4 party files (each keeps 70% of the ids, in its own row order),
    trained 300 steps; offline every expert reads its own file and standardises it with its
    checkpoint's statistics."""
    path, cfg = run_config({"train": {"steps": 300, "eval_every": 0, "checkpoint_every": 0}})
    parties = split_run(load_config(path, env={}), tmp_path / "files", overlap=0.7)
    proc = subprocess.run([*TRACI, "up", str(parties)], capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = Path(cfg["run_dir"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 300 and not (run / "preprocess.json").exists()

    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(run), "--split", "test", "--attention",
                 "--output", str(out)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    offline, served = read_rows(out), read_rows(run / "eval_predictions.csv")
    assert len(offline) == len(served) == summary["test"]["samples"]
    assert 340 < len(served) < 359  # the rows no party holds are left out by both
    assert list(offline[0]) == list(served[0])  # row, id, label, prediction, prob_*, absent, attn_*
    for key in ("row", "id", "label", "prediction", "absent"):
        assert [r[key] for r in offline] == [r[key] for r in served], key
    assert any(r["absent"] for r in served)  # some parties lack some rows
    np.testing.assert_allclose(probs(offline), probs(served), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(attn(offline), attn(served), rtol=1e-5, atol=1e-5)
    experts = [k for k in served[0] if k.startswith("attn_")][1:]  # after attn_cls, by id
    masked = [r for r in served if r["absent"]]  # a masked expert weighs 0 in its row
    assert masked and all(float(r[experts[int(i)]]) == 0 for r in masked
                          for i in r["absent"].split())  # fmt: skip
    hits = sum(r["prediction"] == r["label"] for r in offline)
    assert hits / len(offline) == pytest.approx(summary["test_accuracy"], abs=1e-7)
    assert f"test accuracy {hits / len(offline):.4f}" in err
    worst = np.abs(probs(offline) - probs(served)).max()
    print(f"parties: {len(offline)} rows, accuracy {hits}/{len(offline)}, max |dp| {worst:.2e}")

    # by id: the same lines for the same ids, and an id no party holds gets every expert
    ids = [int(r["id"]) for r in served[:20]] + [10**9]
    got = P.predict_ids(run, ids)
    assert got["absent"][:20] == [r["absent"] for r in served[:20]]
    assert got["label"][:20] == [r["label"] for r in served[:20]]
    assert got["absent"][20] == "0 1 2 3" and got["label"][20] is None
    np.testing.assert_allclose(np.array([got[f"prob_{c}"][:20] for c in CLASSES]).T,
                               probs(served[:20]), rtol=1e-5, atol=1e-5)  # fmt: skip
