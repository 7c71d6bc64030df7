"""SIGTERM/SIGINT -> a threading.Event that service loops check: stop cleanly, checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)


def stop_on_signals(name: str) -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("%s: %s received, stopping", name, signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


PARENT_ENV = "TRACI_PARENT_PID"  # set by traci up / traci serve for the services they start


def die_with_parent() -> None:
    """A service started by ``traci up`` gets SIGTERM when the launcher dies, even by SIGKILL,
    so a killed launcher leaves no orphans holding its ports (Linux ``PR_SET_PDEATHSIG``).
    Set in the service itself rather than in a pre-exec hook, which is unsafe in a parent
    with threads. If the launcher is already gone, stop now."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if parent.isdigit() and os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)
