"""Prometheus metrics of one expert, in its own registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from traci_ml import proto
from traci_ml.core.observe import LATENCY_BUCKETS, RunEnd

EXPERT_REASONS = ("unknown_step", "misrouted", "conflict", "unexpected_kind", "internal",
                  *proto.VALUE_REASONS)  # fmt: skip
# Reasons a step ends without a reply applied (traci_expert_steps_dropped{reason}): every
# reason a DROP carries (the broker's, and the reducer's it forwards), a GRAD refused for its
# values (VALUE_REASONS, among them), no reply within expert.step_timeout ("timeout", as the
# broker's), and the expert's own: the broker went away, a resync, its own shutdown.
LOST_REASONS = (*proto.DROP_REASONS, "broker_lost", "resync", "shutdown")


class ExpertMetrics:
    def __init__(self, expert_id: int) -> None:
        self.registry = CollectorRegistry()
        self.run_end = RunEnd(self.registry)  # traci_run_finished
        labels = {"expert": str(expert_id)}
        r = self.registry
        self.sent = Counter(
            "traci_expert_embeddings_sent", "EMB messages sent", ["expert", "phase"], registry=r
        )
        self.applied = Counter(
            "traci_expert_gradients_applied", "gradients applied (train)", ["expert"], registry=r
        ).labels(**labels)
        self.acked = Counter(
            "traci_expert_eval_acked", "eval steps acknowledged", ["expert"], registry=r
        ).labels(**labels)
        self.dropped = Counter(
            "traci_expert_steps_dropped",
            "steps that never got a reply",
            ["expert", "reason"],
            registry=r,
        )
        self.skipped = Counter(
            "traci_expert_steps_skipped",
            "train steps never sent: skipped ahead to where the other experts are (late)",
            ["expert"],
            registry=r,
        ).labels(**labels)
        self.inflight = Gauge(
            "traci_expert_inflight_steps", "steps sent, reply pending", ["expert"], registry=r
        ).labels(**labels)
        self.roundtrip = Histogram(
            "traci_expert_grad_roundtrip_seconds",
            "EMB sent -> GRAD/ACK received",
            ["expert"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(**labels)
        self.staleness = Histogram(
            "traci_expert_staleness_steps",
            "optimizer steps taken between sending a step and applying its gradient",
            ["expert"],
            buckets=(0, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        ).labels(**labels)
        self.seq = Gauge("traci_expert_seq", "next seq to send", ["expert"], registry=r).labels(
            **labels
        )
        self.rows_held = Gauge(
            "traci_expert_rows_held",
            "labelled rows this expert holds, by split (parties: after id alignment)",
            ["expert", "split"],
            registry=r,
        )
        self.overlap = Gauge(
            "traci_expert_overlap_ratio",
            "labelled rows this expert holds / labelled rows",
            ["expert"],
            registry=r,
        ).labels(**labels)
        self.rejections = Counter(
            "traci_expert_rejections",
            "messages rejected, by reason",
            ["expert", "reason"],
            registry=r,
        )
        self.queries = Counter(
            "traci_expert_queries",
            "served QUERYs answered, by status (ok, missing_columns, non_finite, too_large, "
            "internal)",
            ["expert", "status"],
            registry=r,
        )
        self._served: dict[str, Any] = {}  # status -> its child of queries
        self.query_time = Histogram(
            "traci_expert_query_seconds",
            "QUERY received -> QEMB sent",
            ["expert"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(**labels)
        for status in ("ok", "missing_columns", *proto.VALUE_REASONS, "internal"):
            self.queries.labels(status=status, **labels)
        for phase in proto.PHASES:
            self.sent.labels(phase=phase, **labels)
        self.wire = Counter(
            "traci_expert_wire_bytes",
            "tensor bytes on the wire: EMB sent, GRAD received (docs/compression.md)",
            ["expert", "direction"],
            registry=r,
        )
        for direction in ("sent", "received"):
            self.wire.labels(direction=direction, **labels)
        for reason in LOST_REASONS:
            self.dropped.labels(reason=reason, **labels)
        for reason in (*proto.REJECT_REASONS, *EXPERT_REASONS):
            self.rejections.labels(reason=reason, **labels)
        self._labels = labels

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason=reason, **self._labels).inc()

    def served(self, status: str, seconds: float) -> None:
        child = self._served.get(status)
        if child is None:  # .labels() resolves the child each time: once per status
            child = self._served[status] = self.queries.labels(status=status, **self._labels)
        child.inc()
        self.query_time.observe(seconds)

    def wire_bytes(self, direction: str, n: int) -> None:
        self.wire.labels(direction=direction, **self._labels).inc(n)

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped.labels(reason=reason, **self._labels).inc(n)
