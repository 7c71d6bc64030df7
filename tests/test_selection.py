"""Model selection's pure parts: the validation split (deterministic, disjoint from test, the
same rows in every process, parties included), the schedule's validation rounds, test
batches and early stop, the decision logic (best round, patience, eligibility) and the
config keys (defaults per task, errors that name the key)."""

from __future__ import annotations

import numpy as np
import pytest

from traci_ml.core.align import global_rows, split_order, validation_split
from traci_ml.core.config import load_config
from traci_ml.core.data import load_dataset
from traci_ml.core.errors import ConfigError
from traci_ml.core.schedule import Schedule, make_schedule, schedule_for
from traci_ml.core.selection import Decision, Monitor, Selector, monitor_of


def config(**sets: str):
    return load_config(overrides=sets, env={})


# ---- the split ------------------------------------------------------------------------------


def test_validation_rows_are_a_seeded_part_of_the_train_split_never_a_test_row() -> None:
    train, test = split_order(1797, 0, 0.2)
    fit, val = validation_split(len(train), 0, 0.1)
    assert len(val) == round(len(train) * 0.1) and len(fit) + len(val) == len(train)
    assert not set(fit.tolist()) & set(val.tolist())  # disjoint, and together the train split
    assert sorted([*fit.tolist(), *val.tolist()]) == list(range(len(train)))
    assert not set(train[val].tolist()) & set(test.tolist())  # never a test row
    again_fit, again_val = validation_split(len(train), 0, 0.1)  # a pure function of the seed
    assert np.array_equal(again_val, val) and np.array_equal(again_fit, fit)
    _, other = validation_split(len(train), 1, 0.1)
    assert not np.array_equal(other, val)
    every, none = validation_split(len(train), 0, 0.0)
    assert len(none) == 0 and np.array_equal(every, np.arange(len(train)))


def test_every_process_carves_the_same_validation_rows() -> None:
    """The reducer (its dataset) and an expert (the label holder's counts, as aligning tells
    it) build one schedule: the same validation rows, the same training batches."""
    cfg = config(**{"data.val_fraction": "0.15", "seed": "4"})
    ds = load_dataset(cfg)
    reducer, expert = schedule_for(cfg, ds), make_schedule(cfg, len(ds.y_train), len(ds.y_test))
    assert np.array_equal(reducer.val_rows, expert.val_rows) and reducer.n_val == 216
    first = reducer.step(0)
    assert np.array_equal(reducer.rows(first), expert.rows(expert.step(0)))
    trained = np.concatenate([reducer.rows(reducer.step(s)) for s in range(reducer.eval_every)])
    assert not set(trained.tolist()) & set(reducer.val_rows.tolist())  # never trained on


def test_parties_carve_the_same_ids_whatever_order_their_files_hold() -> None:
    """Parties: the label holder numbers its labelled ids after sorting them, so the
    validation rows are the same ids however each file orders its rows."""
    ids = np.arange(1000, 1500, dtype=np.int64)
    shuffled = np.random.default_rng(9).permutation(ids)
    a, b = global_rows(ids, 3, 0.2), global_rows(shuffled, 3, 0.2)
    _, val = validation_split(a.n_train, 3, 0.1)
    assert np.array_equal(a.train_ids[val], b.train_ids[val])
    assert not set(a.train_ids[val].tolist()) & set(a.test_ids.tolist())


# ---- the schedule ---------------------------------------------------------------------------


def make(**kw) -> Schedule:
    args = dict(n_train=100, n_test=25, seed=0, batch_size=10, steps=7, eval_every=3,
                eval_batch_size=10, val_fraction=0.1)  # fmt: skip
    return Schedule(**{**args, **kw})


def layout(s: Schedule) -> str:
    return "".join({"train": "T", "val": "V", "test": "X"}[s.step(q).split] for q in range(s.total))


def test_rounds_score_validation_rows_and_the_test_split_comes_once_at_the_end() -> None:
    s = make()
    assert layout(s) == "TTTV" + "TTTV" + "TV" + "XXX"
    assert (s.eval_rounds, s.test_round, s.n_val, s.test_batches) == (3, 3, 10, 3)
    val = [s.rows(s.step(q)) for q in range(s.total) if s.step(q).split == "val"]
    assert all(np.array_equal(v, s.val_rows) for v in val)
    test = np.concatenate([s.rows(s.step(q)) for q in range(s.test_start, s.total)])
    assert np.array_equal(test, np.arange(25))
    assert [s.steps_before(r) for r in range(3)] == [3, 6, 7]
    assert [s.round_before(q) for q in (0, 3, 4, 8, 9, 10)] == [-1, -1, 0, 1, 1, 2]


def test_early_stop_moves_the_test_batches_behind_the_round() -> None:
    s = make()
    s.stop_after(0)
    assert layout(s) == "TTTV" + "XXX" and s.total == 7
    assert s.round_before(s.test_start) == 0
    with pytest.raises(ValueError):
        make(val_fraction=0.0).stop_after(0)


def test_a_longer_resume_trains_on_the_seqs_of_the_earlier_test_batches() -> None:
    done = make()  # a finished run: every process checkpointed at or after its test batches
    longer = make(steps=10)  # resumed with more steps: its test batches come later
    assert longer.step(done.test_start).split == "train"
    assert longer.resume_at(done.total, done.test_start) == done.test_start  # no step lost
    assert longer.resume_at(5, done.test_start) == 5  # a checkpoint from before: as it was
    assert done.resume_at(done.total, done.test_start) == done.total  # the same run: no change
    stopped = make()
    stopped.stop_after(0)
    assert make().resume_at(stopped.total, stopped.test_start) == stopped.test_start
    assert make(val_fraction=0.0).resume_at(12, 4) == 12  # no validation: nothing moves


def test_batch_size_beyond_the_rows_left_for_training_names_the_validation_split() -> None:
    with pytest.raises(ValueError, match="held out for validation"):
        make(n_train=20, batch_size=19, val_fraction=0.25)


# ---- the decision ---------------------------------------------------------------------------


def test_best_is_the_best_eligible_round_and_patience_waits_for_progress() -> None:
    sel = Selector(Monitor("loss", "min", min_delta=0.01, patience=2))
    assert sel.decide(0, 0.50, eligible=True, step=10, last=False) == (True, False)
    # better, but by less than min_delta: the best weights, yet no progress for patience
    assert sel.decide(1, 0.495, eligible=True, step=20, last=False) == (True, False)
    assert sel.decide(2, 0.10, eligible=False, step=30, last=False) == (False, False)  # ignored
    assert sel.decide(3, float("nan"), eligible=True, step=40, last=False) == (False, False)
    assert sel.decide(4, 0.60, eligible=True, step=50, last=False) == (False, True)
    assert (sel.best_round, sel.best_step, sel.stopped) == (1, 20, 4)
    assert sel.decision == Decision(decided=4, best=1, stopped=4)
    again = Selector(sel.monitor)
    again.load(sel.state())
    assert again.decision == sel.decision and again.bad_rounds == 2 and again.mark == 0.50


def test_higher_is_better_for_accuracy_ties_go_later_and_the_last_round_never_stops() -> None:
    sel = Selector(Monitor("accuracy", "max", patience=1))
    assert sel.decide(0, 0.8, eligible=True, step=1, last=False) == (True, False)
    assert sel.decide(1, 0.9, eligible=True, step=2, last=False) == (True, False)
    assert sel.decide(2, 0.9, eligible=True, step=3, last=True) == (True, False)  # a tie
    assert sel.best_round == 2 and sel.stopped == -1 and sel.bad_rounds == 1
    stops = Selector(Monitor("accuracy", "max", patience=1))
    stops.decide(0, 0.8, eligible=True, step=1, last=False)
    assert stops.decide(1, 0.8, eligible=True, step=2, last=False) == (True, True)  # no progress


def test_monitor_defaults_per_task_and_bad_keys_are_named() -> None:
    assert monitor_of(config()) == Monitor("accuracy", "max")
    csv = {"data.source": "csv", "data.path": "x.csv", "data.label": "y", "data.task": "regression",
           "data.views": "[{name: a, columns: [x]}]"}  # fmt: skip
    assert monitor_of(config(**csv)) == Monitor("rmse", "min")
    assert monitor_of(config(**{**csv, "train.monitor": "r2"})).mode == "max"
    picked = config(**{"train.monitor": "loss", "train.monitor_mode": "max", "train.patience": "3"})
    assert monitor_of(picked) == Monitor("loss", "max", 0.0, 3)
    with pytest.raises(ConfigError, match="train.patience"):
        config(**{"train.patience": "2", "data.val_fraction": "0"})
    with pytest.raises(ConfigError, match="train.monitor 'rmse'"):
        config(**{"train.monitor": "rmse"})
    with pytest.raises(ConfigError, match="data.val_fraction"):
        config(**{"data.val_fraction": "1"})
    with pytest.raises(ConfigError, match="train.monitor"):
        config(**{"train.monitor": "f1"})
