"""Prometheus metrics of the reducer, in its own registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from traci_ml import proto
from traci_ml.core.observe import LATENCY_BUCKETS, RunEnd

REDUCER_REASONS = ("replay", "unknown_step", "conflict", "unexpected_kind", "internal",
                   "align_throttled", *proto.VALUE_REASONS)  # fmt: skip
# Why a train step was computed but not applied (DROP to its experts instead of GRAD).
REFUSED_REASONS = ("non_finite_loss", "non_finite_grad", "too_large", "no_rows")


class ReducerMetrics:
    def __init__(self, n_experts: int) -> None:
        self.registry = r = CollectorRegistry()
        self.run_end = RunEnd(r)  # traci_run_finished
        self.loss = Gauge("traci_reducer_loss", "training loss (moving average)", registry=r)
        self.train_metric = Gauge(
            "traci_reducer_train_metric",
            "training accuracy (classification) or RMSE (regression), moving average",
            registry=r,
        )
        self.eval_loss = Gauge("traci_reducer_eval_loss", "last held-out loss", registry=r)
        self.eval_metric = Gauge(
            "traci_reducer_eval_metric",
            "last held-out accuracy (classification) or RMSE (regression)",
            registry=r,
        )
        self.step_time = Histogram(
            "traci_reducer_step_seconds",
            "BATCH received -> reply sent and optimizer stepped",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.steps = Counter("traci_reducer_steps", "steps processed", ["phase"], registry=r)
        self.samples = Counter("traci_reducer_samples", "training samples processed", registry=r)
        self.skipped = Counter(
            "traci_reducer_steps_skipped", "seqs that never arrived (lost upstream)", registry=r
        )
        self.refused = Counter(
            "traci_reducer_steps_refused",
            "train steps not applied (optimizer not stepped, DROP sent instead of GRAD): "
            "a non-finite loss or gradient, or a gradient beyond security.max_abs_value",
            ["reason"],
            registry=r,
        )
        self.rows_skipped = Counter(
            "traci_reducer_rows_skipped",
            "labelled rows left out of a step: no expert holds them (no_expert), or not every "
            "expert does while data.train_rows is shared (not_shared)",
            ["phase", "reason"],
            registry=r,
        )
        self.overlap = Gauge(
            "traci_reducer_expert_overlap_ratio",
            "labelled rows an expert holds / labelled rows (parties, as the expert reported)",
            ["expert"],
            registry=r,
        )
        self.eval_by_present = Gauge(
            "traci_reducer_eval_metric_by_experts_present",
            "last held-out metric over the rows with this many experts present",
            ["present"],
            registry=r,
        )
        self.present = Gauge(
            "traci_reducer_experts_present", "experts present in the last batch", registry=r
        )
        self.participation = Gauge(
            "traci_reducer_participation",
            "share of the train steps so far in which this expert took part (its token present)",
            ["expert"],
            registry=r,
        )
        self.attention = Gauge(
            "traci_reducer_attention",
            "mean [CLS] attention weight each expert receives",
            ["expert", "phase"],
            registry=r,
        )
        self.rejections = Counter(
            "traci_reducer_rejections", "messages rejected, by reason", ["reason"], registry=r
        )
        self.queries = Counter(
            "traci_reducer_queries", "served QBATCHes answered, by status", ["status"], registry=r
        )
        self._served: dict[str, Any] = {}  # status -> its child of queries
        self.query_time = Histogram(
            "traci_reducer_query_seconds",
            "QBATCH received -> QOUT sent",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for reason in REFUSED_REASONS:
            self.refused.labels(reason=reason)
        for status in ("ok", "conflict", *proto.VALUE_REASONS, "internal"):
            self.queries.labels(status=status)
        for phase in proto.PHASES:
            self.steps.labels(phase=phase)
            self.step_time.labels(phase=phase)
            for i in range(n_experts):
                self.attention.labels(expert=str(i), phase=phase)
        for i in range(n_experts):  # every series from the start (dashboards, alerts)
            self.participation.labels(expert=str(i))
        self.wire = Counter(
            "traci_reducer_wire_bytes",
            "tensor bytes on the wire: BATCH received, GRAD sent (docs/compression.md)",
            ["direction"],
            registry=r,
        )
        for direction in ("received", "sent"):
            self.wire.labels(direction=direction)
        for reason in (*proto.REJECT_REASONS, *REDUCER_REASONS):
            self.rejections.labels(reason=reason)
        self.tracking_failures = Counter(
            "traci_reducer_tracking_failures",
            "experiment tracking calls that failed (tracking.*: tensorboard, mlflow); training "
            "goes on, docs/tracking.md",
            ["tracker"],
            registry=r,
        )

    def served(self, status: str, seconds: float) -> None:
        child = self._served.get(status)
        if child is None:  # .labels() resolves the child each time: once per status
            child = self._served[status] = self.queries.labels(status=status)
        child.inc()
        self.query_time.observe(seconds)

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()
