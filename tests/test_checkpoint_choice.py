"""Which checkpoints `traci predict` and `traci export` load (app/checkpoints.py): the best
validation round's when every service has one of the same round; otherwise the last weights,
saying why -- or, when the best were asked for by name, a one-line error."""

from __future__ import annotations

import logging

import pytest

from traci_ml.app.checkpoints import choose
from traci_ml.core import checkpoint
from traci_ml.core.errors import CheckpointError
from traci_ml.core.rundir import RunDir

RUN = "choice"


def best_files(run: RunDir, rounds: list[int]) -> None:
    """Best checkpoints of two experts and the reducer, of these rounds."""
    for i, rnd in enumerate(rounds[:-1]):
        checkpoint.save_atomic({"run_id": RUN, "expert_id": i, "round": rnd, "step": 10 * rnd},
                               run.expert_best(i))  # fmt: skip
    checkpoint.save_atomic({"run_id": RUN, "round": rounds[-1], "step": 10 * rounds[-1]},
                           run.reducer_best)  # fmt: skip


def test_the_best_round_when_every_service_has_it(tmp_path) -> None:
    run = RunDir(tmp_path)
    best_files(run, [2, 2, 2])
    chosen = choose(run, 2, RUN)
    assert (chosen.which, chosen.round, chosen.step) == ("best", 2, 20)
    assert chosen.experts == [run.expert_best(0), run.expert_best(1)]
    assert chosen.reducer == run.reducer_best
    last = choose(run, 2, RUN, "last")
    assert last.which == "last" and last.reducer == run.reducer_checkpoint


def test_without_best_checkpoints_the_last_weights_saying_so(tmp_path, caplog) -> None:
    run = RunDir(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert choose(run, 2, RUN).which == "last"
    assert "has no best checkpoints" in caplog.text and "using the last weights" in caplog.text
    with pytest.raises(CheckpointError, match="no best checkpoints.*--checkpoint last"):
        choose(run, 2, RUN, "best")
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a run without a validation split: its model
        assert choose(run, 2, RUN, selects=False).which == "last"
    assert caplog.text == ""


@pytest.mark.parametrize("rounds,words", [([1, 2, 2], "different rounds"), ([1, 1], "lacks")])
def test_best_checkpoints_that_disagree_are_never_mixed(tmp_path, rounds, words) -> None:
    run = RunDir(tmp_path)
    best_files(run, rounds)
    assert choose(run, 2, RUN).which == "last"
    with pytest.raises(CheckpointError, match=words):
        choose(run, 2, RUN, "best")
