"""Accounts and the applied ledger across SIGKILLs: experts and the reducer are killed right
after they write a checkpoint (and one expert between two), `traci up` restarts them with
--resume, and at the end every expert's books balance (sent == applied + acked + dropped +
in flight) and its ledger lists exactly the gradients its final model holds, once each."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.helpers.cluster import Cluster, assert_at_most_once
from traci_ml.core import checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

RUN = {
    "train": {"steps": 900, "eval_every": 450, "checkpoint_every": 50},
    "launcher": {"restart_delay": 0.5},
}
N_EXPERTS = 4


def mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def wait_for_new_checkpoint(cluster: Cluster, path: Path, timeout: float = 60) -> None:
    """Return as soon as ``path`` is written again (atomically: a new mtime is a whole file)."""
    before, deadline = mtime(path), time.monotonic() + timeout
    while mtime(path) == before:
        cluster._check_alive()
        assert time.monotonic() < deadline, f"{path.name} not written in {timeout}s"
        time.sleep(0.002)


def kill_dead(cluster: Cluster, service: str) -> int:
    """SIGKILL ``service`` and wait until it is gone (nothing more reaches its files)."""
    pid = cluster.kill(service, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.01)
    return pid


def at_kill(cluster: Cluster, i: int) -> dict:
    """What a killed expert left: its ledger's length and its last checkpoint's books."""
    state = checkpoint.load(
        cluster.run_dir / "checkpoints" / f"expert-{i}.pt", run_id="digits", expert_id=i
    )
    ledger = (cluster.run_dir / "experts" / f"expert-{i}.applied").read_bytes()
    kept = ledger[: state["ledger_bytes"]].count(b"\n")  # the lines the checkpoint vouches for
    assert kept == state["accounts"]["applied"], (kept, state["accounts"])
    return {
        "ledger_lines": ledger.count(b"\n"),
        "checkpoint": {**state["accounts"], "inflight": state["inflight"]},
        "checkpoint_ledger_lines": kept,
    }


def test_accounts_and_ledgers_balance_across_kills_after_checkpoints(run_config):
    path, cfg = run_config(RUN)
    ckpts = Path(cfg["run_dir"]) / "checkpoints"
    kills: dict[str, dict] = {}
    with Cluster(path, cfg) as cluster:
        cluster.wait_for_step(60)
        # expert-1: right after a checkpoint (its steps in flight then are lost with it)
        wait_for_new_checkpoint(cluster, ckpts / "expert-1.pt")
        old = kill_dead(cluster, "expert-1")
        kills["expert-1"] = at_kill(cluster, 1)
        cluster.wait_restarted("expert-1", old)
        # the reducer: right after a checkpoint
        wait_for_new_checkpoint(cluster, ckpts / "reducer.pt")
        old = kill_dead(cluster, "reducer")
        cluster.wait_restarted("reducer", old)
        # expert-2: well after a checkpoint (the gradients applied since are rolled back)
        wait_for_new_checkpoint(cluster, ckpts / "expert-2.pt")
        lines = len(cluster.ledger(2))
        while len(cluster.ledger(2)) < lines + 20:
            cluster._check_alive()
            time.sleep(0.01)
        old = kill_dead(cluster, "expert-2")
        kills["expert-2"] = at_kill(cluster, 2)
        cluster.wait_restarted("expert-2", old)
        # expert-1 again, right after its next checkpoint
        wait_for_new_checkpoint(cluster, ckpts / "expert-1.pt")
        old = kill_dead(cluster, "expert-1")
        kills["expert-1 again"] = at_kill(cluster, 1)
        cluster.wait_restarted("expert-1", old)
        code, out = cluster.finish(timeout=240)
        assert code == 0, out[-4000:]
        summary = cluster.summary()

    logs = cluster.run_dir / "logs"
    report: dict = {"kills": kills, "final": {}, "steps": summary["steps"]}
    for i in range(N_EXPERTS):
        record = json.loads((cluster.run_dir / "experts" / f"expert-{i}.json").read_text())
        books = {k: record[k] for k in ("sent", "applied", "acked", "dropped", "inflight")}
        assert record["sent"] == (
            record["applied"] + record["acked"] + record["dropped"] + record["inflight"]
        ), (i, record)
        assert record["inflight"] == 0
        ledger = cluster.ledger(i)
        assert_at_most_once(ledger)
        assert len(ledger) == record["applied"], (i, len(ledger), record)
        state = checkpoint.load(ckpts / f"expert-{i}.pt", run_id="digits", expert_id=i)
        assert state["accounts"] == {k: v for k, v in record.items() if k in state["accounts"]}
        ledger_path = cluster.run_dir / "experts" / f"expert-{i}.applied"
        assert state["ledger_bytes"] == ledger_path.stat().st_size
        log = (logs / f"expert-{i}.log").read_text()
        cuts = [int(n) for n in re.findall(r"(\d+) applied gradients rolled back", log)]
        assert record["rolled_back"] == sum(cuts)
        report["final"][f"expert-{i}"] = {**books, "rolled_back": record["rolled_back"]}
        if i in (1, 2):
            assert log.count("resumed from") == (2 if i == 1 else 1)
        else:
            assert "resumed from" not in log and record["rolled_back"] == 0

    # Each restore cut the ledger back to its checkpoint: what the dead life had appended
    # beyond it is counted rolled back, never left in the ledger.
    for kill in kills.values():
        assert kill["ledger_lines"] >= kill["checkpoint_ledger_lines"]
    cut_2 = kills["expert-2"]["ledger_lines"] - kills["expert-2"]["checkpoint_ledger_lines"]
    assert cut_2 >= 20
    log_2 = (logs / "expert-2.log").read_text()
    assert f"{cut_2} applied gradients rolled back" in log_2
    assert report["final"]["expert-2"]["rolled_back"] == cut_2
    print("\nCHECKPOINT ACCOUNTS " + json.dumps(report, indent=1))
    assert summary["steps"] > 0 and os.path.exists(cluster.run_dir / "summary.json")
