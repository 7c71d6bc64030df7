"""``expert.weight_decay`` / ``reducer.weight_decay``: "auto" by default, scaled by the rows
training draws from (docs/config.md "Weight decay by default")."""

from __future__ import annotations

import pytest
import torch

from traci_ml.core.config import WEIGHT_DECAY_ROWS, Config, validate
from traci_ml.core.data import load_dataset
from traci_ml.core.errors import ConfigError
from traci_ml.core.models.expert import build_expert
from traci_ml.core.models.optim import make_adam, set_weight_decay, weight_decay_for
from traci_ml.core.models.reducer import build_reducer
from traci_ml.core.reference import ReferenceTrainer
from traci_ml.core.schedule import schedule_for


def decays(opt: torch.optim.Optimizer) -> set[float]:
    """Every parameter group's weight decay, rounded (one value: one element)."""
    return {round(g["weight_decay"], 12) for g in opt.param_groups}


def test_default_is_auto_for_experts_and_reducer() -> None:
    config = Config()
    assert config.expert.weight_decay == config.reducer.weight_decay == "auto"


@pytest.mark.parametrize("value, want", [("auto", "auto"), (0, 0.0), ("0.1", 0.1), (2, 2.0)])
def test_auto_or_a_number(value: object, want: object) -> None:
    config = validate({"expert": {"weight_decay": value}, "reducer": {"weight_decay": value}})
    assert config.expert.weight_decay == config.reducer.weight_decay == want


@pytest.mark.parametrize("value", [-0.1, "none", float("inf"), float("nan")])
def test_anything_else_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"reducer\.weight_decay"):
        validate({"reducer": {"weight_decay": value}})


def test_auto_is_a_prior_worth_a_fixed_number_of_rows() -> None:
    assert WEIGHT_DECAY_ROWS == 40.0
    assert weight_decay_for("auto", 400) == pytest.approx(0.1)
    assert weight_decay_for("auto", 1280) == pytest.approx(0.03125)
    # twice the rows, half the penalty; a number is used as it is, whatever the rows
    assert weight_decay_for("auto", 100) == 2 * weight_decay_for("auto", 200)
    assert weight_decay_for(0.03, 100) == weight_decay_for(0.03, 10_000) == 0.03
    assert weight_decay_for("auto", 0) == WEIGHT_DECAY_ROWS  # no division by zero


def test_builders_take_the_rows_and_set_weight_decay_changes_it() -> None:
    config = Config()
    _, _, opt = build_expert(config, 0, in_dim=3, train_rows=500)
    assert decays(opt) == {0.08}
    _, opt = build_reducer(config, n_experts=2, out_dim=3, train_rows=500)
    assert decays(opt) == {0.08}
    # rows not known yet (a parties expert before it aligns): no penalty until set
    assert decays(build_expert(config, 0, in_dim=3)[2]) == {0.0}
    fixed = validate({"expert": {"weight_decay": 0.5}})
    assert decays(build_expert(fixed, 0, in_dim=3, train_rows=400)[2]) == {0.5}
    opt = make_adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0.0)
    set_weight_decay(opt, 0.25)
    assert decays(opt) == {0.25}


def test_the_reference_scales_by_the_rows_training_draws_from(tmp_path) -> None:
    config = validate({"run_dir": str(tmp_path / "run"), "data": {"val_fraction": 0.1}})
    ds = load_dataset(config)
    fit = len(schedule_for(config, ds).fit_rows)
    assert fit < len(ds.y_train)  # the validation rows are left out
    trainer = ReferenceTrainer.for_dataset(config, ds)
    want = round(WEIGHT_DECAY_ROWS / fit, 12)
    assert decays(trainer.reducer_opt) == {want}
    assert all(decays(opt) == {want} for opt in trainer.opts)
