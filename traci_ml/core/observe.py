"""Logging setup and the Prometheus endpoint helper shared by every service.

Each service builds its metrics in its own ``CollectorRegistry`` (so several services can live
in one test process) and exposes it with ``serve_metrics``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from traci_ml.core.errors import ConfigError

# Latency buckets from 50 us to 10 s: queue latency on loopback sits in the sub-millisecond range.
LATENCY_BUCKETS = (
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def setup_logging(service: str, level: str = "INFO") -> None:
    """One logging setup per process, at the entry point. Lines name the service."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
        force=True,
    )


def serve_metrics(registry: CollectorRegistry, *, bind: str, port: int) -> int | None:
    """Expose ``registry`` over HTTP at ``bind:port``; port 0 disables. Returns the port."""
    if port == 0:
        return None
    try:
        server, _thread = start_http_server(port, addr=bind, registry=registry)
    except OSError as exc:
        raise ConfigError(f"metrics endpoint {bind}:{port} cannot bind: {exc.strerror}") from None
    return int(server.server_port)


def metrics_url(bind: str, port: int) -> str:
    """Where a process on this machine scrapes ``serve_metrics(bind=bind, port=port)``: a
    wildcard bind is reached at 127.0.0.1."""
    host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
    return f"http://{host}:{port}/metrics"


class RunEnd:
    """``traci_run_finished``: 0 while a service runs (or serves), 1 once its run is done.

    A container that ends with its run looks, to a Prometheus with static targets (compose),
    just like one that died. ``finished(wait)`` sets the gauge and keeps the endpoint up until
    Prometheus has scraped it once more, ``wait`` seconds at most, so the alert rules can tell
    the two apart (TraciTargetDown: ``unless last_over_time(traci_run_finished[1d]) == 1``).
    A scrape is noticed by this object's ``collect``, which the registry calls on every scrape
    before the gauge's (registered first): the scrape that sets the event reads the 1. Its
    answer is written after the collection, by the endpoint's daemon thread: ``finished``
    gives it ``SEND`` seconds before the process may exit.
    """

    SEND = 0.5

    def __init__(self, registry: CollectorRegistry) -> None:
        self._scraped = threading.Event()
        registry.register(self)  # before the gauge: see the class docstring
        self.gauge = Gauge(
            "traci_run_finished",
            "1 once this service's run is done (it is about to exit 0), else 0",
            registry=registry,
        )

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self._scraped.set()
        return []

    def finished(self, wait: float) -> bool:
        """Mark the run done; True if a scrape read it within ``wait`` seconds."""
        self.gauge.set(1)
        self._scraped.clear()
        if wait <= 0 or not self._scraped.wait(wait):
            return False
        time.sleep(self.SEND)
        return True
