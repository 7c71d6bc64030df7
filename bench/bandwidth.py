"""Bandwidth-limited training: the experts behind one rate-limited link (issue 12).

Network namespaces (``tests/helpers/netns.py``'s ``Lab``: a hub namespace with a bridge, one
namespace per host): ``core`` holds the broker and the reducer (the reducer reaches the broker
over the namespace's own loopback route), ``expert0`` .. ``expert3`` one expert each. The core's
veth is shaped in both directions with a token bucket (``tc qdisc ... tbf rate R burst B
latency 50ms``; ``netem`` is not available everywhere), so every EMB up and every GRAD down
crosses one link of rate R (the broker's, shared by every expert). Nothing is added to the
namespace the benchmark runs in; the namespaces (and their qdiscs) are deleted at the end.

Model: digits quadrants with ``embed_dim`` 128 and batch 1024 (one reducer layer): one step
moves 4 x 1024 x 128 x 4 B = 2 MiB of float32 embeddings each way, 12.5 MB/s at 100 Mbit/s
carries ~6 steps/s, below what the cores do, so the link is the bottleneck at 100 Mbit/s
and (mostly) not at 1000 Mbit/s. Per rate and wire dtype (``DTYPES``, ``expert.dtype``):
train steps/s (``bench.cluster.train_rate`` from the record at ``steps // 5``), the core's
link bytes per step and the share of the link the run used (``link_utilisation``; near 1:
link-bound; ``raw_tcp_bytes_per_s``: what one plain TCP stream gets across the same link, for
scale). ``bandwidth_100mbit_speedup`` = steps/s of the compact dtype (the last of
``DTYPES``) / float32's at 100 Mbit/s.

Needs root, ``ip netns`` and ``tc``: otherwise the section is ``{"skipped": why}``.

    python -m bench.bandwidth [--quick]
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.accel import base_config
from bench.cluster import section_main, train_rate
from traci_ml.core.rundir import RunDir

DTYPES = ("float32", "int8")  # expert.dtype, float32 first: the speedup is last / first
FALLBACK_DTYPE = "float16"  # in place of a dtype this checkout's config does not accept yet
RATES_MBIT = (100, 1000)
QUICK_RATES_MBIT = (100,)
N_EXPERTS = 4
EMBED_DIM, BATCH = 128, 1024
STEPS, QUICK_STEPS = 100, 60
EXPERT_PORT, REDUCER_PORT = 5555, 5556  # per namespace: nothing else listens there
RUN_TIMEOUT = 300.0  # seconds one training run may take
# Config sections every run adds: the broker waits for every expert's token (a deadline join
# would mask the tokens still queued at the link, and count drops as throughput).
EXTRA: dict[str, Any] = {"join": {"quorum": "all"}}


def unavailable() -> str | None:
    """Why the namespaces and the shaping cannot be made here, or None."""
    from tests.helpers.netns import unavailable as netns_unavailable

    why = netns_unavailable()
    if why is None and shutil.which("tc") is None:
        why = "`tc` (iproute2) is not installed"
    return why


def bandwidth_config(*, dtype: str, steps: int, host: str, run_dir: Path) -> dict[str, Any]:
    """The run's config: digits quadrants, wide embeddings and big batches, the broker at
    ``host`` (plaintext on a private bridge: ``security.insecure``)."""
    cfg = base_config()
    cfg["run_id"] = "bench-bandwidth"
    cfg["run_dir"] = str(run_dir)
    cfg["embed_dim"] = EMBED_DIM
    cfg["expert"] = {**cfg["expert"], "window": 4, "dtype": dtype}
    cfg["reducer"] = {**cfg["reducer"], "layers": 1, "ff": 128, "eval_batch_size": 4096}
    cfg["train"] = {**cfg["train"], "steps": steps, "batch_size": BATCH}
    cfg["network"] = {"bind_host": host, "broker_host": host, "expert_port": EXPERT_PORT,
                      "reducer_port": REDUCER_PORT, "serve_port": 0, "liveness": 10.0,
                      "connect_timeout": 120.0}  # fmt: skip
    cfg["metrics"] = {"broker_port": 0, "reducer_port": 0, "expert_base_port": 0}
    cfg["security"] = {"insecure": True}
    for section, values in EXTRA.items():
        if _accepted({section: values}):  # a section this checkout does not know yet: left out
            cfg[section] = {**cfg.get(section, {}), **copy.deepcopy(values)}
    return cfg


def _accepted(raw: dict[str, Any]) -> bool:
    from traci_ml.core.config import Config

    try:
        Config.model_validate(raw)
    except ValueError:
        return False
    return True


def wire_dtypes() -> list[str]:
    """``DTYPES``, each one this checkout's config rejects replaced by ``FALLBACK_DTYPE``."""
    return [d if _accepted({"expert": {"dtype": d}}) else FALLBACK_DTYPE for d in DTYPES]


def _shape(lab: Any, rate_mbit: int) -> None:
    """A token bucket of ``rate_mbit`` on the core's link, both ways (replacing any before)."""
    burst_kbit = max(32, rate_mbit)  # ~1 ms of the rate: enough for 1 Gbit/s, 32kbit at least
    for ns, dev in ((lab.ns("core"), "eth0"), (lab.hub, "vcore")):
        subprocess.run(
            ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
             "rate", f"{rate_mbit}mbit", "burst", f"{burst_kbit}kbit", "latency", "50ms"],
            check=True, capture_output=True, text=True, timeout=20,
        )  # fmt: skip


_RECEIVE = """
import socket, sys, time
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
conn, _ = srv.accept()
n, first = 0, None
while chunk := conn.recv(1 << 20):
    first = first or time.monotonic()
    n += len(chunk)
print(n, time.monotonic() - (first or time.monotonic()))
"""
_SEND = """
import socket, sys, time
for _ in range(100):
    try:
        conn = socket.create_connection((sys.argv[1], int(sys.argv[2])))
        break
    except OSError:
        time.sleep(0.05)
block, end = bytes(1 << 16), time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    conn.sendall(block)
conn.close()
"""


def raw_throughput(lab: Any, tmp: Path, seconds: float = 2.0) -> float:
    """Bytes/s one TCP stream gets from ``expert0`` to the core across the shaped link: what
    the link carries without TRACI, to read ``link_utilisation`` against."""
    port = EXPERT_PORT + 100
    log = tmp / f"receive-{time.monotonic_ns()}.log"
    receiver = lab.popen("core", [sys.executable, "-c", _RECEIVE, lab.hosts["core"], str(port)],
                         log=log)  # fmt: skip
    try:
        lab.run("expert0", [sys.executable, "-c", _SEND, lab.hosts["core"], str(port),
                            str(seconds)], timeout=seconds + 30, check=True)  # fmt: skip
        receiver.wait(30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait(10)
    n, took = log.read_text().split()
    return int(n) / max(float(took), 1e-9)


def _clean_env() -> dict[str, str]:
    """This environment without TRACI_* (a TRACI_PARENT_PID would tie a service to us)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACI_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def _one_run(lab: Any, tmp: Path, *, dtype: str, rate_mbit: int, steps: int) -> dict[str, Any]:
    """Train once across the shaped link; steps/s, bytes, utilisation."""
    run_dir = tmp / f"run-{rate_mbit}-{dtype}"
    logs = tmp / f"logs-{rate_mbit}-{dtype}"
    logs.mkdir()
    cfg = bandwidth_config(dtype=dtype, steps=steps, host=lab.hosts["core"], run_dir=run_dir)
    path = tmp / f"bandwidth-{rate_mbit}-{dtype}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _shape(lab, rate_mbit)
    traci = [sys.executable, "-m", "traci_ml.app.cli"]
    env = _clean_env()
    before = lab.link_stats("core")
    began = time.monotonic()
    procs = {"broker": lab.popen("core", [*traci, "broker", "--config", str(path)],
                                 log=logs / "broker.log", env=env, cwd=tmp)}  # fmt: skip
    procs["reducer"] = lab.popen("core", [*traci, "reducer", "--config", str(path)],
                                 log=logs / "reducer.log", env=env, cwd=tmp)  # fmt: skip
    for i in range(N_EXPERTS):
        procs[f"expert-{i}"] = lab.popen(
            f"expert{i}", [*traci, "expert", "--id", str(i), "--config", str(path)],
            log=logs / f"expert-{i}.log", env=env, cwd=tmp,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while procs["reducer"].poll() is None:
            for name, proc in procs.items():
                if proc.poll() not in (None, 0):  # the broker and experts end 0 when done
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n"
                                       f"{_tail(logs / f'{name}.log')}")  # fmt: skip
            if time.monotonic() > deadline:
                raise TimeoutError(f"training ran past {RUN_TIMEOUT}s")
            time.sleep(0.2)
        if procs["reducer"].returncode != 0:
            raise RuntimeError(f"reducer exited with {procs['reducer'].returncode}:\n"
                               f"{_tail(logs / 'reducer.log')}")  # fmt: skip
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    after = lab.link_stats("core")
    run = RunDir(run_dir)
    records = [json.loads(line) for line in run.metrics.open()]
    summary = json.loads(run.summary.read_text())
    steps_per_s = train_rate(records, BATCH, warmup=steps // 5) / BATCH
    # Bytes over the whole run (registration, the final evaluation) per train step: an upper
    # bound on a train step's own; rx at the core: EMBs up, tx: GRADs down.
    up = (after["rx_bytes"] - before["rx_bytes"]) / max(summary["steps"], 1)
    down = (after["tx_bytes"] - before["tx_bytes"]) / max(summary["steps"], 1)
    link_bytes_per_s = rate_mbit * 1e6 / 8
    return {
        "rate_mbit": rate_mbit,
        "dtype": dtype,
        "steps_per_s": steps_per_s,
        "samples_per_sec": steps_per_s * BATCH,
        "test_accuracy": summary.get("test_accuracy"),
        "link_bytes_up_per_step": up,
        "link_bytes_down_per_step": down,
        "link_utilisation": max(up, down) * steps_per_s / link_bytes_per_s,
        "wire_bytes_per_step": summary.get("wire_bytes_per_step"),  # the reducer's count
        "run_seconds": round(time.monotonic() - began, 1),
    }


def run(*, quick: bool = False, keep: Path | None = None) -> dict[str, Any]:
    """Every rate x dtype; ``keep``: a folder to leave the runs' logs in (else a temporary one)."""
    why = unavailable()
    if why is not None:
        print(f"  bandwidth: skipped: {why}", flush=True)
        return {"skipped": why}
    from tests.helpers.netns import Lab

    began = time.monotonic()
    dtypes = wire_dtypes()
    steps = QUICK_STEPS if quick else STEPS
    rows: list[dict[str, Any]] = []
    raw: dict[str, float | None] = {}  # rate -> bytes/s of one plain TCP stream across the link
    with tempfile.TemporaryDirectory(prefix="traci-bandwidth-") as scratch:
        tmp = keep or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        lab = Lab("tbw")
        try:
            lab.add("core")
            for i in range(N_EXPERTS):
                lab.add(f"expert{i}")
            for rate in QUICK_RATES_MBIT if quick else RATES_MBIT:
                _shape(lab, rate)
                try:
                    raw[str(rate)] = raw_throughput(lab, tmp)
                    print(f"  bandwidth {rate} Mbit/s: one TCP stream gets "
                          f"{raw[str(rate)] * 8 / 1e6:.0f} Mbit/s", flush=True)  # fmt: skip
                except (subprocess.SubprocessError, OSError, ValueError) as exc:
                    raw[str(rate)] = None
                    print(f"  bandwidth {rate} Mbit/s: raw TCP check failed: {exc}", flush=True)
                for dtype in dtypes:
                    try:
                        row = _one_run(lab, tmp, dtype=dtype, rate_mbit=rate, steps=steps)
                    except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
                        # one failed cell (a dtype mid-change, say) leaves the others standing
                        rows.append({"rate_mbit": rate, "dtype": dtype, "error": str(exc)[-3000:]})
                        print(f"  bandwidth {rate} Mbit/s {dtype}: FAILED {exc}", flush=True)
                        continue
                    rows.append(row)
                    print(f"  bandwidth {rate} Mbit/s {dtype}: {row['steps_per_s']:.2f} steps/s "
                          f"({row['samples_per_sec']:,.0f} samples/s), link "
                          f"{row['link_utilisation']:.2f} used, {row['run_seconds']} s",
                          flush=True)  # fmt: skip
        finally:
            lab.close()
    out: dict[str, Any] = {
        "rows": rows,
        "raw_tcp_bytes_per_s": raw,
        "settings": {"dtypes": dtypes, "asked_dtypes": list(DTYPES), "embed_dim": EMBED_DIM,
                     "batch_size": BATCH, "experts": N_EXPERTS, "steps": steps,
                     "window": 4, "link": "one tbf-shaped veth, both ways, all experts"},
        "elapsed_s": round(time.monotonic() - began, 1),
    }  # fmt: skip
    for rate in sorted({r["rate_mbit"] for r in rows}):
        ok = [r for r in rows if r["rate_mbit"] == rate and "error" not in r]
        by = {r["dtype"]: r["steps_per_s"] for r in ok}
        if dtypes[0] in by and dtypes[-1] in by:
            out[f"speedup_{rate}mbit"] = by[dtypes[-1]] / by[dtypes[0]]
    return out


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The section's top-level figures: ``bandwidth_100mbit_speedup`` (compact / float32)."""
    if "speedup_100mbit" not in result:
        return {}
    return {"bandwidth_100mbit_speedup": result["speedup_100mbit"],
            "bandwidth_speedup_dtype": result["settings"]["dtypes"][-1]}  # fmt: skip


def summary_lines(result: dict[str, Any]) -> list[str]:
    if "skipped" in result:
        return [f"bandwidth-limited link: skipped ({result['skipped']})"]
    lines = ["bandwidth-limited link (experts behind one tbf-shaped veth, digits d=128 b=1024):"]
    for rate, got in result.get("raw_tcp_bytes_per_s", {}).items():
        if got is not None:
            lines.append(f"  {rate:>5} Mbit/s link: plain TCP gets {got * 8e-6:.0f} Mbit/s")
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"  {row['rate_mbit']:>5} Mbit/s {row['dtype']:<8} FAILED: "
                         f"{row['error'].splitlines()[0]}")  # fmt: skip
            continue
        lines.append(
            f"  {row['rate_mbit']:>5} Mbit/s {row['dtype']:<8} {row['steps_per_s']:6.2f} steps/s "
            f"({row['samples_per_sec']:8,.0f} samples/s), {row['link_bytes_up_per_step'] / 1e6:.2f}"
            f" MB up per step, link {row['link_utilisation']:.2f} used"
        )
    for key, value in result.items():
        if key.startswith("speedup_"):
            lines.append(f"  {key}: {value:.2f} ({result['settings']['dtypes'][-1]} / "
                         f"{result['settings']['dtypes'][0]})")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    section_main(__doc__, run, summary_lines, ratios, argv, keep=True)


if __name__ == "__main__":
    main()
