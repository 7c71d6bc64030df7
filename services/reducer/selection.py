"""The reducer's side of model selection (docs/protocol.md "Model selection"): which
validation rounds are eligible, the decision after each (``core/selection.py``), the best
round's weights (``checkpoints/reducer.best.pt``), early stopping, and the model the test
batches are scored with (the best round's).

Order of writes at a decision: the best weights, then the reducer's checkpoint (which holds
the decision), then the ACK that tells the experts. A reducer that dies between the first
two finds a best file newer than its checkpoint when it resumes and adopts it
(``reconcile``): the experts hold that round's targets as candidates, and hear the decision
from its HELLO through the broker's heartbeats. A decision announced is always in the
checkpoint, so a resumed reducer never takes one back.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from torch import nn

from traci_ml import proto
from traci_ml.core import checkpoint
from traci_ml.core.config import Config
from traci_ml.core.errors import CheckpointError
from traci_ml.core.rundir import RunDir
from traci_ml.core.schedule import Schedule, Step
from traci_ml.core.selection import Decision, Selector, monitor_of

log = logging.getLogger(__name__)


class ReducerSelection:
    def __init__(self, config: Config, schedule: Schedule, run_dir: RunDir) -> None:
        self.config, self.schedule = config, schedule
        self.monitor = monitor_of(config)
        self.selector = Selector(self.monitor)
        self.path: Path = run_dir.reducer_best
        # the validation round in progress: its number, batches seen in order, all present
        self._round, self._seen, self._whole = -1, 0, False
        self._test_model: nn.Module | None = None
        self._test_start: int | None = None  # where the restored run's test batches began

    @property
    def on(self) -> bool:
        """Whether the run selects (it has a validation split)."""
        return self.schedule.selecting

    @property
    def decision(self) -> Decision:
        return self.selector.decision

    def ack(self, seq: int) -> proto.Ack:
        """The ACK of eval step ``seq``, with the decision so far when selecting."""
        return proto.Ack(seq, **self.decision.fields()) if self.on else proto.Ack(seq)

    def saw(self, step: Step, present: tuple[bool, ...]) -> None:
        """A validation batch reached the model: track whether its round stays whole (every
        batch, in order, every expert present)."""
        if step.round != self._round:
            self._round, self._seen, self._whole = step.round, 0, step.index == 0
        self._whole = self._whole and step.index == self._seen and all(present)
        self._seen += 1

    def eligible(self, step: Step) -> bool:
        """Whether round ``step.round`` (its last batch just seen) scored the whole model."""
        return (
            self._round == step.round and self._whole and self._seen == self.schedule.eval_batches
        )

    def decide(
        self, step: Step, record: dict[str, Any], model: nn.Module, *, train_steps: int, seq: int
    ) -> tuple[bool, bool]:
        """After validation round ``step.round``: (new best, stop). A new best's weights are
        written to ``reducer.best.pt`` here; the caller then checkpoints, then ACKs."""
        eligible = self.eligible(step)
        last = step.round == self.schedule.eval_rounds - 1
        at = self.schedule.steps_before(step.round)  # the round's step, as experts know it
        improved, stop = self.selector.decide(
            step.round, record.get(self.monitor.name), eligible=eligible, step=at, last=last
        )
        record.update(eligible=eligible, best=improved)
        if improved:
            checkpoint.save_atomic(
                {
                    "run_id": self.config.run_id,
                    "model": model.state_dict(),
                    "round": step.round,
                    "step": at,
                    "trained_steps": train_steps,  # train steps this reducer applied
                    "seq": seq,
                    "monitor": self.monitor.name,
                    "value": record[self.monitor.name],
                },
                self.path,
            )
        if stop:
            self.schedule.stop_after(step.round)
            log.info("reducer: early stopping after round %d (step %d): no %s improvement "
                     "in %d rounds; best round %d (step %d)", step.round, at,
                     self.monitor.name, self.selector.bad_rounds, self.selector.best_round,
                     self.selector.best_step)  # fmt: skip
        return improved, stop

    def test_model(self, model: nn.Module) -> nn.Module:
        """The model the test split is scored with: the best round's weights (a copy:
        ``model`` keeps the last weights, the checkpoint's), or ``model`` with no best."""
        if not self.on or self.selector.best_round < 0:
            return model
        if self._test_model is None:
            state = checkpoint.load(self.path, run_id=self.config.run_id)
            if state.get("round") != self.selector.best_round:
                raise CheckpointError(f"{self.path} holds round {state.get('round')}, the "
                                      f"decision says {self.selector.best_round}")  # fmt: skip
            best = copy.deepcopy(model)
            best.load_state_dict(state["model"])
            self._test_model = best.eval()
        return self._test_model

    # -- checkpoint, resume -----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {**self.selector.state(), "test_start": self.schedule.test_start}

    def restore(self, state: dict[str, Any] | None) -> None:
        if state is not None:
            self.selector.load(state)
            self._test_start = state.get("test_start")
        if not self.monitor.patience:  # early stopping turned off for this session
            self.selector.stopped = -1

    def reconcile(self, last_seq: int) -> int:
        """Resume: adopt a best file the checkpoint missed; apply early stopping to the
        schedule. Returns the seq to continue after (never before the best round's)."""
        if self.on and self.path.exists():
            try:
                best = checkpoint.load(self.path, run_id=self.config.run_id)
            except CheckpointError as exc:
                log.error("reducer: %s; the best round is taken from the checkpoint", exc)
            else:
                if best["round"] > self.selector.best_round:
                    log.warning("reducer: %s (round %d) is newer than the checkpoint's "
                                "decision: adopted", self.path.name, best["round"])  # fmt: skip
                    self.selector.adopt(best["round"], best["value"], best["step"])
                    last_seq = max(last_seq, best["seq"])
        if self.selector.stopped >= 0:
            self.schedule.stop_after(self.selector.stopped)
        return self.schedule.resume_at(last_seq + 1, self._test_start) - 1

    def fresh(self) -> None:
        """A run that starts afresh keeps no best weights of an earlier one."""
        self.path.unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        """summary.json's ``best`` and ``stop_reason``."""
        sel = self.selector
        if not self.on:
            return {"best": None, "stop_reason": "steps_exhausted"}
        best = None
        if sel.best_round >= 0:
            best = {"round": sel.best_round, "step": sel.best_step, "monitor": self.monitor.name,
                    "mode": self.monitor.mode, "value": sel.best_value}  # fmt: skip
        reason = "early_stopping" if sel.stopped >= 0 else "steps_exhausted"
        return {"best": best, "stop_reason": reason, "patience": self.monitor.patience}
