"""Schedule: which rows each step uses, and how train and eval steps interleave."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from traci_ml.core import schedule as schedule_module
from traci_ml.core.config import TrainConfig, load_config
from traci_ml.core.schedule import Schedule, Step, lr_factor, schedule_for, set_lr


def make(**kwargs: Any) -> Schedule:
    args = dict(
        n_train=100, n_test=25, seed=0, batch_size=10, steps=30, eval_every=10, eval_batch_size=10
    )
    args.update(kwargs)
    return Schedule(**args)


def train_rows(schedule: Schedule, index: int) -> np.ndarray:
    return schedule.rows(schedule.step(schedule.first_seq_of_train_step(index)))


# --------------------------------------------------------------------------------------
# Train sampler
# --------------------------------------------------------------------------------------


def test_same_arguments_give_the_same_rows() -> None:
    first = [train_rows(make(seed=3), i).copy() for i in range(25)]
    schedule_module._permutation.cache_clear()  # recompute, not a cached array
    second = [train_rows(make(seed=3), i) for i in range(25)]
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_different_seeds_give_different_rows() -> None:
    a = np.concatenate([train_rows(make(seed=0), i) for i in range(10)])
    b = np.concatenate([train_rows(make(seed=1), i) for i in range(10)])
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("n_train,batch_size", [(100, 10), (103, 10), (64, 64), (50, 7)])
def test_each_epoch_draws_distinct_rows(n_train: int, batch_size: int) -> None:
    schedule = make(n_train=n_train, batch_size=batch_size, steps=300, eval_every=0)
    per_epoch = n_train // batch_size
    assert schedule.steps_per_epoch == per_epoch
    epochs = []
    for epoch in range(3):
        batches = [train_rows(schedule, epoch * per_epoch + k) for k in range(per_epoch)]
        assert all(len(b) == batch_size for b in batches)
        rows = np.concatenate(batches)
        assert len(np.unique(rows)) == len(rows) == per_epoch * batch_size  # no repeats
        assert rows.min() >= 0 and rows.max() < n_train
        epochs.append(rows)
    if per_epoch * batch_size == n_train:  # a whole epoch is a permutation of every row
        assert all(sorted(e.tolist()) == list(range(n_train)) for e in epochs)
    if per_epoch > 1:
        assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


# --------------------------------------------------------------------------------------
# Eval batches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_test,eval_batch_size", [(25, 10), (30, 10), (7, 512), (1, 1)])
def test_eval_rounds_cover_the_test_split_once_in_order(n_test: int, eval_batch_size: int) -> None:
    schedule = make(n_test=n_test, eval_batch_size=eval_batch_size, steps=25, eval_every=10)
    rounds: dict[int, list[np.ndarray]] = {}
    for seq in range(schedule.total):
        step = schedule.step(seq)
        if step.phase == "eval":
            rounds.setdefault(step.round, []).append(schedule.rows(step))
    assert sorted(rounds) == list(range(schedule.eval_rounds)) == [0, 1, 2]
    for batches in rounds.values():
        assert len(batches) == schedule.eval_batches
        assert all(len(b) <= eval_batch_size for b in batches)
        np.testing.assert_array_equal(np.concatenate(batches), np.arange(n_test))


# --------------------------------------------------------------------------------------
# Interleaving
# --------------------------------------------------------------------------------------


def layout(schedule: Schedule) -> str:
    """The phases of the whole schedule, e.g. "TTEE|TTEE|" ("|" after a round's last batch)."""
    return "".join(
        ("T" if s.phase == "train" else "E") + ("|" if s.last_in_round else "")
        for s in map(schedule.step, range(schedule.total))
    )


@pytest.mark.parametrize(
    "steps,eval_every,expected",
    [
        (6, 2, "TTEEE|TTEEE|TTEEE|"),
        (7, 3, "TTTEEE|TTTEEE|TEEE|"),  # steps not a multiple: a short last block
        (4, 0, "TTTTEEE|"),  # 0: evaluate only at the end
        (4, 4, "TTTTEEE|"),
        (4, 9, "TTTTEEE|"),  # eval_every beyond steps acts as 0
        (1, 1, "TEEE|"),
        (3, 1, "TEEE|TEEE|TEEE|"),
    ],
)
def test_interleaving(steps: int, eval_every: int, expected: str) -> None:
    schedule = make(steps=steps, eval_every=eval_every, n_test=25, eval_batch_size=10)
    assert schedule.eval_batches == 3
    assert layout(schedule) == expected
    assert schedule.total == len(expected.replace("|", ""))
    assert schedule.eval_rounds == expected.count("|")


def test_steps_carry_index_and_round() -> None:
    schedule = make(steps=7, eval_every=3, n_test=25, eval_batch_size=10)
    steps = [schedule.step(seq) for seq in range(schedule.total)]
    assert [s.seq for s in steps] == list(range(schedule.total))
    assert [s.index for s in steps if s.phase == "train"] == list(range(7))
    assert [s.round for s in steps if s.phase == "train"] == [0, 0, 0, 1, 1, 1, 2]
    assert [(s.round, s.index) for s in steps if s.phase == "eval"] == [
        (r, i) for r in range(3) for i in range(3)
    ]
    # no validation split (make's default): the rounds score the test split
    assert steps[3] == Step(3, "eval", index=0, round=0, last_in_round=False, split="test")
    assert steps[-1] == Step(15, "eval", index=2, round=2, last_in_round=True, split="test")


def test_total_for_the_default_config() -> None:
    schedule = make(
        n_train=1438, n_test=359, batch_size=64, steps=1500, eval_every=250, eval_batch_size=512
    )
    assert schedule.eval_batches == 1
    assert schedule.total == 1500 + 6 * 1


@pytest.mark.parametrize("steps,eval_every", [(6, 2), (7, 3), (4, 0), (10, 4), (1, 1)])
def test_first_seq_of_train_step_inverts_step(steps: int, eval_every: int) -> None:
    schedule = make(steps=steps, eval_every=eval_every)
    for index in range(steps):
        step = schedule.step(schedule.first_seq_of_train_step(index))
        assert (step.phase, step.index) == ("train", index)
    for seq in range(schedule.total):
        step = schedule.step(seq)
        if step.phase == "train":
            assert schedule.first_seq_of_train_step(step.index) == seq


@pytest.mark.parametrize("seq", [-1, "total", "total+1"])
def test_step_outside_the_schedule(seq: Any) -> None:
    schedule = make(steps=7, eval_every=3)
    value = {"total": schedule.total, "total+1": schedule.total + 1}.get(seq, seq)
    with pytest.raises(IndexError):
        schedule.step(value)


def test_batch_larger_than_the_train_split() -> None:
    with pytest.raises(ValueError, match="batch_size 101"):
        make(n_train=100, batch_size=101)
    assert make(n_train=100, batch_size=100).steps_per_epoch == 1


def test_schedule_for_reads_config_and_dataset_sizes() -> None:
    config = load_config(
        overrides={
            "seed": "5",
            "train.batch_size": "4",
            "train.steps": "9",
            "train.eval_every": "3",
            "reducer.eval_batch_size": "8",
        },
        env={},
    )
    dataset = SimpleNamespace(y_train=np.zeros(40), y_test=np.zeros(20))  # only sizes are read
    schedule = schedule_for(config, dataset)
    assert (schedule.n_train, schedule.n_test, schedule.seed) == (40, 20, 5)
    assert (schedule.batch_size, schedule.steps, schedule.eval_every) == (4, 9, 3)
    # data.val_fraction 0.1 by default: 4 validation rows (1 batch a round), then the 20
    # test rows once, at the end (3 batches)
    assert (schedule.n_val, schedule.eval_batches, schedule.test_batches) == (4, 1, 3)
    assert schedule.total == 9 + 3 * 1 + 3


# -- learning-rate schedule ------------------------------------------------------------------


def _train(**kw):
    return TrainConfig(**{"steps": 101, **kw})


def test_cosine_decays_from_the_base_rate_to_the_floor_at_the_last_step():
    train = _train(lr_schedule="cosine", min_lr_ratio=0.1)
    factors = [lr_factor(i, train) for i in range(101)]
    assert factors[0] == 1.0
    assert factors[50] == pytest.approx(0.55)  # half way: the mean of 1 and the floor
    assert factors[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors, factors[1:], strict=False))  # never rises
    assert lr_factor(500, train) == pytest.approx(0.1)  # past train.steps: the floor


def test_a_longer_resume_re_spans_the_cosine_over_the_new_steps():
    """docs/config.md `train.lr_schedule`: the rate is a function of the step and the config
    the process runs with now, so a run resumed with more train.steps does not stay at the
    floor it had reached: it goes on at the longer cosine's rate for that step."""
    first, longer = _train(steps=1500, min_lr_ratio=0.0), _train(steps=2000, min_lr_ratio=0.0)
    assert lr_factor(1499, first) == pytest.approx(0.0)  # the first run ends at the floor
    assert lr_factor(1500, longer) == pytest.approx(0.146, abs=1e-3)  # back up on resume
    assert lr_factor(1999, longer) == pytest.approx(0.0)  # and down to the floor again


def test_warmup_rises_linearly_then_the_schedule_starts_at_one():
    train = _train(lr_schedule="constant", warmup_steps=4)
    assert [lr_factor(i, train) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = _train(warmup_steps=4)
    assert lr_factor(4, cosine) == 1.0 and lr_factor(100, cosine) == pytest.approx(0.0)


def test_set_lr_sets_every_group():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.Adam([{"params": a.parameters()}, {"params": b.parameters(), "lr": 5.0}])
    set_lr(opt, 0.01, 50, _train(min_lr_ratio=0.0))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.005])
