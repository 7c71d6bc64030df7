"""Which of a run's checkpoints a trained model is loaded from (``traci predict``, ``traci
export``): the best validation round's (``expert-<i>.best.pt``, ``reducer.best.pt``, all of
one round: docs/config.md "Model selection") or the last weights (``expert-<i>.pt``,
``reducer.pt``). By default the best, and the last where a run has no best checkpoints (one
trained before model selection, or with ``data.val_fraction: 0``), saying so."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from traci_ml.core import checkpoint
from traci_ml.core.errors import CheckpointError
from traci_ml.core.rundir import RunDir

log = logging.getLogger(__name__)
CHOICES = ("best", "last")


@dataclass(frozen=True)
class Chosen:
    which: str  # "best" or "last"
    experts: list[Path]  # one per expert, in id order
    reducer: Path
    round: int | None = None  # best: the validation round, and the train steps before it
    step: int | None = None


def choose(
    run: RunDir, n_experts: int, run_id: str, which: str | None = None, *, selects: bool = True
) -> Chosen:
    """``which`` "last": the last weights; "best": the best round's, or a one-line
    ``CheckpointError`` saying why the run has none; None: the best round's when the run has
    them, else the last (with a warning naming why, unless the run does not ``selects``: it
    has no validation split, so the last weights are its model)."""
    last = Chosen("last", [run.expert_checkpoint(i) for i in range(n_experts)],
                  run.reducer_checkpoint)  # fmt: skip
    if which not in (None, *CHOICES):
        raise CheckpointError(f"--checkpoint {which!r}: use one of {', '.join(CHOICES)}")
    if which == "last":
        return last
    try:
        best = _best(run, n_experts, run_id)
    except CheckpointError as exc:
        if which == "best":
            raise CheckpointError(f"{exc}; --checkpoint last uses the last weights") from None
        (log.warning if selects else log.info)("%s: using the last weights", exc)
        return last
    return best


def _best(run: RunDir, n_experts: int, run_id: str) -> Chosen:
    paths = run.best_checkpoints(n_experts)
    missing = [p.name for p in paths if not p.exists()]
    if len(missing) == len(paths):
        raise CheckpointError(f"{run.checkpoints} has no best checkpoints (a run without a "
                              "validation split, data.val_fraction 0, or from before model "
                              "selection)")  # fmt: skip
    if missing:
        raise CheckpointError(f"{run.checkpoints} lacks {', '.join(missing)} (best checkpoints "
                              "of other services are there)")  # fmt: skip
    marks = []
    for i, path in enumerate(paths):
        expect = {"expert_id": i} if i < n_experts else {}
        state = checkpoint.load(path, run_id=run_id, **expect)
        marks.append((state.get("round"), state.get("step")))
    if len({r for r, _ in marks}) != 1:
        rounds = ", ".join(f"{p.name}: round {r}" for p, (r, _) in zip(paths, marks, strict=True))
        raise CheckpointError(f"the best checkpoints are of different rounds ({rounds}): "
                              "did the run end before its experts heard the decision?")  # fmt: skip
    rnd, step = marks[-1]  # the reducer's
    return Chosen("best", paths[:-1], paths[-1], rnd, step)
