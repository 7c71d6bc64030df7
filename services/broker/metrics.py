"""The broker's Prometheus metrics, in a registry of their own.

Every labelled series that can appear is created up front (each rejection and drop reason,
each expert id), so dashboards and alerts read 0 rather than "no data" before the first event.

The per-message figures (messages by kind, steps released, join wait and queue latency per
step) are counted in plain ints and deques on the broker's hot path -- a prometheus-client
``inc``/``observe`` takes a lock and costs more than the rest of forwarding a message -- and
``flush`` moves them into the real metrics. A collector registered ahead of every metric
flushes on each scrape (so a scrape always sees every message and every step), and the
broker's tick flushes too, so nothing piles up when nobody scrapes.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from traci_ml.core.observe import LATENCY_BUCKETS, RunEnd
from traci_ml.proto import (
    ALIGN_STAGES,
    BROKER_DROP_REASONS,
    KINDS,
    REJECT_REASONS,
    SERVE_HOPS,
)

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
    "unknown_query",  # QEMB/QOUT for a served query not awaiting it (late, or not asked)
    "too_large",  # a finite value beyond security.max_abs_value (EMB: DROP; GRAD: step DROPped)
    "held",  # HELLO for an id a live registration holds (WELCOME ok=false "held: ...")
    "wrong_key",  # CURVE: HELLO for a role or id its key was not issued for
    "wrong_route",  # CURVE: a message on a route registered with another key
    "align_undeliverable",  # the reducer's ALIGN for an expert that is not registered (dropped)
)
# Reasons a step is dropped (DROP to its experts): traci_broker_steps_dropped_total{reason}.
# The broker's own are the protocol's; a step the reducer refused (its experts get the
# reducer's reason) is counted once here, as reducer_rejected. An EMB refused for another
# reason (malformed, not_started) counts that reason too, its series made when first seen.
DROPPED_REASONS = (*BROKER_DROP_REASONS, "reducer_rejected")
DIRECTIONS = ("in", "out")


class BrokerMetrics:
    """Counters, gauges and histograms of one broker; ``registry`` is what gets served."""

    def __init__(self, n_experts: int, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self.run_end = RunEnd(reg)  # traci_run_finished
        # Buffered by the loop thread, moved into the metrics below by flush().
        self._counts: dict[tuple[str, str], int] = {}  # only ever grows, never reset
        self._flushed: dict[tuple[str, str], int] = {}
        self._join_waits: deque[float] = deque()  # one per released step
        self._queue_latencies: deque[float] = deque()  # one per dispatched step
        self._flush_lock = threading.Lock()
        reg.register(_Flush(self))  # first: a scrape flushes before reading the metrics
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
        self.serve_ready = Gauge(
            "traci_broker_serve_ready",
            "1 while the front door can answer: a reducer and a live expert, the run started.",
            registry=reg,
        )
        self.serving = Gauge(
            "traci_broker_serving",
            "1 when this broker serves a finished run (--serve): it releases no training step.",
            registry=reg,
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
        for reason in DROPPED_REASONS:
            self.steps_dropped.labels(reason=reason)
        for expert_id in range(n_experts):
            self.expert_up.labels(expert=str(expert_id))
        self._messages = {
            (kind, direction): self.messages.labels(kind=kind, direction=direction)
            for kind in (*KINDS, "invalid")
            for direction in DIRECTIONS
        }
        self.serve = ServeMetrics(n_experts, reg)  # the front door (docs/serving.md)
        self.aligns = Counter(
            "traci_broker_align_total",
            "ALIGN messages the broker relayed or answered (wait), by stage.",
            ["stage"],
            registry=reg,
        )
        self._aligns = {stage: self.aligns.labels(stage=stage) for stage in ALIGN_STAGES}

    def message(self, kind: str, direction: str) -> None:
        """Count one message (buffered: see ``flush``)."""
        counts, key = self._counts, (kind, direction)
        counts[key] = counts.get(key, 0) + 1

    def align(self, stage: str) -> None:
        """One ALIGN relayed (or a "wait" answered): not on the hot path, counted at once."""
        child = self._aligns.get(stage)
        if child is not None:  # decode admits only the known stages
            child.inc()

    def released(self, join_wait: float) -> None:
        """A step was released after ``join_wait`` seconds (buffered: see ``flush``)."""
        self._join_waits.append(join_wait)

    def dispatched(self, queue_latency: float) -> None:
        """A step went to the reducer ``queue_latency`` s after its first EMB (buffered)."""
        self._queue_latencies.append(queue_latency)

    def flush(self) -> None:
        """Move the buffered counts and observations into the Prometheus metrics.

        Safe against the loop thread buffering meanwhile: counts only grow (the delta since
        the last flush is added) and deque append/popleft are atomic."""
        with self._flush_lock:
            for key, count in list(self._counts.items()):
                delta = count - self._flushed.get(key, 0)
                if delta:
                    self._flushed[key] = count
                    child = self._messages.get(key)
                    if child is None:
                        child = self._messages[key] = self.messages.labels(*key)
                    child.inc(delta)
            waits, latencies = self._join_waits, self._queue_latencies
            released = 0
            while waits:
                self.join_wait.observe(waits.popleft())
                released += 1
            if released:
                self.steps_released.inc(released)
            while latencies:
                self.queue_latency.observe(latencies.popleft())
            self.serve.flush()

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
        serve_ready: bool = False,
    ) -> None:
        """Refresh the gauges from the join book and flush (called on every tick)."""
        self.flush()
        self.pending_steps.set(pending)
        self.dispatched_steps.set(dispatched)
        self.registered_experts.set(registered)
        self.live_experts.set(live)
        for expert_id, up in expert_up.items():
            self.expert_up.labels(expert=str(expert_id)).set(1 if up else 0)
        self.reducer_up.set(1 if reducer_up else 0)
        self.serve_ready.set(1 if serve_ready else 0)


class _Flush:
    """A collector with no metrics of its own: collected first, it flushes the buffers."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[object]:
        return ()

    def collect(self) -> Iterable[object]:
        self._metrics.flush()
        return ()


# Rows per batched served query: powers of two up to serve.max_request_rows' default.
BATCH_ROWS_BUCKETS = tuple(float(1 << k) for k in range(13))


class ServeMetrics:
    """Served prediction at the broker's front door (services/broker/serve.py). Each answered
    request is buffered on the loop (a prometheus-client observe takes a lock; a request makes
    nine) and moved into the metrics by ``flush`` -- on every scrape and every tick, with the
    broker's own (``BrokerMetrics.flush``)."""

    def __init__(self, n_experts: int, reg: CollectorRegistry) -> None:
        from traci_ml.services.broker.serve import OUTCOMES

        self.latency = Histogram(
            "traci_broker_serve_latency_seconds",
            "Served requests answered ok: arrival at the front door to REPLY.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.requests = Counter(
            "traci_broker_serve_requests_total",
            "Served requests by outcome (ok, or the cause of the error reply).",
            ["outcome"],
            registry=reg,
        )
        self.batch_rows = Histogram(
            "traci_broker_serve_batch_rows",
            "Rows per batched query sent to the experts (requests grouped together).",
            buckets=BATCH_ROWS_BUCKETS,
            registry=reg,
        )
        self.batch_requests = Histogram(
            "traci_broker_serve_batch_requests",
            "Requests per batched query.",
            buckets=BATCH_ROWS_BUCKETS[:11],
            registry=reg,
        )
        self.masked = Counter(
            "traci_broker_serve_masked_total",
            "Expert tokens masked in served queries (expert gone, late, or refused).",
            ["expert"],
            registry=reg,
        )
        self.queued = Gauge(
            "traci_broker_serve_queued", "Requests waiting to be batched or sent.", registry=reg
        )
        self.inflight = Gauge(
            "traci_broker_serve_inflight",
            "Batched queries at the experts or reducer.",
            registry=reg,
        )
        self.hop = Histogram(
            "traci_broker_serve_hop_seconds",
            "Served requests answered ok: time in the broker per hop (proto.SERVE_HOPS: queue, "
            "experts, expert_compute, reducer, reducer_compute, reply).",
            ["hop"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._hops = tuple(self.hop.labels(hop=h) for h in SERVE_HOPS)
        self._outcomes = {o: self.requests.labels(outcome=o) for o in OUTCOMES}
        # (outcome, latency or None, hops or None) per answered request; (rows, requests) per
        # batched query: appended by the loop, popped by flush (both atomic on a deque)
        self._answers: deque[tuple[str, float | None, tuple[int, ...] | None]] = deque()
        self._batches: deque[tuple[int, int]] = deque()
        self._masked = {i: self.masked.labels(expert=str(i)) for i in range(n_experts)}

    def answered(
        self, outcome: str, latency: float | None, hops: tuple[int, ...] | None = None
    ) -> None:
        """One request answered: its outcome, and for ok its latency and REPLY.hops
        (microseconds, in SERVE_HOPS order). Buffered: see ``flush``."""
        self._answers.append((outcome, latency, hops))

    def batched(self, rows: int, requests: int) -> None:
        """One batched query sent to the experts (buffered)."""
        self._batches.append((rows, requests))

    def flush(self) -> None:
        """Move the buffered answers and batches into the metrics (BrokerMetrics.flush)."""
        answers, batches = self._answers, self._batches
        while answers:
            outcome, latency, hops = answers.popleft()
            child = self._outcomes.get(outcome)
            if child is None:
                child = self._outcomes[outcome] = self.requests.labels(outcome=outcome)
            child.inc()
            if latency is not None:
                self.latency.observe(latency)
            for hop, us in zip(self._hops, hops or (), strict=False):
                hop.observe(us * 1e-6)
        while batches:
            rows, requests = batches.popleft()
            self.batch_rows.observe(rows)
            self.batch_requests.observe(requests)

    def masked_expert(self, expert_id: int) -> None:
        child = self._masked.get(expert_id)
        if child is None:
            child = self._masked[expert_id] = self.masked.labels(expert=str(expert_id))
        child.inc()

    def state(self, *, queued: int, inflight: int) -> None:
        self.queued.set(queued)
        self.inflight.set(inflight)
