"""Served-prediction latency and throughput (issue 15): `traci serve` on a short trained run
of the reference model (4 experts, 256 columns), loopback clients, the shipped serving
defaults.

    python -m bench.serve [--quick]

Cells: one client, one row, closed loop through the front door (``traci_ml.Client``), with
the per-hop breakdown each REPLY carries (queue, experts, expert_compute, reducer,
reducer_compute, reply; ``wire`` is the rest of what the client saw); the same through the
Open Inference Protocol (``traci http``, JSON); 200 requests/s open loop; 16 closed-loop
clients; and, with a fresh server, the 16 clients with batching off (max_wait_ms 0). Beside
them: the floor of the same message topology with no work in it on this machine
(``bench.serve_floor``), and the CPU per request each serving process and the bench's own
clients spent in the 16-client cells (``bench.serve_cpu``).

The loads (``bench.serve_load``) are open-loop where a rate is given: clients (one DEALER
each, one request in flight each, driven by one poll loop per client process) send on a fixed
schedule and a request's latency runs from its *scheduled* send time to its reply, so a client
that falls behind is charged for it (no coordinated omission); a load the cluster cannot keep
up with is cut 2 s after its window (``unsent``). ``max`` is closed loop. Reported: p50/p99,
throughput (answers over the time until the last one), errors, the mean rows of the batched
query a request travelled in. No test asserts a time.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.e2e import free_ports
from bench.reference import reference_config
from bench.serve_cpu import CpuMeter, fmt_cpu
from bench.serve_load import FEATURES, drive

TRACI = [sys.executable, "-m", "traci_ml.app.cli"]


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
    """`traci serve --run RUN`, ``serve.max_wait_ms`` as given (None: the default);
    ``endpoint`` its front door; with ``http``, the Open Inference Protocol on ``http_port``."""

    def __init__(self, run_dir: Path, max_wait_ms: float | None, *, http: bool = False) -> None:
        expert, reducer, front, self.http_port = free_ports(4)
        self.endpoint = f"tcp://127.0.0.1:{front}"
        self.model = json.loads((run_dir / "config.json").read_text())["run_id"]
        sets: dict[str, Any] = {"network.expert_port": expert, "network.reducer_port": reducer,
                                "network.serve_port": front,
                                "serve.http_port": self.http_port if http else 0}  # fmt: skip
        if max_wait_ms is not None:
            sets["serve.max_wait_ms"] = max_wait_ms
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

    def wait_http(self, timeout: float = 120) -> None:
        """Until ``/v2/health/ready`` answers 200."""
        import urllib.request

        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"traci http not ready on port {self.http_port}")
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def closed_one(endpoint: str, n: int) -> dict[str, Any]:
    """One client, one row, closed loop, ``n`` requests: latency and the per-hop breakdown
    (REPLY.hops; ``wire`` is what the client saw beyond the broker: client <-> front door)."""
    from traci_ml.app.client import Client
    from traci_ml.proto import SERVE_HOPS

    columns = [f"x{j}" for j in range(FEATURES)]
    data = np.random.default_rng(1).standard_normal((256, FEATURES)).astype(np.float32)
    with Client(endpoint, timeout=10) as client:
        for k in range(100):  # warm: sockets, caches, the first traced call
            client.predict(data[k : k + 1], columns)
        preds = [client.predict(data[k % 256 : k % 256 + 1], columns) for k in range(n)]
    lat = np.array([p.latency for p in preds]) * 1000
    hops = {h: float(np.median([p.hops.get(h, 0.0) for p in preds]) * 1000) for h in SERVE_HOPS}
    broker = [sum(p.hops.get(h, 0.0) for h in ("queue", "experts", "reducer", "reply"))
              for p in preds]  # fmt: skip
    hops["wire"] = float(np.median([p.latency - b for p, b in zip(preds, broker, strict=True)]))
    hops["wire"] *= 1000
    return {"requests": n, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "hops_p50_ms": hops}  # fmt: skip


def closed_http(port: int, model: str, n: int) -> dict[str, Any]:
    """The same through the Open Inference Protocol (``traci http``): one JSON request per
    row over one keep-alive connection, every feature column a tensor of one value."""
    import http.client

    data = np.random.default_rng(1).standard_normal((256, FEATURES)).astype(np.float32)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    path = f"/v2/models/{model}/infer"

    def body(k: int) -> bytes:
        row = data[k % 256]
        return json.dumps({"inputs": [{"name": f"x{j}", "datatype": "FP32", "shape": [1],
                                       "data": [float(row[j])]} for j in range(FEATURES)]}
                          ).encode()  # fmt: skip

    bodies = [body(k) for k in range(256)]
    lat = []
    try:
        for k in range(100 + n):
            t0 = time.monotonic()
            conn.request("POST", path, bodies[k % 256], {"Content-Type": "application/json"})
            reply = conn.getresponse()
            answer = reply.read()
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {answer[:300]!r}")
            if k >= 100:
                lat.append(time.monotonic() - t0)
    finally:
        conn.close()
    ms = np.array(lat) * 1000
    return {"requests": n, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}  # fmt: skip


def load_procs(endpoint: str, rate: float | None, seconds: float, threads: int,
               procs: int, meter: CpuMeter | None = None) -> dict[str, Any]:  # fmt: skip
    """``threads`` clients in all, ``rate`` requests/s in all (None: closed loop), spread
    over ``procs`` client processes, each driving its share from one poll loop
    (``bench.serve_load``: one DEALER per client, at most one request in flight each).
    ``meter``: the CPU each process spent per request over the window (``bench.serve_cpu``)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: no ZeroMQ context across a fork
    per = threads // procs
    start = time.monotonic() + 3.0  # every process spawned and connected
    if meter is not None:
        meter.window(start, seconds)
    with ctx.Pool(procs) as pool:
        parts = pool.starmap(drive, [(endpoint, None if rate is None else rate / procs,
                                           seconds, per, start) for _ in range(procs)])  # fmt: skip
    lat = np.concatenate([p["latencies"] for p in parts]) * 1000
    done = len(lat)
    span = max(max(p["finished"] for p in parts), start + seconds) - start
    return {
        "target_rps": rate, "threads": threads, "processes": procs, "rows_per_request": 1,
        "requests": done, "errors": sum(p["errors"] for p in parts),
        "unsent": sum(p["unsent"] for p in parts), "throughput_rps": done / span,
        "p50_ms": float(np.percentile(lat, 50)) if done else None,
        "p99_ms": float(np.percentile(lat, 99)) if done else None,
        "mean_batch_rows": float(np.mean(np.concatenate([p["batches"] for p in parts])))
        if done else None,
        "cpu_us_per_request": {} if meter is None else meter.per_request(
            sum(int(np.sum(p["answered_at"] < start + seconds)) for p in parts)),
    }  # fmt: skip


def run(*, quick: bool = False) -> dict[str, Any]:
    """Train once, serve it with the shipped serving defaults, and measure issue 15's cells:
    one client one row through the front door (with the per-hop breakdown) and through HTTP,
    200 requests/s open loop, 16 closed-loop clients; then 16 clients without batching."""
    seconds = 3.0 if quick else 8.0
    n = 300 if quick else 2000
    out: dict[str, Any] = {"seconds_per_cell": seconds, "cells": []}
    with tempfile.TemporaryDirectory(prefix="traci-bench-serve-") as tmp:
        run_dir = Path(tmp) / "run"
        train(run_dir, steps=40 if quick else 100)
        columns = [f"x{j}" for j in range(FEATURES)]
        probe = np.zeros((1, FEATURES), np.float32)
        server = Server(run_dir, None, http=True)
        try:
            server.wait_ready(probe, columns)
            out["one_row"] = closed_one(server.endpoint, n)
            print("  " + fmt_one("front door", out["one_row"]), flush=True)
            server.wait_http()
            out["one_row_http"] = closed_http(server.http_port, server.model, n // 2)
            print("  " + fmt_one("HTTP (KServe v2 JSON)", out["one_row_http"]), flush=True)
            for rate, threads, procs in ((200.0, 8, 2), (None, 16, 4)):
                meter = CpuMeter(server.proc.pid)
                cell = load_procs(server.endpoint, rate, seconds, threads, procs, meter)
                cell["max_wait_ms"] = "default"
                out["cells"].append(cell)
                print("  " + fmt(cell), flush=True)
                print("    " + fmt_cpu(cell["cpu_us_per_request"]), flush=True)
        finally:
            server.stop()
        if not quick:  # the same 16 clients, every request alone
            server = Server(run_dir, 0.0)
            try:
                server.wait_ready(probe, columns)
                cell = load_procs(server.endpoint, None, seconds, 16, 4,
                                  CpuMeter(server.proc.pid))  # fmt: skip
                cell["max_wait_ms"] = 0.0
                out["cells"].append(cell)
                print("  " + fmt(cell), flush=True)
                print("    " + fmt_cpu(cell["cpu_us_per_request"]), flush=True)
            finally:
                server.stop()
    from bench import serve_floor

    out["floor"] = serve_floor.run(n)  # the empty topology, the same machine, this run
    print(f"  empty topology (bench.serve_floor): p50 {out['floor']['p50_ms']:.2f} ms  "
          f"p99 {out['floor']['p99_ms']:.2f} ms", flush=True)  # fmt: skip
    out.update(figures(out))
    return out


# issue 15's targets on a quiet machine: (figure, bound, "<=" or ">=")
SERVE_TARGETS = (("serve_p50_ms", 2.0, "<="), ("serve_p99_ms", 5.0, "<="),
                 ("serve_open200_p50_ms", 3.0, "<="), ("serve_open200_p99_ms", 10.0, "<="),
                 ("serve_rows_per_s_16", 3000.0, ">="))  # fmt: skip


def figures(out: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a serve run."""
    fig: dict[str, Any] = {}
    if out.get("one_row"):
        fig["serve_p50_ms"], fig["serve_p99_ms"] = (
            out["one_row"]["p50_ms"],
            out["one_row"]["p99_ms"],
        )
    if out.get("floor") and out.get("one_row"):
        fig["serve_floor_p50_ms"] = out["floor"]["p50_ms"]
        fig["serve_p50_over_floor"] = out["one_row"]["p50_ms"] / out["floor"]["p50_ms"]
    if out.get("one_row_http"):
        fig["serve_http_p50_ms"] = out["one_row_http"]["p50_ms"]
        fig["serve_http_p99_ms"] = out["one_row_http"]["p99_ms"]
    for cell in out.get("cells", []):
        if cell["target_rps"] == 200.0:
            fig["serve_open200_p50_ms"], fig["serve_open200_p99_ms"] = (
                cell["p50_ms"],
                cell["p99_ms"],
            )
        elif cell["target_rps"] is None and cell["max_wait_ms"] == "default":
            fig["serve_rows_per_s_16"] = cell["throughput_rps"]
        elif cell["target_rps"] is None:
            fig["serve_rows_per_s_16_unbatched"] = cell["throughput_rps"]
    return fig


def summary_lines(out: dict[str, Any]) -> list[str]:
    lines = []
    if out.get("one_row"):
        lines.append(fmt_one("one row, front door", out["one_row"]))
        hops = out["one_row"]["hops_p50_ms"]
        lines.append("  per hop, p50 ms: " + ", ".join(f"{h} {v:.2f}" for h, v in hops.items()))
    if out.get("floor"):
        floor = out["floor"]
        ratio = (f", TRACI's p50 {out['one_row']['p50_ms'] / floor['p50_ms']:.1f}x that"
                 if out.get("one_row") else "")  # fmt: skip
        lines.append(
            "empty topology, same messages, no work (bench.serve_floor): "
            f"p50 {floor['p50_ms']:.2f} ms  p99 {floor['p99_ms']:.2f} ms{ratio}"
        )
    if out.get("one_row_http"):
        lines.append(fmt_one("one row, HTTP", out["one_row_http"]))
    for cell in out.get("cells", []):
        lines.append(fmt(cell))
        if cell.get("cpu_us_per_request") and cell["target_rps"] is None:
            lines.append("  " + fmt_cpu(cell["cpu_us_per_request"]))
    for key, bound, way in SERVE_TARGETS:
        if out.get(key) is not None:
            ok = out[key] <= bound if way == "<=" else out[key] >= bound
            lines.append(f"{key:<24} {out[key]:9.2f}   target {way} {bound:g}   "
                         + ("met" if ok else "MISSED"))  # fmt: skip
    return lines


def fmt(cell: dict[str, Any]) -> str:
    rate = "max" if cell["target_rps"] is None else f"{cell['target_rps']:.0f}/s"
    head = f"max_wait {cell['max_wait_ms']!s:>7} ms  rate {rate:>7}  clients {cell['threads']:>2}"
    if not cell["requests"]:
        return f"{head}: no answers"
    return (
        f"{head}: p50 {cell['p50_ms']:7.2f} ms  p99 {cell['p99_ms']:8.2f} ms  "
        f"{cell['throughput_rps']:7.0f} req/s  batch {cell['mean_batch_rows']:5.1f} rows  "
        f"errors {cell['errors']}"
        + (f"  overloaded: {cell['unsent']} not sent" * bool(cell["unsent"]))
    )


def fmt_one(what: str, cell: dict[str, Any]) -> str:
    return (f"{what}: one client, closed loop, {cell['requests']} requests: "
            f"p50 {cell['p50_ms']:.2f} ms  p99 {cell['p99_ms']:.2f} ms")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter cells")
    parser.add_argument("--out", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    results = run(quick=args.quick)
    print("\n== served prediction (reference model: 4 experts, 256 columns, one row a request)")
    for line in summary_lines(results):
        print("  " + line)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
