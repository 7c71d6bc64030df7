"""The deadline join's clock: how long a train step with its quorum waits for the rest.

A step is released when every expected expert has sent, or ``allowance`` seconds after
``quorum`` of them have (the missing tokens masked; docs/protocol.md, "Deadline join").

* The deadline is fixed (``join.deadline: 0.2``) or adaptive (``auto``): 4 x the 90th
  percentile of how long recent steps took to gather their quorum after their first token,
  never below ``join.min_deadline`` nor above the step timeout. The quorum's own spread is the
  jitter among the experts that keep up; a straggler cannot stretch it (a deadline learned
  from the last token would grow to wait for whoever is slowest).
* Each expert's lateness is an exponential average of how long its token came after the
  quorum (0 when it was among the quorum; a token that never came counts the time waited).
  While every awaited expert's lateness is within half a deadline, the step waits ``grace``
  deadlines: one hiccup of a punctual expert does not cost it its token (today's exactness
  where nobody is late). A straggler is late step after step, loses the grace within a few
  steps, and is waited for one deadline only: the others go at their own pace.
* The first ``WARMUP`` train steps of a run wait for everyone (start-up is uneven: first
  calls, caches; and nothing is learned yet).

No sockets, no clock of its own: times come in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable

from traci_ml.core.config import JoinConfig

SPREADS = 64  # steps the adaptive deadline looks back on
WARMUP = 16  # steps seen before an adaptive deadline applies (until then: wait for all)
REFRESH = 8  # new spreads between recomputations of the percentile
WEIGHT = 0.1  # EWMA weight of one step in an expert's lateness
PUNCTUAL = 0.5  # lateness within this many deadlines earns the grace


class Deadline:
    def __init__(
        self,
        quorum: int,
        *,
        fixed: float | None,
        min_deadline: float,
        grace: float,
        ceiling: float,
    ) -> None:
        self.quorum = quorum
        self.fixed, self.min_deadline, self.grace = fixed, min_deadline, grace
        self.ceiling = max(ceiling, min_deadline)  # never past the step timeout
        self._spreads: deque[float] = deque(maxlen=SPREADS)
        self._seen = 0  # train steps observed
        self.current = fixed if fixed is not None else min_deadline
        self.lateness: dict[int, float] = {}  # expert id -> EWMA of seconds after the quorum

    @classmethod
    def from_config(cls, join: JoinConfig, n_experts: int, step_timeout: float) -> Deadline:
        return cls(
            join.quorum_of(n_experts),
            fixed=None if join.deadline == "auto" else float(join.deadline),
            min_deadline=join.min_deadline,
            grace=join.grace,
            ceiling=step_timeout,
        )

    def allowance(self, awaited: Iterable[int]) -> float:
        """Seconds after the quorum a step waits for ``awaited`` (the grace while all of
        them have been punctual)."""
        if self.fixed is None and self._seen < WARMUP:  # nothing learned yet
            return self.ceiling
        late, limit = self.lateness, PUNCTUAL * self.current
        if all(late.get(e, 0.0) <= limit for e in awaited):
            return min(self.current * self.grace, self.ceiling)
        return self.current

    def arrived(self, expert_id: int, after_quorum: float) -> None:
        """A train step's token came ``after_quorum`` seconds after its quorum (0: within)."""
        old = self.lateness.get(expert_id, 0.0)
        self.lateness[expert_id] = old + WEIGHT * (after_quorum - old)

    def observe(
        self,
        first_at: float,
        quorum_at: float | None,
        now: float,
        expected: Collection[int],
        present: Collection[int],
    ) -> None:
        """A train step released at ``now``: the experts of ``expected`` not ``present``
        count the time waited as their lateness; its quorum's spread (``quorum_at -
        first_at``) feeds the adaptive deadline."""
        if quorum_at is None:
            return
        for e in expected:
            if e not in present:
                self.arrived(e, now - quorum_at)
        self._seen += 1
        if self.fixed is None:
            self._spreads.append(max(0.0, quorum_at - first_at))
            if self._seen % REFRESH == 0:
                ordered = sorted(self._spreads)
                p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
                self.current = min(max(self.min_deadline, 4.0 * p90), self.ceiling)
