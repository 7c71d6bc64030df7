"""The broker's Prometheus metrics, in a registry of their own.

Every labelled series that can appear is created up front (each rejection and drop reason,
each expert id), so dashboards and alerts read 0 rather than "no data" before the first event.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from traci_ml.observe import LATENCY_BUCKETS
from traci_ml.proto import KINDS, REJECT_REASONS

# Reasons the broker adds to proto.REJECT_REASONS in traci_broker_rejections_total{reason}.
BROKER_REASONS = (
    "unregistered",  # message from a peer that has not said HELLO (answered GOODBYE)
    "impersonation",  # EMB with an expert_id its peer did not register
    "duplicate",  # second EMB for the same (seq, expert)
    "late",  # EMB for a step already released (DROP)
    "too_far_ahead",  # EMB beyond max_pending_steps (DROP)
    "conflict",  # EMB phase/shape/dtype differs from the step's or the config's (DROP)
    "window",  # expert already holds expert.window steps in flight (DROP)
    "not_started",  # EMB before the start gate opened (the peer has no WELCOME yet) (DROP)
    "unknown_step",  # GRAD/ACK for a seq that awaits no reply
    "grad_mismatch",  # GRAD whose tensors do not match the BATCH (step DROPped)
    "unexpected_kind",  # a valid kind on the wrong socket (e.g. BATCH from an expert)
    "refused",  # HELLO refused (WELCOME ok=false)
    "internal",  # a bug handling one message; logged with traceback
)
# Reasons a step is dropped (DROP to its experts): traci_broker_steps_dropped_total{reason}.
DROP_REASONS = (
    "late",
    "too_far_ahead",
    "conflict",
    "window",
    "reducer_lost",
    "grad_mismatch",
    "timeout",
    "reducer_rejected",  # the reducer answered a BATCH with DROP
)
DIRECTIONS = ("in", "out")


class BrokerMetrics:
    """Counters, gauges and histograms of one broker; ``registry`` is what gets served."""

    def __init__(self, n_experts: int, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.queue_latency = Histogram(
            "traci_broker_queue_latency_seconds",
            "Time from a step's first EMB to its BATCH dispatch to the reducer.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.join_wait = Histogram(
            "traci_broker_join_wait_seconds",
            "Time from a step's first EMB until it was released (all expected EMBs in).",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.pending_steps = Gauge(
            "traci_broker_pending_steps",
            "Steps joining or ready, not yet dispatched.",
            registry=reg,
        )
        self.dispatched_steps = Gauge(
            "traci_broker_dispatched_steps",
            "Steps sent to the reducer, not answered.",
            registry=reg,
        )
        self.registered_experts = Gauge(
            "traci_broker_registered_experts", "Experts that have registered.", registry=reg
        )
        self.live_experts = Gauge(
            "traci_broker_live_experts", "Experts registered and alive.", registry=reg
        )
        self.expert_up = Gauge(
            "traci_broker_expert_up",
            "1 while expert is registered and alive.",
            ["expert"],
            registry=reg,
        )
        self.reducer_up = Gauge(
            "traci_broker_reducer_up", "1 while a reducer is registered and alive.", registry=reg
        )
        self.messages = Counter(
            "traci_broker_messages_total",
            "Messages by kind and direction (in/out).",
            ["kind", "direction"],
            registry=reg,
        )
        self.rejections = Counter(
            "traci_broker_rejections_total",
            "Messages rejected, by reason.",
            ["reason"],
            registry=reg,
        )
        self.steps_released = Counter(
            "traci_broker_steps_released_total", "Steps joined and released.", registry=reg
        )
        self.steps_skipped = Counter(
            "traci_broker_steps_skipped_total",
            "Steps no live expert was expected in.",
            registry=reg,
        )
        self.steps_dropped = Counter(
            "traci_broker_steps_dropped_total",
            "Steps answered with DROP, by reason.",
            ["reason"],
            registry=reg,
        )
        # Every labelled child is made once here and kept: labels() per message costs more
        # than the increment itself on the broker's hot path.
        self._rejections = {
            reason: self.rejections.labels(reason=reason)
            for reason in (*REJECT_REASONS, *BROKER_REASONS)
        }
        for reason in DROP_REASONS:
            self.steps_dropped.labels(reason=reason)
        for expert_id in range(n_experts):
            self.expert_up.labels(expert=str(expert_id))
        self._messages = {
            (kind, direction): self.messages.labels(kind=kind, direction=direction)
            for kind in (*KINDS, "invalid")
            for direction in DIRECTIONS
        }

    def message(self, kind: str, direction: str) -> None:
        child = self._messages.get((kind, direction))
        if child is None:
            child = self._messages[kind, direction] = self.messages.labels(kind, direction)
        child.inc()

    def reject(self, reason: str) -> None:
        child = self._rejections.get(reason)
        if child is None:
            child = self._rejections[reason] = self.rejections.labels(reason=reason)
        child.inc()

    def set_state(
        self,
        *,
        pending: int,
        dispatched: int,
        registered: int,
        live: int,
        expert_up: Mapping[int, bool],
        reducer_up: bool,
    ) -> None:
        """Refresh the gauges from the join book (called on every tick)."""
        self.pending_steps.set(pending)
        self.dispatched_steps.set(dispatched)
        self.registered_experts.set(registered)
        self.live_experts.set(live)
        for expert_id, up in expert_up.items():
            self.expert_up.labels(expert=str(expert_id)).set(1 if up else 0)
        self.reducer_up.set(1 if reducer_up else 0)
