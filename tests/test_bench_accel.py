"""bench.accel builds valid configs; its figures are the arithmetic the docstring promises.
No test here runs a cluster or asserts a time."""

from __future__ import annotations

import pytest

from bench import accel
from traci_ml.core.config import Config
from traci_ml.core.data import expert_count


def test_every_grid_config_validates_and_simulates_every_expert():
    for pass_ms in accel.PASSES_MS:
        for window in accel.WINDOWS:
            raw = accel.accel_config(passes_ms=[pass_ms], window=window,
                                     steps=accel.grid_steps(pass_ms, quick=False))  # fmt: skip
            config = Config.model_validate(raw)
            assert config.expert.window == window
            assert config.train.eval_every == 0
            for i in range(expert_count(config)):
                model = config.expert_model(i)
                assert model.module == accel.SIMULATED
                assert model.kwargs["pass_ms"] == pass_ms


def test_the_straggler_config_slows_one_expert_only():
    passes = [accel.FAST_MS] * 4
    passes[accel.STRAGGLER_ID] = accel.STRAGGLER_MS
    config = Config.model_validate(
        accel.accel_config(passes_ms=passes, window=4, steps=300, extra=accel.STRAGGLER_EXTRA)
    )
    assert expert_count(config) == 4
    got = [config.expert_model(i).kwargs["pass_ms"] for i in range(4)]
    assert got == passes
    assert config.expert_model(0).hidden == [256]  # the digits MLP underneath


def test_extra_sections_merge_into_the_config():
    raw = accel.accel_config(passes_ms=[10], window=4, steps=100,
                             extra={"network": {"liveness": 7.0}})  # fmt: skip
    assert Config.model_validate(raw).network.liveness == 7.0


def test_the_zero_compute_config_is_the_plain_mlp():
    config = Config.model_validate(accel.plain_config(window=2, steps=400))
    assert config.expert_model(0).module is None


def test_equal_passes_give_the_same_config_so_the_run_is_shared():
    one = accel.accel_config(passes_ms=[10], window=4, steps=100)
    assert accel.accel_config(passes_ms=[10] * 4, window=4, steps=100) == one


def test_ideal_rate_and_top_level_figures():
    assert accel.ideal_steps_per_s(10) == pytest.approx(1 / 0.03)
    row = {"steps_per_s": 10.0, "test_accuracy": 0.9}
    result = {
        "grid": [{"pass_ms": 10, "window": w, "efficiency": e} for w, e in ((1, 0.5), (4, 0.9))],
        "straggler": {"ratio": 0.3, "with": {**row, "test_accuracy": 0.8}, "without": row},
        "zero_compute": {"w2_vs_w1": 1.2},
    }
    assert accel.ratios(result) == {
        "pipeline_efficiency_10ms": 0.9, "pipeline_efficiency_10ms_w1": 0.5,
        "straggler_ratio": 0.3, "straggler_accuracy": 0.8, "no_straggler_accuracy": 0.9,
        "zero_compute_w2_vs_w1": 1.2,
    }  # fmt: skip


def test_the_bandwidth_config_validates_and_is_link_heavy(tmp_path):
    from bench import bandwidth

    dtype = bandwidth.wire_dtypes()[-1]
    raw = bandwidth.bandwidth_config(dtype=dtype, steps=60, host="10.213.7.1", run_dir=tmp_path)
    config = Config.model_validate(raw)
    assert config.expert.dtype == dtype
    assert config.network.bind_host == config.network.broker_host == "10.213.7.1"
    assert config.security.insecure  # plaintext on the lab's private bridge
    # float32 embeddings of one step, all experts: more than 100 Mbit/s carries at 10 steps/s
    step_bytes = expert_count(config) * config.train.batch_size * config.embed_dim * 4
    assert step_bytes * 10 > 100e6 / 8


def test_bandwidth_dtypes_start_with_float32():
    from bench import bandwidth

    dtypes = bandwidth.wire_dtypes()
    assert dtypes[0] == "float32" and len(dtypes) == len(bandwidth.DTYPES)
    for dtype in dtypes:
        Config.model_validate({"expert": {"dtype": dtype}})


def test_bandwidth_without_namespaces_is_skipped_with_the_reason(monkeypatch):
    from bench import bandwidth

    monkeypatch.setattr(bandwidth, "unavailable", lambda: "network namespaces need root")
    result = bandwidth.run(quick=True)
    assert result == {"skipped": "network namespaces need root"}
    assert bandwidth.ratios(result) == {}
    assert "skipped" in bandwidth.summary_lines(result)[0]


def _fake_cluster(calls: list[dict]):
    def run_cluster(cfg: dict) -> tuple[list[dict], dict]:
        calls.append(cfg)
        steps = cfg["train"]["steps"]
        records = [{"kind": "train", "step": s, "time": s * 0.05} for s in range(10, steps + 1, 10)]
        return records, {"steps": steps, "test_accuracy": 0.9, "steps_skipped": 0}

    return run_cluster


@pytest.mark.parametrize("quick", [True, False])
def test_the_section_runs_every_cell_once_and_fills_every_top_level_key(monkeypatch, quick):
    calls: list[dict] = []
    monkeypatch.setattr(accel, "run_cluster", _fake_cluster(calls))
    result = accel.run(quick=quick)
    grid = len(accel.QUICK_PASSES_MS) * len(accel.QUICK_WINDOWS) if quick else 9
    # quick: the straggler's baseline is the 10 ms window-4 grid run; full: its own (300 steps)
    straggler = 1 if quick else 2
    zero = 2 if quick else 2 * accel.ZERO_REPEATS
    assert len(calls) == grid + straggler + zero
    for cfg in calls:
        Config.model_validate(cfg)
    figures = accel.ratios(result)
    assert set(figures) == {"pipeline_efficiency_10ms", "pipeline_efficiency_10ms_w1",
                            "straggler_ratio", "straggler_accuracy", "no_straggler_accuracy",
                            "zero_compute_w2_vs_w1"}  # fmt: skip
    assert all(v is not None for v in figures.values())
    assert figures["pipeline_efficiency_10ms"] == pytest.approx(20 / (1 / 0.03))  # 20 steps/s
    assert figures["zero_compute_w2_vs_w1"] == pytest.approx(1.0)
    assert accel.summary_lines(result)


def test_a_failed_run_is_reported_and_the_rest_still_run(monkeypatch):
    calls: list[dict] = []
    fake = _fake_cluster(calls)

    def flaky(cfg: dict) -> tuple[list[dict], dict]:
        if cfg["expert"]["window"] == 1 and cfg["expert"]["model"].get("module"):
            raise RuntimeError("traci up failed (1)")
        return fake(cfg)

    monkeypatch.setattr(accel, "run_cluster", flaky)
    result = accel.run(quick=True)
    figures = accel.ratios(result)
    assert figures["pipeline_efficiency_10ms_w1"] is None
    assert figures["pipeline_efficiency_10ms"] is not None
    assert any("failed" in line for line in accel.summary_lines(result))
