"""A run you can watch, with real processes: `traci up` into a pipe prints its phases in plain
lines (the expert it waits for by name), every service logs one "ready" line, and `traci
serve` says "ready" only once its front door answers."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers.support import free_ports
from traci_ml import Client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
TRACI = [sys.executable, "-m", "traci_ml.app.cli"]
LATE = 6.0  # seconds expert-1 takes to build its network


@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> tuple[Path, str]:
    """examples/heterogeneous.yaml, short, with expert-1's network slow to build."""
    root = tmp_path_factory.mktemp("watched")
    cfg = yaml.safe_load(Path("examples/heterogeneous.yaml").read_text())
    ports = free_ports(6)
    cfg["data"]["views"][1]["model"] = {
        "module": "tests.helpers.slow_expert:SlowTower",
        "kwargs": {"delay": LATE},
    }
    cfg.update(run_dir=str(root / "run"))
    cfg["train"] = {
        "steps": 60,
        "batch_size": 32,
        "eval_every": 30,
        "log_every": 10,
        "checkpoint_every": 0,
    }
    cfg["network"] = {
        "expert_port": ports[0],
        "reducer_port": ports[1],
        "serve_port": ports[2],
        "heartbeat_interval": 0.2,
        "liveness": 2.0,
        "connect_timeout": 60,
    }
    cfg["metrics"] = {"broker_port": ports[3], "reducer_port": ports[4],
                      "expert_base_port": 0}  # fmt: skip
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "run", proc.stdout


def test_up_prints_its_phases_and_names_the_expert_it_waits_for(watched):
    run, out = watched
    lines = out.splitlines()
    assert lines[0].startswith("started broker, reducer, expert-0, expert-1, expert-2; logs in")
    waiting = [x for x in lines if x.startswith("waiting for experts: ")]
    assert any(re.match(r"waiting for experts: expert-1 missing \(2/3 registered", x)
               for x in waiting), out  # fmt: skip
    training = next(i for i, x in enumerate(lines) if x.startswith("training: 60 steps"))
    assert re.search(r"first step \d+\.\ds after start", lines[training])
    assert lines.index(waiting[0]) < training
    evals = [x for x in lines if x.startswith("eval after step ")]
    assert evals[0].startswith("eval after step 30: accuracy ")
    assert "eval after step 60: accuracy" in out  # the last one too, before "done:"
    done = next(i for i, x in enumerate(lines) if x.startswith("done: test_accuracy"))
    assert lines.index(evals[-1]) < done < lines.index(next(x for x in lines if x.startswith(
        "plotting")))  # fmt: skip
    assert lines[-1].startswith("plots in ")
    assert "\x1b[" not in out  # a pipe gets no terminal codes


def test_every_service_logs_one_ready_line(watched):
    run, _ = watched
    for name in ("broker", "reducer", "expert-0", "expert-1", "expert-2"):
        log = (run / "logs" / f"{name}.log").read_text()
        ready = [x for x in log.splitlines() if f" {name} ready: " in x]
        assert len(ready) == 1, (name, log[-2000:])
    broker = (run / "logs" / "broker.log").read_text()
    assert "start gate closed until all 3 experts have registered" in broker
    expert = (run / "logs" / "expert-1.log").read_text()
    assert "expert-1 ready: registered with broker" in expert


def test_serve_says_ready_only_once_it_answers(watched):
    run, _ = watched
    ports = free_ports(4)
    sets = {"network.expert_port": ports[0], "network.reducer_port": ports[1],
            "network.serve_port": ports[2], "metrics.broker_port": ports[3]}  # fmt: skip
    proc = subprocess.Popen(
        [*TRACI, "serve", "--run", str(run), *(f"--set={k}={v}" for k, v in sets.items())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen = []
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("ready: ") or time.monotonic() > deadline:
                break
        assert seen and seen[-1].startswith(f"ready: answering on tcp://127.0.0.1:{ports[2]}")
        assert "(3 of 3 experts live)" in seen[-1], seen
        x = [[0.0] * 30]
        columns = yaml.safe_load((run / "serve.yaml").read_text())["data"]["views"]
        names = [c for view in columns for c in view["columns"]]
        with Client(f"tcp://127.0.0.1:{ports[2]}", timeout=10) as client:
            pred = client.predict(x, names)  # at once: no no_reducer / no_expert any more
        assert len(pred.labels) == 1 and list(pred.experts) == [0, 1, 2]
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=90)[0]
    assert proc.returncode == 0, "".join(seen) + rest
    assert "".join(seen).count("ready: ") == 1
