"""Model selection: which validation round is the best model, and when training stops early.

The reducer scores each validation round and decides (``Selector``); the decision is three
numbers (``Decision``: the last round decided, the best round, the round training stopped
after) that travel to the experts on the ACK of every eval step and on the broker's
heartbeats (docs/protocol.md "Model selection"). Each service keeps the weights of the best
round itself: the reducer its own, each expert the target net it embedded that round with.
Pure logic here, no files and no sockets: ``services/reducer/selection.py`` and
``services/expert/selection.py`` hold the rest.

A round counts only when it is *eligible*: every one of its validation batches reached the
reducer, each with every expert present. A round some expert missed (a restart, a timeout)
scored another model than the one the services would keep, so it can neither become the
best nor use up patience.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only
    from traci_ml.core.config import Config

# "auto": what each task's best round is chosen by (docs/config.md)
DEFAULT_MONITOR = {"classification": "accuracy", "regression": "rmse"}
MODES = {"loss": "min", "accuracy": "max", "rmse": "min", "r2": "max"}


@dataclass(frozen=True)
class Monitor:
    """The metric a validation round is judged by, and what counts as better."""

    name: str  # "loss", "accuracy", "rmse" or "r2": a field of the round's eval record
    mode: str  # "min" or "max"
    min_delta: float = 0.0  # an improvement must exceed this
    patience: int = 0  # rounds in a row without improvement that stop training (0: never)

    def better(self, value: float, than: float) -> bool:
        """Whether ``value`` improves on ``than`` by more than ``min_delta`` (progress:
        what patience waits for)."""
        if self.mode == "min":
            return value < than - self.min_delta
        return value > than + self.min_delta

    def as_good(self, value: float, than: float) -> bool:
        """Whether ``value`` is at least as good as ``than``: a later round that ties the
        best has trained longer, and takes its place (a small validation set ties often)."""
        return value <= than if self.mode == "min" else value >= than


def monitor_of(config: Config) -> Monitor:
    """``train.monitor`` / ``monitor_mode`` / ``min_delta`` / ``patience``, "auto" resolved."""
    train = config.train
    name = DEFAULT_MONITOR[config.task] if train.monitor == "auto" else train.monitor
    mode = MODES[name] if train.monitor_mode == "auto" else train.monitor_mode
    return Monitor(name, mode, train.min_delta, train.patience)


@dataclass(frozen=True)
class Decision:
    """What every service needs to know of model selection (-1: none): the last validation
    round decided, the best round so far, and the round training stopped after. A later
    decision (higher ``decided``) supersedes an earlier one."""

    decided: int = -1
    best: int = -1
    stopped: int = -1

    @classmethod
    def of(cls, msg: Any) -> Decision:
        """The decision a message carries (ACK, HEARTBEAT, the reducer's HELLO)."""
        return cls(msg.decided, msg.best, msg.stopped)

    def fields(self) -> dict[str, int]:
        """As the messages' keyword arguments (``proto.SELECTION``)."""
        return asdict(self)

    def newer(self, than: Decision) -> bool:
        return self.decided > than.decided


class Selector:
    """The reducer's side: after each validation round, ``decide`` says whether it is the new
    best and whether training stops. Its ``state`` goes into the reducer's checkpoint."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.decided = -1
        self.best_round = -1
        self.best_value: float | None = None
        self.best_step = -1  # train steps before the best round
        self.mark: float | None = None  # the value of the last progress (by min_delta)
        self.bad_rounds = 0  # eligible rounds since the last progress
        self.stopped = -1

    @property
    def decision(self) -> Decision:
        return Decision(self.decided, self.best_round, self.stopped)

    def decide(
        self, rnd: int, value: float | None, *, eligible: bool, step: int, last: bool
    ) -> tuple[bool, bool]:
        """Round ``rnd`` scored ``value`` after ``step`` train steps: (it is the new best,
        training stops after it). ``last``: the schedule's final round (nothing to stop)."""
        self.decided = max(self.decided, rnd)
        if not eligible or value is None or not math.isfinite(value) or self.stopped >= 0:
            return False, False
        first = self.best_value is None
        if first or self.monitor.better(value, self.mark):  # progress: patience starts again
            self.mark, self.bad_rounds = value, 0
        else:
            self.bad_rounds += 1
        best = first or self.monitor.as_good(value, self.best_value)
        if best:
            self.best_round, self.best_value, self.best_step = rnd, value, step
        stop = 0 < self.monitor.patience <= self.bad_rounds and not last
        if stop:
            self.stopped = rnd
        return best, stop

    def adopt(self, rnd: int, value: float, step: int) -> None:
        """A best round written to disk whose decision the checkpoint missed (the reducer
        died between the two writes): it is the best, decided."""
        self.best_round, self.best_value, self.best_step = rnd, value, step
        self.decided = max(self.decided, rnd)
        if self.mark is None or self.monitor.better(value, self.mark):
            self.mark, self.bad_rounds = value, 0

    def state(self) -> dict[str, Any]:
        return {
            "decided": self.decided,
            "best_round": self.best_round,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "mark": self.mark,
            "bad_rounds": self.bad_rounds,
            "stopped": self.stopped,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.decided, self.best_round = state["decided"], state["best_round"]
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.mark = state.get("mark", self.best_value)
        self.bad_rounds, self.stopped = state["bad_rounds"], state["stopped"]
