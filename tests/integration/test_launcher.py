"""`traci up` as a supervisor: failures surface with the failed service's log, Ctrl-C stops
every process cleanly, and bad configuration is refused before anything starts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

TRACI = [sys.executable, "-m", "traci_ml.app.cli"]


def test_unknown_config_key_is_refused_by_name(tmp_path):
    proc = subprocess.run(
        [*TRACI, "up", "--set", "train.stepz=3", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown config key 'train.stepz'" in proc.stderr


def test_bad_environment_variable_is_refused_by_name(tmp_path):
    env = {"TRACI_NETWORK__BROKER_HOSTT": "x", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([*TRACI, "broker"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert "TRACI_NETWORK__BROKER_HOSTT" in proc.stderr


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_failing_expert_fails_the_cluster_with_its_log(run_config):
    path, cfg = run_config({"expert": {"model": {"module": "no_such_pkg.nets:Tower"}}})
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=150)
    assert proc.returncode == 1
    assert "exited with code 2" in proc.stdout
    assert "no_such_pkg.nets:Tower" in proc.stdout  # the failed service's own error line
    assert not (Path(cfg["run_dir"]) / "summary.json").exists()


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_ctrl_c_stops_every_service_and_checkpoints(run_config):
    path, cfg = run_config({"train": {"steps": 100000}}, metrics=True)
    proc = subprocess.Popen(
        [*TRACI, "up", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_dir = Path(cfg["run_dir"])
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:  # wait until training is under way
        records = run_dir / "metrics.jsonl"
        if records.exists() and records.read_text().count('"train"') >= 2:
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("training never started:\n" + proc.communicate()[0][-3000:])
    url = f"http://127.0.0.1:{cfg['metrics']['broker_port']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    count = next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("traci_broker_queue_latency_seconds_count")
    )
    assert count > 0
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
    for name in ["reducer", *(f"expert-{i}" for i in range(4))]:
        assert (run_dir / "checkpoints" / f"{name}.pt").exists(), name
    leftovers = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "services still running after Ctrl-C"
    pids = json.loads((run_dir / "pids.json").read_text())  # forked ones: the zygote's cmdline
    assert len(pids) == 6 and not [n for n, p in pids.items() if _alive(p)], pids
    accounts = json.loads((run_dir / "experts" / "expert-0.json").read_text())
    assert accounts["sent"] == (
        accounts["applied"] + accounts["acked"] + accounts["dropped"] + accounts["inflight"]
    )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_sigkilled_launcher_leaves_no_orphans(run_config):
    path, cfg = run_config({"train": {"steps": 100000}})
    proc = subprocess.Popen([*TRACI, "up", str(path)], stdout=subprocess.DEVNULL)
    run_dir = Path(cfg["run_dir"])
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:  # wait until training is under way
        records = run_dir / "metrics.jsonl"
        if records.exists() and '"train"' in records.read_text():
            break
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("training never started")
    pids = json.loads((run_dir / "pids.json").read_text())
    assert len(pids) == 6 and all(_alive(p) for p in pids.values())
    proc.kill()  # SIGKILL: the launcher gets no chance to stop its services
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [n for n, p in pids.items() if _alive(p)], "services outlived traci up"
