"""The bundled examples train as their comments promise (examples/*.yaml)."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
import torch

from tests.helpers.cluster import TRACI
from traci_ml.app.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_heterogeneous_experts_with_a_custom_module_train_on_a_csv(run_config, tmp_path):
    path, _ = run_config(example="examples/heterogeneous.yaml")
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["expert_names"] == ["size", "texture", "shape"]
    assert summary["test_accuracy"] >= 0.9, summary["test_accuracy"]
    nets = [
        torch.load(run / "checkpoints" / f"expert-{i}.pt", weights_only=False)["target"]
        for i in range(3)
    ]
    # each expert built its own network for its own width of columns
    assert nets[0]["net.0.weight"].shape == (64, 9)  # size: MLP [64]
    assert nets[1]["blocks.0.weight"].shape == (64, 6)  # texture: the user's GatedExpert
    assert nets[2]["net.0.weight"].shape == (128, 15)  # shape: MLP [128, 64] + layer norm
    assert nets[2]["net.1.weight"].shape == (128,)  # the LayerNorm

    # the offline model assembles each expert's own network, and exports with the user module
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(run), "--split", "test", "--output", str(out)]) == 0
    offline = list(csv.DictReader(out.read_text().splitlines()))
    served = list(csv.DictReader((run / "eval_predictions.csv").read_text().splitlines()))
    assert [r["prediction"] for r in offline] == [r["prediction"] for r in served]
    model = tmp_path / "model.pt"
    assert (
        main(["export", "--run", str(run), "--format", "torchscript", "--output", str(model)]) == 0
    )
    assert model.stat().st_size > 10_000


def test_the_parties_example_trains_from_four_party_files(run_config, tmp_path):
    """examples/parties/parties.yaml: four quadrant files holding 80% of the ids each, a
    label file; run from the repository root as its comment says."""
    path, _ = run_config({"train": {"steps": 500, "eval_every": 0}},
                         example="examples/parties/parties.yaml")  # fmt: skip
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.9, summary["test_accuracy"]
    assert [round(o["overlap"], 2) for o in summary["overlap"].values()] == [0.8] * 4
    by = summary["test_accuracy_by_experts_present"]
    assert by["4"]["accuracy"] >= by["2"]["accuracy"]
