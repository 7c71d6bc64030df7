"""A `traci up` cluster driven from a test: start it, watch training, kill its services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

TRACI = [sys.executable, "-m", "traci_ml.cli"]


class Cluster:
    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        self.config_path, self.config = config_path, config
        self.run_dir = Path(config["run_dir"])
        self.proc: subprocess.Popen | None = None
        self.output = ""

    def __enter__(self) -> Cluster:
        self.proc = subprocess.Popen(
            [*TRACI, "up", str(self.config_path)], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()

    # -- observing ----------------------------------------------------------------------

    def records(self, kind: str = "train") -> list[dict[str, Any]]:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if rec.get("kind") == kind:
                out.append(rec)
        return out

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
            time.sleep(0.1)
        raise TimeoutError(f"{service} was not restarted in {timeout}s")

    def metric(self, port: int, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        assert self.proc is not None
        out, _ = self.proc.communicate(timeout=timeout)
        self.output = out
        return self.proc.returncode, out

    def summary(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "summary.json").read_text())

    def ledger(self, expert_id: int) -> list[int]:
        path = self.run_dir / "experts" / f"expert-{expert_id}.applied"
        return [int(x) for x in path.read_text().split()]

    def max_stall(self) -> float:
        """Longest wall-clock gap between consecutive training records (seconds)."""
        times = [r["time"] for r in self.records()]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            out = self.proc.communicate()[0]
            raise RuntimeError(f"traci up exited with {self.proc.returncode}:\n{out[-3000:]}")


def assert_at_most_once(ledger: list[int]) -> None:
    """Every applied seq appears once, in increasing order, across restarts."""
    assert len(ledger) == len(set(ledger)), "a gradient was applied twice"
    assert ledger == sorted(ledger), "gradients applied out of step order"
