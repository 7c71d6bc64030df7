"""An expert's side of model selection (docs/protocol.md "Model selection").

Before it sends its first embedding of validation round r, the expert writes the target net
it embeds that round with to ``checkpoints/expert-<i>.round-<r>.pt`` (a *candidate*): if the
reducer's EMB of round r came from it, its weights are on disk, whatever happens to the
process next. The reducer's decision reaches it on the ACKs of eval steps and on the broker's
heartbeats (``Decision``: the last round decided, the best, the round training stopped
after). On a newer decision the expert renames the best round's candidate to
``expert-<i>.best.pt`` and deletes the candidates of every round decided; with early
stopping it moves its schedule's test batches behind the round training stopped after.

Before a step that needs the decision of the round before it (the test batches, which are
embedded with the best round's target; with early stopping, every step after a round), the
expert waits for it (``blocked``). Its own last batch of the round in flight: its ACK
carries the decision, or a DROP says the reducer never judged the round with this expert
in it (the round changed nothing: ``void``). Nothing in flight (it joined after the round):
the broker's heartbeat brings the decision; with none in ``network.liveness`` seconds the
round is taken to have changed nothing (the reducer never finished it).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from torch import nn

from traci_ml.core import checkpoint
from traci_ml.core.config import Config
from traci_ml.core.errors import CheckpointError
from traci_ml.core.rundir import RunDir
from traci_ml.core.schedule import Schedule, Step, make_schedule
from traci_ml.core.selection import Decision
from traci_ml.services.expert.ledger import InFlight

log = logging.getLogger(__name__)


class ExpertSelection:
    def __init__(self, config: Config, expert_id: int, run_dir: RunDir) -> None:
        self.config, self.id, self.run_dir = config, expert_id, run_dir
        self.name = f"expert-{expert_id}"
        self.early = config.train.patience > 0  # early stopping: wait after every round
        self.heard = Decision()  # the reducer's latest decision heard
        self.assumed = -1  # rounds up to this one: no decision came, taken as no change
        self.written: set[int] = set()  # candidate rounds written by this life
        self.best_path = run_dir.expert_best(expert_id)
        self.best_round = self._round_on_disk()
        self._test_net: nn.Module | None = None
        self._waiting: tuple[int, float] | None = None  # (round, since) while blocked

    @property
    def decided(self) -> int:
        return max(self.heard.decided, self.assumed)

    def _round_on_disk(self) -> int:
        if not self.best_path.exists():
            return -1
        try:
            return checkpoint.load(self.best_path, run_id=self.config.run_id)["round"]
        except (CheckpointError, KeyError) as exc:
            log.error("%s: %s: treated as no best round", self.name, exc)
            return -1

    def fresh(self) -> None:
        """A run that starts afresh keeps no best net or candidate of an earlier one."""
        self.best_path.unlink(missing_ok=True)
        for path in self.run_dir.expert_candidates(self.id).values():
            path.unlink(missing_ok=True)
        self.best_round = -1

    # -- the decision -------------------------------------------------------------------------

    def hear(self, decision: Decision, schedule: Schedule | None) -> None:
        """An ACK's or heartbeat's decision: act on it if it is newer than the last heard."""
        if decision.decided < 0 or not decision.newer(self.heard):
            return
        self.heard = decision
        if decision.best >= 0 and decision.best != self.best_round:
            self._promote(decision.best)
        for rnd, path in self.run_dir.expert_candidates(self.id).items():
            if rnd <= decision.decided:
                path.unlink(missing_ok=True)
        if schedule is not None:
            self.apply(schedule)

    def apply(self, schedule: Schedule) -> None:
        """Early stopping on the schedule, once the decision says training stopped."""
        stopped = self.heard.stopped
        if self.early and stopped >= 0 and schedule.stopped is None and schedule.selecting:
            schedule.stop_after(stopped)
            log.info("%s: training stopped after round %d (early stopping); the test batches "
                     "follow", self.name, stopped)  # fmt: skip

    def _promote(self, rnd: int) -> None:
        candidate = self.run_dir.expert_candidate(self.id, rnd)
        if not candidate.exists():
            log.error("%s: the best round is %d, but this expert holds no target of it (%s): "
                      "its best net stays round %d", self.name, rnd, candidate.name,
                      self.best_round)  # fmt: skip
            return
        os.replace(candidate, self.best_path)
        self.best_round, self._test_net = rnd, None
        log.info("%s: round %d is the best so far", self.name, rnd)

    def void(self, step: Step) -> None:
        """Its last batch of a validation round was dropped: the reducer never judged that
        round with this expert in it, so the round changed nothing."""
        if step.split == "val" and step.last_in_round:
            self.assumed = max(self.assumed, step.round)

    def blocked(self, seq: int, schedule: Schedule, inflight: Iterable[InFlight]) -> bool:
        """Whether step ``seq`` must wait for the decision of the round before it."""
        rnd = schedule.round_before(seq)
        if rnd < 0 or self.decided >= rnd:
            self._waiting = None
            return False
        if not self.early and schedule.step(seq).split != "test":
            return False
        if any(p.step.split == "val" and p.step.round == rnd for p in inflight):
            return True  # its reply carries the decision (or says there is none)
        now = time.monotonic()
        if self._waiting is None or self._waiting[0] != rnd:
            self._waiting = (rnd, now)
        if now - self._waiting[1] < self.config.network.liveness:
            return True
        log.warning("%s: no decision on round %d in %.0fs: taken as no change", self.name, rnd,
                    self.config.network.liveness)  # fmt: skip
        self.assumed = rnd
        return False

    # -- the nets -------------------------------------------------------------------------------

    def candidate(self, step: Step, target: nn.Module, schedule: Schedule) -> None:
        """(stream) Before the first EMB of validation round ``step.round``: its target."""
        if step.split != "val" or step.round in self.written:
            return
        checkpoint.save_atomic(
            {"run_id": self.config.run_id, "expert_id": self.id, "round": step.round,
             "step": schedule.steps_before(step.round), "seq": step.seq,
             "target": target.state_dict()},
            self.run_dir.expert_candidate(self.id, step.round),
        )  # fmt: skip
        self.written.add(step.round)

    def test_net(self, target: nn.Module) -> nn.Module:
        """(stream) The net the test batches are embedded with: the best round's target, or
        the current one when no round was best."""
        if self.best_round < 0:
            return target
        if self._test_net is None:
            state = checkpoint.load(self.best_path, run_id=self.config.run_id)
            net = copy.deepcopy(target)
            net.load_state_dict(state["target"])
            self._test_net = net.eval()
        return self._test_net

    def state(self, schedule: Schedule | None) -> dict[str, Any]:
        out: dict[str, Any] = {"heard": self.heard.fields(), "assumed": self.assumed}
        if schedule is not None:  # for resume_seq: where its test batches began, its rows
            out.update(test_start=schedule.test_start, rows=[schedule.n_train, schedule.n_test])
        return out

    def restore(self, state: dict[str, Any] | None, seq_next: int) -> int:
        """The checkpoint's selection state; returns the seq to go on at
        (``Schedule.resume_at``: a longer run trains on the seqs of the earlier test
        batches), decided before HELLO from the label holder's row counts it aligned to."""
        if state is None:
            return seq_next
        self.heard = Decision(**state["heard"])
        self.assumed = state["assumed"]
        if state.get("rows") is None:
            return seq_next
        schedule = make_schedule(self.config, *state["rows"])
        if self.early and self.heard.stopped >= 0 and schedule.selecting:
            schedule.stop_after(self.heard.stopped)
        return schedule.resume_at(seq_next, state.get("test_start"))
