"""``expert.input_noise``: Gaussian noise on each expert's standardised inputs of train steps,
none by default, or a number, or "auto" (regression: sd sqrt(40 / rows training draws from),
at most 0.3; classification: none), drawn by (seed, expert, seq) so the EMB sent and the
online pass that takes its gradient see the same rows (docs/config.md "Input noise"). The
expert service's side is checked bit for bit in tests/expert/test_service.py and, whole, by
the window-1 run equal to the reference (tests/integration/test_cluster.py)."""

from __future__ import annotations

import pytest
import torch

from traci_ml.core.config import INPUT_NOISE_MAX, WEIGHT_DECAY_ROWS, Config, validate
from traci_ml.core.data import load_dataset
from traci_ml.core.errors import ConfigError
from traci_ml.core.models.expert import input_noise, input_noise_for
from traci_ml.core.reference import ReferenceData, ReferenceTrainer
from traci_ml.core.schedule import schedule_for


def test_default_is_none() -> None:
    assert Config().expert.input_noise == 0.0


@pytest.mark.parametrize("value, want", [("auto", "auto"), (0, 0.0), ("0.2", 0.2), (1, 1.0)])
def test_auto_or_a_number(value: object, want: object) -> None:
    assert validate({"expert": {"input_noise": value}}).expert.input_noise == want


@pytest.mark.parametrize("value", [-0.1, "some", float("inf"), float("nan")])
def test_anything_else_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"expert\.input_noise"):
        validate({"expert": {"input_noise": value}})


def test_auto_is_the_weight_decays_prior_on_the_inputs_capped() -> None:
    def auto(rows: int) -> float:
        return input_noise_for("auto", rows, "regression")

    assert INPUT_NOISE_MAX == 0.3
    # sd**2 = 40 / n: a ridge penalty worth 40 rows, like the weight decay
    assert auto(1600) == pytest.approx((WEIGHT_DECAY_ROWS / 1600) ** 0.5)
    assert auto(1600) == pytest.approx(0.158113883)
    assert auto(4 * 1600) == pytest.approx(auto(1600) / 2)
    # small tables get the cap
    assert auto(108) == auto(444) == 0.3
    assert auto(445) < 0.3
    assert auto(0) == 0.3  # no division by zero


def test_auto_is_none_for_classification_a_number_is_used_as_it_is() -> None:
    assert input_noise_for("auto", 100, "classification") == 0.0
    assert input_noise_for("auto", 100_000, "classification") == 0.0
    for task in ("classification", "regression"):
        assert input_noise_for(0.05, 100, task) == input_noise_for(0.05, 10_000, task) == 0.05
        assert input_noise_for(0, 100, task) == 0.0


def test_draws_are_fixed_by_seed_expert_and_step() -> None:
    a = input_noise(0.3, 7, 1, 42, (64, 5))
    assert a.shape == (64, 5) and a.dtype == torch.float32
    assert torch.equal(a, input_noise(0.3, 7, 1, 42, (64, 5)))  # the EMB and the online pass
    assert torch.equal(input_noise(0.6, 7, 1, 42, (64, 5)), 2 * a)  # sd scales one draw
    for other in (input_noise(0.3, 8, 1, 42, (64, 5)), input_noise(0.3, 7, 2, 42, (64, 5)),
                  input_noise(0.3, 7, 1, 43, (64, 5))):  # fmt: skip
        assert not torch.allclose(other, a)
    # about the sd asked for, around 0
    big = input_noise(0.3, 0, 0, 0, (4000, 8))
    assert abs(float(big.std()) - 0.3) < 0.01 and abs(float(big.mean())) < 0.01


def test_the_reference_adds_it_to_train_steps_only(tmp_path) -> None:
    config = validate({"run_dir": str(tmp_path / "run"), "expert": {"input_noise": 0.2}})
    ds = load_dataset(config)
    data = ReferenceData(config, ds)
    trainer = ReferenceTrainer.for_dataset(config, ds)
    sd = input_noise_for(0.2, len(schedule_for(config, ds).fit_rows), config.task)
    assert sd == 0.2
    assert trainer.noise == sd > 0
    step, batch = data.batch(0)
    assert step.phase == "train"
    xs = trainer.inputs(batch)
    for i, (x, clean) in enumerate(zip(xs, batch.xs, strict=True)):
        want = clean + input_noise(sd, config.seed, i, batch.seq, tuple(clean.shape))
        assert torch.equal(x, want)
    # evaluation embeds the rows as they are
    clean_tokens = trainer.embed(batch)
    assert not torch.allclose(trainer.embed(batch, xs), clean_tokens)
    torch.testing.assert_close(trainer.evaluate(batch), _logits(trainer, clean_tokens))
    # "auto" on a classification table (digits): no noise, the inputs are the batch's own
    quiet = validate({"run_dir": str(tmp_path / "q"), "expert": {"input_noise": "auto"}})
    off = ReferenceTrainer.for_dataset(quiet, load_dataset(quiet))
    assert off.noise == 0.0 and off.inputs(batch) is batch.xs


@torch.no_grad()
def _logits(trainer: ReferenceTrainer, tokens: torch.Tensor) -> torch.Tensor:
    trainer.reducer.eval()
    mask = torch.zeros(tokens.shape[1], trainer.n, dtype=torch.bool)
    return trainer.reducer(tokens.transpose(0, 1), mask)[0]
