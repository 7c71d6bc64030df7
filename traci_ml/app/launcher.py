"""``traci up``: a local cluster of separate OS processes on this machine.

Starts the broker, the reducer and every expert as child processes (exactly the commands a
container runs), shows live progress, and stops them all cleanly on Ctrl-C, when training ends,
or when one of them fails (exiting non-zero with the failed service's log tail). The processes
and their supervision are ``traci_ml.app.supervisor``'s; here: the fresh/resume checks (a
resume's checkpoints must fit the config, ``traci_ml.core.fits``, before anything starts),
launch.yaml, the training policy (done when the reducer exits 0), progress, plots, summary.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, TextIO

import yaml

from traci_ml.app.plot import bucket_deltas, histogram_quantile
from traci_ml.app.supervisor import Child, Console, Policy, children, supervise
from traci_ml.core.config import Config
from traci_ml.core.errors import ConfigError
from traci_ml.core.observe import metrics_url
from traci_ml.core.rundir import RunDir

log = logging.getLogger(__name__)
QUEUE_LATENCY = "traci_broker_queue_latency_seconds"
LIVE_EXPERTS = "traci_broker_live_experts"


def up(config: Config, *, argv: list[str], args: Any) -> int:
    run = RunDir(config.run_path)
    if args.fresh and run.path.exists():
        shutil.rmtree(run.path)
    if not args.resume and run.checkpoints.exists():
        raise ConfigError(
            f"run directory {run.path} already holds checkpoints: pass --fresh to start over "
            "or --resume to continue"
        )
    if args.resume:  # before any process starts or any file is written: one line, exit 2
        from traci_ml.core.fits import check_run

        check_run(config)
    run.logs.mkdir(parents=True, exist_ok=True)
    run.launch.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    services = children(config, run.launch, resume=args.resume, gpus=args.gpus, fork=True)
    progress = Progress(config, sys.stdout)
    reducer = next(c for c in services if c.name == "reducer")

    def finished(_: list[Child]) -> bool:
        """Training ends when the reducer exits 0, with a last queue-latency sample."""
        if reducer.code != 0:
            return False
        progress._broker_live()  # a last queue-latency sample, with the run's final steps
        return True

    names = ", ".join(c.name for c in services)
    code = supervise(services, Policy(
        config.launcher, run.pids, progress,
        started=f"started {names}; logs in {run.path}/{RunDir.LOGS}",
        done=finished, on_tick=progress.update,
    ))  # fmt: skip
    if code is None:  # interrupted
        return 130
    if code:
        return code
    code = progress.final(run.path)
    if code == 0:
        _plot(run.path, progress)
    return code


def _plot(run_path: Path, progress: Progress) -> None:
    """The run's PNGs (``traci_ml.app.plot``): a failure to plot is a warning, not a failed run."""
    try:
        from traci_ml.app.plot import describe, plot_run

        progress.line(describe(plot_run(run_path)))
    except (Exception, KeyboardInterrupt) as exc:  # any failure at all: the run succeeded
        log.warning("plots of %s not written: %s", run_path, exc or type(exc).__name__)


class Progress(Console):
    """Follows the reducer's metrics.jsonl and the broker's metrics; prints a status line (and
    what the supervisor says: restarts, failures)."""

    def __init__(self, config: Config, out: TextIO, every: float = 2.0) -> None:
        super().__init__(out)
        self.config, self.every = config, every
        run = RunDir(config.run_path)
        self.path = run.metrics
        self.offset = 0
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.printed = 0.0
        self.broker_log = run.broker_metrics
        self.latency_prev: dict[float, float] | None = None  # the last scrape's buckets

    def update(self, children: list[Child]) -> None:
        self._follow()
        now = time.monotonic()
        if now - self.printed < self.every:
            return
        self.printed = now
        steps = self.config.train.steps
        t, e = self.last_train, self.last_eval
        metric = "accuracy" if "accuracy" in e or "train_accuracy" in t else "rmse"
        parts = [f"step {t.get('step', 0):>5}/{steps}"]
        if t:
            parts.append(f"loss {t['loss_avg']:.4f}")
            parts.append(f"{t['samples_per_sec']:,.0f} samples/s")
        if e:
            parts.append(f"eval {metric} {e[metric]:.4f}")
        experts = [c for c in children if c.name.startswith("expert-")]
        alive = sum(c.code is None for c in experts)
        restarts = sum(c.restarts for c in children)
        live = self._broker_live()
        parts.append(
            f"experts {alive}/{len(experts)} running"
            + (f", {live} live at broker" if live is not None else "")
            + (f" | {restarts} restarts" if restarts else "")
        )
        self.line(" | ".join(parts))

    def _follow(self) -> None:
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
        except (OSError, ValueError):
            pass

    def _broker_live(self) -> int | None:
        """One scrape of the broker's metrics per tick: live experts for the status line, and a
        queue-latency sample appended to RUN_DIR/broker.jsonl. Never raises, never blocks long."""
        port = self.config.metrics.broker_port
        if not port:
            return None
        url = metrics_url(self.config.metrics.bind, port)
        try:  # any failure (refused, timeout, torn response, odd text) skips this tick
            with urllib.request.urlopen(url, timeout=0.2) as resp:
                scrape = parse_broker_scrape(resp.read().decode())
        except Exception:
            return None
        try:
            self._sample_latency(scrape)
        except Exception:  # a full disk must not stop the supervisor
            pass
        return scrape["live_experts"]

    def _sample_latency(self, scrape: dict[str, Any]) -> None:
        buckets = scrape["buckets"]
        if not buckets or scrape["count"] is None:
            return
        interval = bucket_deltas(self.latency_prev, buckets)
        self.latency_prev = dict(buckets)
        record = {
            "time": time.time(),
            "count": scrape["count"],
            "sum": scrape["sum"],
            "interval_count": interval[-1][1],
            "p50_seconds": histogram_quantile(0.5, interval),
            "p99_seconds": histogram_quantile(0.99, interval),
            "live_experts": scrape["live_experts"],
        }
        with self.broker_log.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def final(self, run_path: Path) -> int:
        try:
            summary = json.loads(RunDir(run_path).summary.read_text())
        except (OSError, ValueError):
            self.line(f"training ended but {run_path}/{RunDir.SUMMARY} is missing")
            return 1
        metric = next((k for k in ("test_accuracy", "test_rmse") if k in summary), None)
        value = f"{metric} {summary[metric]:.4f}, " if metric else ""
        self.line(
            f"done: {value}{summary['steps']} steps in {summary['wall_seconds']:.1f}s "
            f"({summary['samples_per_sec']:,.0f} samples/s); summary in "
            f"{run_path}/{RunDir.SUMMARY}"
        )
        return 0


def parse_broker_scrape(text: str) -> dict[str, Any]:
    """From the broker's Prometheus text: the queue-latency histogram's buckets (``le``,
    cumulative count; sorted, +Inf last), its count and sum, and the live-experts gauge."""
    out: dict[str, Any] = {"buckets": [], "count": None, "sum": None, "live_experts": None}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith(f"{QUEUE_LATENCY}_bucket{{"):
            le = name.split('le="', 1)[1].split('"', 1)[0]
            out["buckets"].append((float(le), float(value)))
        elif name in (f"{QUEUE_LATENCY}_count", f"{QUEUE_LATENCY}_sum"):
            out[name.rsplit("_", 1)[1]] = float(value)
        elif name == LIVE_EXPERTS:
            out["live_experts"] = int(float(value))
    out["buckets"].sort()
    return out
