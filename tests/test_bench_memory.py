"""The memory section's arithmetic: training is judged apart from the final evaluation."""

from __future__ import annotations

import json

import pytest

from bench.memory import last_train_step, slope_mib_per_1000, summarise

MIB = 1024  # KiB


def test_a_flat_run_with_a_big_final_eval_shows_no_training_growth():
    steps = 1000
    samples = [(s, 300 * MIB, 310 * MIB) for s in range(0, steps, 50)]  # training, flat
    samples += [(steps, 300 * MIB, 310 * MIB), (steps, 450 * MIB, 460 * MIB)]  # final eval
    out = summarise(samples, steps)
    assert out["growth_in_training_mib"] == 0.0
    assert out["slope_mib_per_1000_steps"] == 0.0
    assert out["final_eval_extra_mib"] == 150.0
    assert out["peak_rss_mib"] == 460.0 and out["rss_at_end_mib"] == 450.0


def test_a_leak_in_training_shows_as_growth_and_slope():
    steps = 2000
    samples = [(s, 300 * MIB + s, 0) for s in range(0, steps, 100)]  # +1 KiB per step
    out = summarise(samples, steps)
    assert out["growth_in_training_mib"] == pytest.approx((1900 - 500) / 1024, abs=0.01)
    assert out["slope_mib_per_1000_steps"] == pytest.approx(1000 / 1024, abs=1e-3)  # rounded


def test_slope_of_too_few_points_is_zero():
    assert slope_mib_per_1000([]) == 0.0 and slope_mib_per_1000([(5, 1), (5, 9)]) == 0.0


def test_last_train_step_reads_the_tail_and_skips_a_cut_line(tmp_path):
    lines = [json.dumps({"kind": "train", "step": s}) for s in range(10, 2000, 10)]
    lines.insert(-1, json.dumps({"kind": "eval", "step": 1990}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "tra')
    assert last_train_step(tmp_path) == 1990
    assert last_train_step(tmp_path / "missing") == 0
