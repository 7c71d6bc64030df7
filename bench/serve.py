"""Served-prediction latency and throughput: `traci serve` on a short trained run of the
reference model, a loopback client at a few request rates, with and without batching.

    python -m bench.serve [--quick]

For each setting of ``serve.max_wait_ms`` (0: every request travels alone; a few ms: the
broker groups concurrent requests) a fresh ``traci serve`` is started on the same run, and
for each target rate an open-loop load runs: ``threads`` clients (one ``traci_ml.Client``
each, one request in flight each) send on a fixed schedule; a request's latency runs from its
*scheduled* send time to its reply, so a client that falls behind is charged for it (no
coordinated omission); a load the cluster cannot keep up with is cut 2 s after its window
(``unsent``). ``max`` is closed-loop: every thread sends as soon as its last reply came.
Reported per rate: p50/p99 latency, achieved throughput (answers over the time until the last
one), errors, and the mean rows of the batched query a request travelled in. No test asserts
a time.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.e2e import free_ports
from bench.reference import reference_config

TRACI = [sys.executable, "-m", "traci_ml.app.cli"]
FEATURES = 256  # the reference model's synthetic table: x0 .. x255, standard normal


def train(run_dir: Path, *, steps: int) -> None:
    """A short `traci up` of the reference model into ``run_dir``."""
    cfg = reference_config(batch_size=256, steps=steps, run_dir=run_dir, ports=free_ports(2))
    cfg["network"]["serve_port"] = 0  # training needs no front door here
    path = run_dir.parent / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")


class Server:
    """`traci serve --run RUN` with ``serve.max_wait_ms`` set; ``endpoint`` its front door."""

    def __init__(self, run_dir: Path, max_wait_ms: float) -> None:
        expert, reducer, front = free_ports(3)
        self.endpoint = f"tcp://127.0.0.1:{front}"
        sets = {"network.expert_port": expert, "network.reducer_port": reducer,
                "network.serve_port": front, "serve.max_wait_ms": max_wait_ms,
                "serve.max_batch_rows": 256}  # fmt: skip
        argv = [*TRACI, "serve", "--run", str(run_dir), "--log-level", "WARNING"]
        argv += [f"--set={k}={v}" for k, v in sets.items()]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_ready(self, x: np.ndarray, columns: list[str], timeout: float = 300) -> None:
        from traci_ml.app.client import Client, ServeError

        deadline = time.monotonic() + timeout
        with Client(self.endpoint, timeout=5) as client:
            while True:
                try:
                    client.predict(x, columns)
                    return
                except ServeError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def load(
    endpoint: str, rate: float | None, seconds: float, rows: int, threads: int
) -> dict[str, Any]:
    """``threads`` clients at ``rate`` requests/s in all (None: closed loop) for ``seconds``."""
    from traci_ml.app.client import Client, ServeError

    columns = [f"x{j}" for j in range(FEATURES)]
    data = np.random.default_rng(0).standard_normal((4096, FEATURES)).astype(np.float32)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    batches: list[list[int]] = [[] for _ in range(threads)]
    errors, unsent, finished = [0] * threads, [0] * threads, [0.0] * threads
    start = time.monotonic() + 0.5  # every client connected before the first send
    end = start + seconds

    def client_loop(k: int) -> None:
        period = threads / rate if rate else 0.0
        with Client(endpoint, timeout=10) as client:
            client.predict(data[:rows], columns)  # connect and warm
            n, due = 0, start + k * period / threads
            while True:
                now = time.monotonic()
                if rate is None:
                    due = max(now, start)
                if due >= end:
                    finished[k] = time.monotonic()
                    return
                if now > end + 2.0:  # hopelessly behind: the rest is never sent
                    unsent[k] += int((end - due) / period) + 1
                    finished[k] = now
                    return
                if due > now:
                    time.sleep(due - now)
                at = (n * rows + k * 97) % (len(data) - rows)
                try:
                    pred = client.predict(data[at : at + rows], columns)
                    latencies[k].append(time.monotonic() - due)
                    batches[k].append(pred.batch_rows)
                except ServeError:
                    errors[k] += 1
                n, due = n + 1, due + period

    workers = [threading.Thread(target=client_loop, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    lat = np.array([x for per in latencies for x in per]) * 1000
    done = len(lat)
    return {
        "target_rps": rate, "threads": threads, "rows_per_request": rows, "requests": done,
        "errors": sum(errors), "unsent": sum(unsent),
        "throughput_rps": done / (max(*finished, end) - start),
        "p50_ms": float(np.percentile(lat, 50)) if done else None,
        "p99_ms": float(np.percentile(lat, 99)) if done else None,
        "mean_batch_rows": float(np.mean([b for per in batches for b in per])) if done else None,
    }  # fmt: skip


def run(*, quick: bool = False, rows: int = 1) -> dict[str, Any]:
    """Train once, then every (max_wait_ms, rate) cell; the results as a dict."""
    rates: list[float | None] = [50.0, 200.0, 800.0, None] if not quick else [100.0, None]
    seconds = 3.0 if quick else 8.0
    waits = (0.0, 2.0, 5.0) if not quick else (0.0, 2.0)
    out: dict[str, Any] = {"rows_per_request": rows, "seconds_per_cell": seconds, "cells": []}
    with tempfile.TemporaryDirectory(prefix="traci-bench-serve-") as tmp:
        run_dir = Path(tmp) / "run"
        train(run_dir, steps=40 if quick else 100)
        columns = [f"x{j}" for j in range(FEATURES)]
        probe = np.zeros((rows, FEATURES), np.float32)
        for wait in waits:
            server = Server(run_dir, wait)
            try:
                server.wait_ready(probe, columns)
                for rate in rates:
                    threads = 16 if rate is None else int(min(32, max(4, rate // 25)))
                    cell = load(server.endpoint, rate, seconds, rows, threads)
                    cell["max_wait_ms"] = wait
                    out["cells"].append(cell)
                    print("  " + fmt(cell), flush=True)
            finally:
                server.stop()
    return out


def fmt(cell: dict[str, Any]) -> str:
    rate = "max" if cell["target_rps"] is None else f"{cell['target_rps']:.0f}/s"
    if not cell["requests"]:
        return f"max_wait {cell['max_wait_ms']:>4} ms  rate {rate:>7}: no answers"
    return (
        f"max_wait {cell['max_wait_ms']:>4} ms  rate {rate:>7}  threads {cell['threads']:>2}: "
        f"p50 {cell['p50_ms']:7.2f} ms  p99 {cell['p99_ms']:8.2f} ms  "
        f"{cell['throughput_rps']:7.0f} req/s  batch {cell['mean_batch_rows']:5.1f} rows  "
        f"errors {cell['errors']}"
        + (f"  overloaded: {cell['unsent']} not sent" * bool(cell["unsent"]))
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rates, shorter cells")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--out", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, rows=args.rows)
    print(f"\n== served prediction ({args.rows} row(s) per request, reference model)")
    for cell in results["cells"]:
        print("  " + fmt(cell))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
