"""bench.gpu_check: without CUDA it says so and exits 2; its config puts every service on the
device with bfloat16 on the wire; its fused run is the reference algorithm; and (integration)
its CPU dry run goes through `traci up` and writes both figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from traci_ml.core.config import validate
from traci_ml.core.reference import train_reference


def test_without_cuda_it_says_so_and_exits_2(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--out", str(out)]) == gpu_check.NO_CUDA
    err = capsys.readouterr().err
    assert "no CUDA device is visible" in err and "--device cpu" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_a_device_torch_does_not_know_exits_2(capsys) -> None:
    assert gpu_check.main(["--device", "tpu:9"]) == gpu_check.NO_CUDA
    assert "not a torch device" in capsys.readouterr().err


def test_config_puts_every_service_on_the_device_with_bfloat16_on_the_wire() -> None:
    raw = gpu_check.build_config(gpu_check.DEFAULT_CONFIG, device="cuda", steps=40)
    cfg = validate(raw)
    assert (cfg.expert.device, cfg.reducer.device, cfg.expert.dtype) == ("cuda", "cuda", "bfloat16")
    assert cfg.train.steps == 40 and cfg.train.log_every == 4  # records enough for a rate
    assert cfg.launcher.restart == "never"
    assert (cfg.data.source, cfg.train.batch_size) == ("digits", 64)  # the digits example's
    full = validate(gpu_check.build_config(gpu_check.DEFAULT_CONFIG, device="cpu"))
    assert full.train.steps == 1500 and full.train.log_every == 25
    assert gpu_check.warmup_steps(1500) == 100 and gpu_check.warmup_steps(40) == 8


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded shared CPU, spinning OpenMP threads cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fused_run_is_the_reference_algorithm(one_thread) -> None:
    raw = gpu_check.build_config(gpu_check.DEFAULT_CONFIG, device="cpu", steps=6)
    fused = gpu_check.run_fused(raw, warmup=1, device=torch.device("cpu"))
    reference = train_reference(validate(raw))
    assert fused["steps"] == 6
    assert fused["final_loss"] == pytest.approx(reference.losses[-1], rel=1e-5)
    assert fused["test_accuracy"] == pytest.approx(reference.eval_metrics[-1])
    assert math.isfinite(fused["samples_per_sec"]) and fused["samples_per_sec"] > 0


@pytest.mark.integration
@pytest.mark.timeout(180)
# bench.cluster.run_cluster reads metrics.jsonl through an unclosed `run.metrics.open()`; the
# leaked handle's ResourceWarning is that module's to fix, not this check's
@pytest.mark.filterwarnings("ignore:Exception ignored in. <_io.FileIO name=.*metrics.jsonl")
def test_cpu_dry_run_writes_both_figures(one_thread, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--steps", "20", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["wire_dtype"] == "bfloat16"
    for name in ("traci", "fused"):
        assert result[name]["samples_per_sec"] > 0
        assert 0.0 <= result[name]["test_accuracy"] <= 1.0
    assert result["traci"]["steps"] == 20
    assert "traci / fused" in capsys.readouterr().out
