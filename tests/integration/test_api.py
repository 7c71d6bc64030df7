"""traci_ml.LocalCluster: a local cluster started from Python, as a notebook would."""

from __future__ import annotations

import io

import pytest

import traci_ml
from traci_ml.core.errors import ConfigError, TraciError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_local_cluster_trains_from_a_mapping_and_follows_progress(run_config):
    _, cfg = run_config({"train": {"steps": 150, "eval_every": 0, "log_every": 10}})
    shown = io.StringIO()
    with traci_ml.LocalCluster(cfg, overrides={"train.batch_size": 32}, progress=shown) as run:
        summary = run.wait(timeout=180)
        assert not run.running
    assert shown.getvalue() == run.output  # progress=: traci up's lines as they came
    assert "training: 150 steps; first step" in run.output
    assert summary["steps"] == 150
    assert summary["test_accuracy"] > 0.5
    train = run.records("train")
    assert [r["step"] for r in train][-1] == 150 and len(train) == 15
    assert run.last("eval") is not None  # the final evaluation
    assert "done: test_accuracy" in run.output
    assert run.config.train.batch_size == 32  # the override reached the run


def test_a_bad_key_is_refused_before_anything_starts(run_config):
    _, cfg = run_config({"train": {"stpes": 10}})
    with pytest.raises(ConfigError, match="train.stpes"):
        traci_ml.LocalCluster(cfg)
    with pytest.raises(ConfigError, match="train.batch_size"):
        traci_ml.LocalCluster(overrides={"train.batch_size": "many"})


def test_a_failed_run_raises_with_its_output(run_config, tmp_path):
    _, cfg = run_config({"train": {"steps": 50}})
    first = traci_ml.LocalCluster(cfg)
    first.wait(timeout=180)
    again = traci_ml.LocalCluster(cfg)  # checkpoints exist: neither fresh nor resume
    with pytest.raises(TraciError, match="already holds checkpoints"):
        again.wait(timeout=60)
