"""Time to the first training step of a fresh ``make run``, and where it goes.

    python -m bench.startup [--repeats 3] [--config examples/digits.yaml] [--out FILE]
                            [--baseline DIR]

``e2e``: ``traci up CONFIG --fresh`` exactly as ``make run`` runs it, on free ports and a
temporary run directory, with ``train.log_every=1`` so the first step is written down; it is
stopped (Ctrl-C) once the reducer has recorded step 1. Each event is seconds after the
command was started: the launcher's first line, the broker bound (its first log line), the
reducer and each expert registered and the start gate open (the broker's log), and the first
train record (``metrics.jsonl``'s ``time``). ``phases``: what one expert or reducer process
spends before it can register, each phase timed in a fresh interpreter, one process alone:
the imports, the first ``torch.optim`` optimizer (its first call imports ``torch._dynamo``),
the data, the model. A cluster pays the phases once per process, all at once, on the
machine's cores. Medians of ``--repeats`` runs with min and max. No test asserts a time.

``--baseline DIR``: a checkout of another commit (``git archive COMMIT | tar -x -C DIR``, then
``ln -s ../services DIR/traci_ml/services; ln -s ../proto DIR/traci_ml/proto`` so that it
imports its own code, not this installation's), run the same way, its runs alternating with
this tree's so that a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from bench.e2e import free_port_block, free_ports

TRACI = [sys.executable, "-m", "traci_ml.app.cli"]
PHASES = r"""
import json, sys, time
t = [time.monotonic()]
from traci_ml.core.config import load_config
t.append(time.monotonic())
import torch
t.append(time.monotonic())
import traci_ml.services.expert.service, traci_ml.services.reducer.service
t.append(time.monotonic())
from traci_ml.core.models.optim import make_adam
make_adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, weight_decay=0.0)
t.append(time.monotonic())
from traci_ml.core.data import load_expert_data
config = load_config(sys.argv[1])
data = load_expert_data(config, 0)
t.append(time.monotonic())
from traci_ml.core.models.expert import build_expert
build_expert(config, 0, data.table.shape[1], torch.device("cpu"))
t.append(time.monotonic())
names = ["config_import", "torch_import", "services_import", "first_optimizer", "data",
         "model"]
print(json.dumps({n: b - a for n, a, b in zip(names, t, t[1:])}))
"""


def _log_times(path: Path) -> list[tuple[float, str]]:
    """(Unix time, message) of each line of a service log (``setup_logging``'s format)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        out.append((stamp, line[24:]))
    return out


def one_run(config: str, timeout: float = 300, cwd: str | None = None) -> dict[str, float]:
    """One fresh ``traci up``, stopped after its first step: event -> seconds after start.
    ``cwd``: the tree whose code runs (its ``traci_ml``, found first on ``sys.path``)."""
    config = str(Path(config).resolve())
    with tempfile.TemporaryDirectory(prefix="traci-startup-") as tmp:
        run = Path(tmp) / "run"
        expert_port, reducer_port, serve_port, broker_m, reducer_m = free_ports(5)
        sets = {"run_dir": run, "train.log_every": 1, "network.expert_port": expert_port,
                "network.reducer_port": reducer_port, "network.serve_port": serve_port,
                "metrics.broker_port": broker_m, "metrics.reducer_port": reducer_m,
                "metrics.expert_base_port": free_port_block(16)}  # fmt: skip
        argv = [*TRACI, "up", config, "--fresh", *(f"--set={k}={v}" for k, v in sets.items())]
        first_line: list[float] = []
        start = time.time()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=cwd)  # fmt: skip
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if not first_line:
                    first_line.append(time.time())
                lines.append(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        metrics = run / "metrics.jsonl"
        first_step = None
        deadline = time.monotonic() + timeout
        while first_step is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                for raw in metrics.read_text().splitlines():
                    rec = json.loads(raw)
                    if rec.get("kind") == "train":
                        first_step = rec["time"]
                        break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(10)
        if first_step is None:
            raise RuntimeError("no training step:\n" + "".join(lines)[-3000:])
        events = {"first_line": first_line[0] if first_line else float("nan")}
        broker = _log_times(run / "logs" / "broker.log")
        events["broker_bound"] = broker[0][0]
        for stamp, msg in broker:
            if "reducer registered" in msg:
                events.setdefault("reducer_registered", stamp)
            elif " registered" in msg and "expert " in msg:
                events["last_expert_registered"] = stamp  # the last one wins
                events.setdefault("first_expert_registered", stamp)
            elif "start gate open" in msg:
                events.setdefault("gate_open", stamp)
        events["first_step"] = first_step
        out = {k: round(v - start, 3) for k, v in events.items()}
        zygote = run / "logs" / "zygote.log"  # its imports, once for every forked service
        took = re.search(r"zygote: imported .* in ([\d.]+)s", zygote.read_text()) \
            if zygote.exists() else None  # fmt: skip
        if took:
            out["zygote_imports"] = float(took.group(1))
        return out


def phases(config: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", PHASES, config], capture_output=True,
                          text=True, check=True, timeout=300)  # fmt: skip
    return {k: round(v, 3) for k, v in json.loads(proc.stdout.splitlines()[-1]).items()}


def _spread(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in keys}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="examples/digits.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the result here as JSON")
    parser.add_argument("--baseline", help="another checkout to run the same way, alternating")
    args = parser.parse_args(argv)
    with open("/proc/loadavg") as fh:
        load_before = fh.read().split()[:3]
    runs: list[dict[str, float]] = []
    base: list[dict[str, float]] = []
    for _ in range(args.repeats):
        runs.append(one_run(args.config))
        if args.baseline:
            base.append(one_run(args.config, cwd=args.baseline))
    e2e = _spread(runs)
    alone = _spread([phases(args.config) for _ in range(args.repeats)])
    with open("/proc/loadavg") as fh:
        load_after = fh.read().split()[:3]
    result = {"config": args.config, "e2e_seconds": e2e, "phases_seconds_one_process": alone,
              "loadavg_before": load_before, "loadavg_after": load_after}  # fmt: skip
    tables = [("e2e (s after traci up started)", e2e), ("phases, one process", alone)]
    if base:
        result["baseline"] = {"dir": args.baseline, "e2e_seconds": _spread(base)}
        tables.insert(1, (f"baseline {args.baseline} e2e", result["baseline"]["e2e_seconds"]))
    for name, table in tables:
        print(name)
        for k, v in table.items():
            print(f"  {k:24} {v['median']:7.2f}  ({v['min']:.2f} .. {v['max']:.2f})")
    print(f"load average before {' '.join(load_before)}, after {' '.join(load_after)}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
