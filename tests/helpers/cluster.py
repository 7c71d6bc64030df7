"""A `traci up` cluster driven from a test: start it, watch training, kill its services."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

from traci_ml.app.api import TRACI, LocalCluster

__all__ = ["TRACI", "Cluster", "assert_at_most_once"]


class Cluster(LocalCluster):
    """``traci_ml.LocalCluster`` plus what fault tests need: pids, kills, ledgers, stalls."""

    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        super().__init__(config_path)
        self.run_dir = Path(config["run_dir"])

    def train_step(self) -> int:
        recs = self.records()
        return recs[-1]["step"] if recs else 0

    def wait_for_step(self, step: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while self.train_step() < step:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"training did not reach step {step} in {timeout}s")
            time.sleep(0.2)

    def pids(self) -> dict[str, int]:
        return json.loads((self.run_dir / "pids.json").read_text())

    def kill(self, service: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pids()[service]
        os.kill(pid, sig)
        return pid

    def wait_restarted(self, service: str, old_pid: int, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.pids().get(service)
            if pid is not None and pid != old_pid:
                return pid
            self._check_alive()
            time.sleep(0.1)
        raise TimeoutError(
            f"{service} was not restarted in {timeout}s; traci up printed:\n{self.output[-3000:]}"
        )

    def metric(self, port: int, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        assert self.proc is not None
        self.proc.wait(timeout=timeout)
        self._join_reader()
        return self.proc.returncode, self.output

    def ledger(self, expert_id: int) -> list[int]:
        path = self.run_dir / "experts" / f"expert-{expert_id}.applied"
        return [int(x) for x in path.read_text().split()]

    def max_stall(self) -> float:
        """Longest wall-clock gap between consecutive training records (seconds)."""
        times = [r["time"] for r in self.records()]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self._join_reader()
            raise RuntimeError(
                f"traci up exited with {self.proc.returncode}:\n{self.output[-3000:]}"
            )


def assert_at_most_once(ledger: list[int]) -> None:
    """Every applied seq appears once, in increasing order, across restarts."""
    assert len(ledger) == len(set(ledger)), "a gradient was applied twice"
    assert ledger == sorted(ledger), "gradients applied out of step order"
