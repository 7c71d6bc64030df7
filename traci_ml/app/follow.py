"""``traci up`` follows its run: the services' processes, the broker's and the reducer's
metrics (``metrics.*_port``) and the reducer's ``metrics.jsonl`` become a ``RunState`` that a
view shows (``app/view.py``). Every ``every`` seconds a queue-latency sample of the broker is
appended to ``RUN_DIR/broker.jsonl`` (``traci plot`` draws it). Nothing here raises or
blocks for long: a scrape that fails is a tick without it.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from traci_ml.app.plot import bucket_deltas, histogram_quantile
from traci_ml.app.supervisor import Child, Console
from traci_ml.app.view import (
    DONE,
    EVALUATING,
    PLOTTING,
    STARTING,
    TRAINING,
    WAITING,
    PlainView,
    RunState,
)
from traci_ml.core.config import Config
from traci_ml.core.observe import metrics_url
from traci_ml.core.rundir import RunDir

QUEUE_LATENCY = "traci_broker_queue_latency_seconds"
LIVE_EXPERTS = "traci_broker_live_experts"
LOOK = 0.5  # seconds between two looks at the metrics endpoints


def parse_scrape(text: str) -> dict[str, float]:
    """Prometheus text as ``{'name{labels}': value}`` (comments left out)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def parse_broker_scrape(text: str) -> dict[str, Any]:
    """From the broker's Prometheus text: the queue-latency histogram's buckets (``le``,
    cumulative count; sorted, +Inf last), its count and sum, the live-experts gauge, and every
    sample by name (``samples``)."""
    samples = parse_scrape(text)
    out: dict[str, Any] = {"buckets": [], "count": None, "sum": None, "live_experts": None,
                           "samples": samples}  # fmt: skip
    for name, value in samples.items():
        if name.startswith(f"{QUEUE_LATENCY}_bucket{{"):
            le = name.split('le="', 1)[1].split('"', 1)[0]
            out["buckets"].append((float(le), value))
        elif name in (f"{QUEUE_LATENCY}_count", f"{QUEUE_LATENCY}_sum"):
            out[name.rsplit("_", 1)[1]] = value
        elif name == LIVE_EXPERTS:
            out["live_experts"] = int(value)
    out["buckets"].sort()
    return out


def scrape(bind: str, port: int) -> dict[str, float] | None:
    """One service's metrics, or None (off, not up yet, or unreadable)."""
    if not port:
        return None
    try:  # any failure (refused, timeout, torn response) skips this look
        with urllib.request.urlopen(metrics_url(bind, port), timeout=0.2) as resp:
            return parse_scrape(resp.read().decode())
    except Exception:
        return None


def process_state(child: Child) -> str:
    if child.restart_at is not None:
        return "restarting"
    if child.proc is None:
        return "starting"
    code = child.code
    return "running" if code is None else "exited" if code == 0 else f"exited {code}"


class Progress(Console):
    """Follows the run for the view; the supervisor's lines go through the view too."""

    def __init__(
        self, config: Config, out: Any, every: float = 2.0, view: PlainView | None = None
    ) -> None:
        from traci_ml.core.data import expert_count

        super().__init__(out)
        self.config, self.every = config, every
        self.view = view if view is not None else PlainView(out, every)
        run = RunDir(config.run_path)
        self.path = run.metrics
        self.offset = 0
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.broker_log = run.broker_metrics
        self.latency_prev: dict[float, float] | None = None  # the last scrape's buckets
        self.started = time.monotonic()
        self.sampled = self.looked = float("-inf")
        self.eval_steps: float | None = None  # the reducer's eval steps at the last look
        self.state = RunState(steps=config.train.steps, batch_size=config.train.batch_size,
                              n_experts=expert_count(config))  # fmt: skip

    def line(self, text: str) -> None:
        self.view.line(text)

    def phase(self, phase: str) -> None:
        """Set by the launcher: plotting, done."""
        self.state = replace(self.state, phase=phase, elapsed=time.monotonic() - self.started)
        self.view.show(self.state)

    def update(self, children: list[Child]) -> None:
        """Every supervisor tick: new records at once, the endpoints every ``LOOK`` seconds."""
        evals = self._follow()
        metric = self._metric()
        for record in evals:
            self.view.eval_record(record, metric)
        now = time.monotonic()
        if now - self.looked < LOOK and not evals:
            return
        self.looked = now
        m = self.config.metrics
        broker = self._broker_scrape() if now - self.sampled >= self.every else None
        if broker is None:
            raw = scrape(m.bind, m.broker_port)
            broker = {"samples": raw} if raw is not None else None
        reducer = scrape(m.bind, m.reducer_port)
        self.state = self._next(children, broker["samples"] if broker else None, reducer, now)
        self.view.show(self.state)

    def _next(
        self,
        children: list[Child],
        broker: dict[str, float] | None,
        reducer: dict[str, float] | None,
        now: float,
    ) -> RunState:
        s, t, e = self.state, self.last_train, self.last_eval
        n = s.n_experts
        registered = reducer_up = live = None
        released = 0.0
        if broker is not None:
            up = 'traci_broker_expert_up{expert="%d"}'
            registered = tuple(i for i in range(n) if broker.get(up % i) == 1.0)
            reducer_up = broker.get("traci_broker_reducer_up") == 1.0
            live = int(broker.get(LIVE_EXPERTS, 0))
            released = broker.get("traci_broker_steps_released_total", 0.0)
        evals = None if reducer is None else reducer.get('traci_reducer_steps_total{phase="eval"}')
        evaluating = evals is not None and self.eval_steps is not None and evals > self.eval_steps
        self.eval_steps = evals
        step = int(t.get("step", 0))
        started = bool(t) or released > 0 or s.first_step_after is not None
        if s.phase in (PLOTTING, DONE):
            phase = s.phase  # the launcher's
        elif started:
            phase = EVALUATING if evaluating or (step >= s.steps > 0) else TRAINING
        elif broker is not None or all(process_state(c) == "running" for c in children):
            phase = WAITING
        else:
            phase = STARTING
        elapsed = now - self.started
        first = s.first_step_after if s.first_step_after is not None or not started else elapsed
        return replace(
            s, phase=phase, step=step, processes={c.name: process_state(c) for c in children},
            registered=registered, reducer_registered=reducer_up, live=live,
            loss=t.get("loss_avg"), samples_per_sec=t.get("samples_per_sec"),
            metric=self._metric(), eval_value=e.get(self._metric()), eval_step=e.get("step"),
            restarts=sum(c.restarts for c in children), elapsed=elapsed, first_step_after=first,
        )  # fmt: skip

    def _metric(self) -> str:
        t, e = self.last_train, self.last_eval
        return "accuracy" if "accuracy" in e or "train_accuracy" in t else "rmse"

    def _follow(self) -> list[dict[str, Any]]:
        """New complete records of metrics.jsonl; the eval records among them."""
        evals = []
        try:
            with self.path.open() as fh:
                fh.seek(self.offset)
                for raw in fh:
                    if not raw.endswith("\n"):
                        break
                    self.offset += len(raw.encode())
                    rec = json.loads(raw)
                    if rec.get("kind") == "train":
                        self.last_train = rec
                    elif rec.get("kind") == "eval":
                        self.last_eval = rec
                        evals.append(rec)
        except (OSError, ValueError):
            pass
        return evals

    def _broker_scrape(self) -> dict[str, Any] | None:
        """One scrape of the broker's metrics with a queue-latency sample appended to
        RUN_DIR/broker.jsonl. Never raises, never blocks long."""
        self.sampled = time.monotonic()
        port = self.config.metrics.broker_port
        if not port:
            return None
        url = metrics_url(self.config.metrics.bind, port)
        try:  # any failure (refused, timeout, torn response, odd text) skips this tick
            with urllib.request.urlopen(url, timeout=0.2) as resp:
                found = parse_broker_scrape(resp.read().decode())
        except Exception:
            return None
        try:
            self._sample_latency(found)
        except Exception:  # a full disk must not stop the supervisor
            pass
        return found

    def _broker_live(self) -> int | None:
        """A queue-latency sample now (the run's last, at its end); the live experts."""
        found = self._broker_scrape()
        return None if found is None else found["live_experts"]

    def _sample_latency(self, found: dict[str, Any]) -> None:
        buckets = found["buckets"]
        if not buckets or found["count"] is None:
            return
        interval = bucket_deltas(self.latency_prev, buckets)
        self.latency_prev = dict(buckets)
        record = {
            "time": time.time(),
            "count": found["count"],
            "sum": found["sum"],
            "interval_count": interval[-1][1],
            "p50_seconds": histogram_quantile(0.5, interval),
            "p99_seconds": histogram_quantile(0.99, interval),
            "live_experts": found["live_experts"],
        }
        with self.broker_log.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def final(self, run_path: Path) -> int:
        """The records not shown yet, then the summary's line; 1 when there is no summary."""
        for record in self._follow():  # the run ended between two ticks
            self.view.eval_record(record, self._metric())
        try:
            summary = json.loads(RunDir(run_path).summary.read_text())
        except (OSError, ValueError):
            self.line(f"training ended but {run_path}/{RunDir.SUMMARY} is missing")
            return 1
        metric = next((k for k in ("test_accuracy", "test_rmse") if k in summary), None)
        best, early = summary.get("best"), summary.get("stop_reason") == "early_stopping"
        picked = (f" (best round {best['round']}, step {best['step']}"
                  f"{'; stopped early' if early else ''})" if best else "")  # fmt: skip
        value = f"{metric} {summary[metric]:.4f}{picked}, " if metric else ""
        self.line(
            f"done: {value}{summary['steps']} steps in {summary['wall_seconds']:.1f}s "
            f"({summary['samples_per_sec']:,.0f} samples/s); summary in "
            f"{run_path}/{RunDir.SUMMARY}"
        )
        return 0
