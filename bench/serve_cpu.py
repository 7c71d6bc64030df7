"""Where a served request's CPU goes: the CPU time each process of `traci serve` (broker,
reducer, experts, the HTTP translator) and everything else on the machine (the bench's own
client processes, mostly) spent over a load cell, per request answered. Linux /proc only.

On a machine whose cores the serving processes share with the clients (the bench's 2-core
case), throughput is bounded by the sum of these: 2 cores / (CPU per request).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime + stime ticks) of ``pid``, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _role(pid: int) -> str:
    """broker, reducer, expert, http or other, from the process's name and command line."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    if comm.startswith("expert"):
        return "expert"
    if comm == "reducer":
        return "reducer"
    words = [a.decode(errors="replace") for a in argv]
    for role in ("broker", "http"):
        if role in words:
            return role
    return "other"


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = st[0]
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sorted(tree)


def _busy_ticks() -> int:
    """Every CPU's non-idle ticks since boot (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values) - values[3] - values[4]  # less idle and iowait


class CpuMeter:
    """The CPU of a load cell's window: ``window(start, seconds)`` before the load (a thread
    reads the counters at ``start`` and at its end, so the client processes' start-up is not
    in it), ``per_request(answered)`` after, with the requests answered in the window:
    microseconds of CPU per request by role (each expert's own, their mean as ``expert``),
    ``clients`` (the rest of the machine: the bench's clients) and ``total``."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._pids: dict[int, str] = {}
        self._ticks: list[dict[int, int]] = []
        self._busy: list[int] = []
        self._thread: threading.Thread | None = None

    def window(self, start: float, seconds: float) -> None:
        self._pids = {pid: _role(pid) for pid in _descendants(self.server_pid)}
        self._ticks, self._busy = [], []

        def read() -> None:
            for at in (start, start + seconds):
                time.sleep(max(0.0, at - time.monotonic()))
                self._ticks.append({pid: st[1] for pid in self._pids
                                    if (st := _stat(pid)) is not None})  # fmt: skip
                self._busy.append(_busy_ticks())

        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()

    def per_request(self, answered: float) -> dict[str, float]:
        if self._thread is not None:
            self._thread.join()
        if not answered or len(self._ticks) < 2:
            return {}
        us = TICK_S * 1e6 / answered
        spent: dict[str, list[float]] = {}
        server = 0
        for pid, before in self._ticks[0].items():
            after = self._ticks[1].get(pid, before)
            server += max(0, after - before)
            spent.setdefault(self._pids[pid], []).append(max(0, after - before) * us)
        out = {role: sum(v) for role, v in spent.items() if role != "expert" and sum(v)}
        if spent.get("expert"):
            out["expert"] = sum(spent["expert"]) / len(spent["expert"])
            out["experts"] = len(spent["expert"])
        busy = self._busy[1] - self._busy[0]
        out["clients"] = max(0, busy - server) * us
        out["total"] = busy * us
        return out


def fmt_cpu(cpu: dict[str, float]) -> str:
    """One line: CPU microseconds per request by role."""
    if not cpu:
        return "CPU per request: not measured"
    order = ("broker", "reducer", "expert", "http", "other", "clients", "total")
    parts = []
    for role in order:
        if role in cpu:
            each = f" (each of {cpu['experts']:.0f})" if role == "expert" else ""
            parts.append(f"{role}{each} {cpu[role]:.0f}")
    return "CPU per request, us: " + ", ".join(parts)
