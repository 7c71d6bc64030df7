"""``traci up``: a local cluster of separate OS processes on this machine.

Starts the broker, the reducer and every expert as child processes (exactly the commands a
container runs), shows live progress, and stops them all cleanly on Ctrl-C, when training ends,
or when one of them fails (exiting non-zero with the failed service's log tail).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from traci_ml.app.plot import bucket_deltas, histogram_quantile
from traci_ml.core.config import Config
from traci_ml.core.errors import ConfigError
from traci_ml.core.files import write_json_atomic
from traci_ml.core.signals import PARENT_ENV

log = logging.getLogger(__name__)
POLL = 0.2
GRACE = 15.0  # seconds the others get to finish after the reducer is done
STABLE = 30.0  # a service up this long has its restart back-off reset
CONFIG_ERROR = 2  # the exit code of every TraciError (traci_ml/app/cli.py)
DATA_ERROR = 3  # a DataError in a service: never restarted
QUEUE_LATENCY = "traci_broker_queue_latency_seconds"
LIVE_EXPERTS = "traci_broker_live_experts"


@dataclass
class Child:
    """One supervised service process. Restarts run ``restart_argv`` (with ``--resume``)."""

    name: str
    argv: list[str]
    restart_argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_file: TextIO | None = None
    restarts: int = 0
    streak: int = 0  # restarts since the service last ran for STABLE seconds (back-off)
    started_at: float = 0.0
    restart_at: float | None = None  # monotonic time of a scheduled restart

    def start(self) -> None:
        if self.log_file is None:
            self.log_file = self.log_path.open("ab")  # type: ignore[assignment]
        argv = self.restart_argv if self.restarts else self.argv
        self.proc = subprocess.Popen(
            argv, stdout=self.log_file, stderr=subprocess.STDOUT, env=self.env,
            stdin=subprocess.DEVNULL, start_new_session=True,  # Ctrl-C reaches us alone
        )  # fmt: skip
        self.restart_at = None
        self.started_at = time.monotonic()

    @property
    def code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def up(config: Config, *, argv: list[str], args: Any) -> int:
    run_path = config.run_path
    if args.fresh and run_path.exists():
        shutil.rmtree(run_path)
    if not args.resume and (run_path / "checkpoints").exists():
        raise ConfigError(
            f"run directory {run_path} already holds checkpoints: pass --fresh to start over "
            "or --resume to continue"
        )
    (run_path / "logs").mkdir(parents=True, exist_ok=True)
    launch = run_path / "launch.yaml"
    launch.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    children = _children(config, launch, resume=args.resume, gpus=args.gpus)
    progress = Progress(config, sys.stdout)
    _write_pids(run_path, children)
    interrupted = False
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for child in children:
            child.start()
        _write_pids(run_path, children)
        progress.line(f"started {', '.join(c.name for c in children)}; logs in {run_path}/logs")
        code = _watch(children, progress, config)
    except KeyboardInterrupt:
        interrupted = True
        progress.line("interrupted: stopping every service")
        code = 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_all(children)
    if interrupted or code:
        return code
    code = progress.final(run_path)
    if code == 0:
        _plot(run_path, progress)
    return code


def _plot(run_path: Path, progress: Progress) -> None:
    """The run's PNGs (``traci_ml.app.plot``): a failure to plot is a warning, not a failed run."""
    try:
        from traci_ml.app.plot import describe, plot_run

        progress.line(describe(plot_run(run_path)))
    except (Exception, KeyboardInterrupt) as exc:  # any failure at all: the run succeeded
        log.warning("plots of %s not written: %s", run_path, exc or type(exc).__name__)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _children(config: Config, launch: Path, *, resume: bool, gpus: int) -> list[Child]:
    from traci_ml.core.data import expert_count

    n = expert_count(config)
    base = [sys.executable, "-m", "traci_ml.app.cli"]
    logs = config.run_path / "logs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
    # pyarrow's allocator, fixed at its import: the system one gives a party file's read
    # buffers back to the OS (mimalloc keeps ~40 MiB of a 2M-row read; bench data section)
    env.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    first = ["--resume"] if resume else []
    specs = [("broker", ["broker"], False), ("reducer", ["reducer"], True)]
    specs += [(f"expert-{i}", ["expert", "--id", str(i)], True) for i in range(n)]
    children = []
    for name, command, resumable in specs:
        argv = [*base, *command, "--config", str(launch)]
        child_env = dict(env)
        if gpus and name.startswith("expert-"):
            child_env["CUDA_VISIBLE_DEVICES"] = str(int(name.split("-")[1]) % gpus)
        children.append(Child(
            name, argv + (first if resumable else []),
            argv + (["--resume"] if resumable else []), logs / f"{name}.log", child_env,
        ))  # fmt: skip
    return children


def _write_pids(run_path: Path, children: list[Child]) -> None:
    """RUN_DIR/pids.json: the live pid of every service (for operators and fault tests)."""
    write_json_atomic(
        run_path / "pids.json", {c.name: c.pid for c in children if c.pid is not None}
    )


def _watch(children: list[Child], progress: Progress, config: Config) -> int:
    """Supervise until the reducer finishes (0) or a service fails for good (1)."""
    policy = config.launcher
    reducer = next(c for c in children if c.name == "reducer")
    while True:
        now = time.monotonic()
        for child in children:
            code = child.code
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.start()
                    _write_pids(config.run_path, children)
                continue
            if code in (None, 0):  # exiting 0 is a service's normal end of the run
                continue
            # Exit code 2 is a usage or config error (a bad key, a missing module, a port
            # in use): on a first start that never got going, a restart fails the same way.
            config_error = (
                code == CONFIG_ERROR and not child.restarts and now - child.started_at < STABLE
            ) or code == DATA_ERROR  # bad data (docs/parties.md): a restart reads it again
            if policy.restart == "never" or child.restarts >= policy.max_restarts or config_error:
                progress.line(
                    f"{child.name} exited with code {code}"
                    + (f" after {child.restarts} restarts" if child.restarts else "")
                    + f"; last log lines:\n{child.tail()}"
                )
                return 1
            child.restarts += 1
            child.streak = 1 if now - child.started_at >= STABLE else child.streak + 1
            delay = policy.restart_delay * 2 ** (child.streak - 1)
            child.restart_at = now + delay
            progress.restarted(child.name, code, child.restarts, policy.max_restarts, delay)
        if reducer.code == 0:
            progress._broker_live()  # a last queue-latency sample, with the run's final steps
            deadline = time.monotonic() + GRACE
            while time.monotonic() < deadline and any(c.code is None for c in children):
                time.sleep(POLL)
            return 0
        progress.update(children)
        time.sleep(POLL)


def _stop_all(children: list[Child], timeout: float = 10.0) -> None:
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs: killing it", child.name, timeout)
            child.proc.kill()
            child.proc.wait()
        if child.log_file is not None:
            child.log_file.close()


class Progress:
    """Follows the reducer's metrics.jsonl and the broker's metrics; prints a status line."""

    def __init__(self, config: Config, out: TextIO, every: float = 2.0) -> None:
        self.config, self.out, self.every = config, out, every
        self.path = config.run_path / "metrics.jsonl"
        self.offset = 0
        self.last_train: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.printed = 0.0
        self.broker_log = config.run_path / "broker.jsonl"
        self.latency_prev: dict[float, float] | None = None  # the last scrape's buckets

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def restarted(self, name: str, code: int, n: int, limit: int, delay: float) -> None:
        how = f"signal {-code}" if code < 0 else f"code {code}"
        self.line(f"{name} exited with {how}: restart {n}/{limit} in {delay:.1f}s")

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
        bind = self.config.metrics.bind
        host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind  # a wildcard bind
        try:  # any failure (refused, timeout, torn response, odd text) skips this tick
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=0.2) as resp:
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
            summary = json.loads((run_path / "summary.json").read_text())
        except (OSError, ValueError):
            self.line(f"training ended but {run_path}/summary.json is missing")
            return 1
        metric = next((k for k in ("test_accuracy", "test_rmse") if k in summary), None)
        value = f"{metric} {summary[metric]:.4f}, " if metric else ""
        self.line(
            f"done: {value}{summary['steps']} steps in {summary['wall_seconds']:.1f}s "
            f"({summary['samples_per_sec']:,.0f} samples/s); summary in "
            f"{run_path}/summary.json"
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
