"""Real processes killed for real: an expert, the broker and the reducer each die with SIGKILL
mid-run, `traci up` restarts them, and training completes with every gradient applied at most
once. A SIGSTOPped reducer keeps every queue within its bounds."""

from __future__ import annotations

import re
import signal
import time

import pytest

from tests.helpers.cluster import Cluster, assert_at_most_once

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

FAULT_RUN = {
    "train": {"steps": 1500, "eval_every": 500, "checkpoint_every": 100},
    "launcher": {"restart_delay": 0.5},
}


def finish_ok(cluster: Cluster) -> dict:
    code, out = cluster.finish()
    assert code == 0, out[-4000:]
    summary = cluster.summary()
    for i in range(4):
        assert_at_most_once(cluster.ledger(i))
    return summary


def killed_midway(run_config, service: str, step: int) -> tuple[Cluster, dict]:
    """A fault run whose ``service`` is killed at ``step``: it must be restarted and the run
    must end well; returns the cluster (stopped) and the run's summary."""
    path, cfg = run_config(FAULT_RUN, metrics=True)
    with Cluster(path, cfg) as cluster:
        cluster.wait_for_step(step)
        old = cluster.kill(service)
        cluster.wait_restarted(service, old)
        summary = finish_ok(cluster)
    return cluster, summary


def test_killed_expert_is_restarted_and_rejoins(run_config):
    cluster, summary = killed_midway(run_config, "expert-2", 300)
    assert "expert-2 exited with signal 9: restart 1/5" in cluster.output
    assert summary["test_accuracy"] >= 0.97
    ledger = cluster.ledger(2)
    assert len(ledger) < 1500  # the steps it was down for were masked, not applied late
    log = (cluster.run_dir / "logs" / "broker.log").read_text()
    assert "expert 2 registered" in log.split("start gate open")[-1]  # it rejoined


def test_killed_broker_is_restarted_and_peers_reconnect(run_config):
    cluster, summary = killed_midway(run_config, "broker", 300)
    assert summary["test_accuracy"] >= 0.97
    logs = cluster.run_dir / "logs"
    gates = re.findall(r"start gate open at (\d+)", (logs / "broker.log").read_text())
    assert len(gates) == 2 and gates[0] == "0" and int(gates[1]) >= 300  # resumed, not reset
    assert cluster.max_stall() < 15  # liveness (2 s here) + restart + re-registration
    for i in range(4):
        text = (logs / f"expert-{i}.log").read_text()
        assert "reconnecting" in text or "registering again" in text, text[-2000:]


def test_killed_reducer_resumes_from_its_checkpoint(run_config):
    cluster, summary = killed_midway(run_config, "reducer", 350)
    assert "resumed from" in (cluster.run_dir / "logs" / "reducer.log").read_text()
    assert summary["test_accuracy"] >= 0.97
    assert summary["steps_skipped"] > 0  # what died with the reducer is counted, not replayed


def test_stopped_reducer_keeps_every_queue_bounded(run_config):
    window, max_pending = 2, 64
    path, cfg = run_config(
        {**FAULT_RUN, "expert": {"window": window}, "network": {"max_pending_steps": max_pending}},
        metrics=True,
    )
    broker_port = cfg["metrics"]["broker_port"]
    with Cluster(path, cfg) as cluster:
        cluster.wait_for_step(200)
        cluster.kill("reducer", signal.SIGSTOP)
        samples, rss = [], []
        broker_pid = cluster.pids()["broker"]
        t_end = time.monotonic() + 8  # well past the reducer's liveness (2 s here)
        while time.monotonic() < t_end:
            samples.append(cluster.metric(broker_port, "traci_broker_pending_steps"))
            rss.append(_rss_kib(broker_pid))
            time.sleep(0.2)
        step_at_stop = cluster.train_step()
        cluster.kill("reducer", signal.SIGCONT)
        summary = finish_ok(cluster)
    assert max(samples) <= window  # every expert blocked on its window, nothing piles up
    assert max(rss) - rss[0] < 10 * 1024  # the broker grew by less than 10 MiB while stalled
    assert summary["steps"] > step_at_stop  # it went on after SIGCONT
    assert summary["test_accuracy"] >= 0.97


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
