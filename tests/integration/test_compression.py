"""A digits run on the compressed wire (expert.dtype int8 with error feedback,
docs/compression.md) trains, and its bytes per step are about a quarter of float32's."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.helpers.cluster import TRACI
from traci_ml import proto

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_digits_trains_on_the_int8_wire_with_error_feedback(run_config, tmp_path):
    path, cfg = run_config({"expert": {"dtype": "int8", "error_feedback": True},
                            "train": {"steps": 400, "eval_every": 0}})  # fmt: skip
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.9, summary["test_accuracy"]
    b, d, n = cfg["train"]["batch_size"], cfg["embed_dim"], summary["n_experts"]
    # a train step: up to n int8 embeddings in (BATCH), as many int8 gradients out (GRAD)
    # (fewer where the broker's deadline masked a late expert)
    per_step = summary["wire_bytes_per_step"]
    assert 0 < per_step <= 2 * n * proto.frame_nbytes("int8", (b, d))
    assert 2 * n * proto.frame_nbytes("float32", (b, d)) / per_step >= 3.5
    state = torch.load(run / "checkpoints" / "expert-0.pt", weights_only=False)
    assert state["feedback"]["residual"].abs().max() > 0  # the residuals were saved
