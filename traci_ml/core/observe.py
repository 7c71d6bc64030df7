"""Logging setup and the Prometheus endpoint helper shared by every service.

Each service builds its metrics in its own ``CollectorRegistry`` (so several services can live
in one test process) and exposes it with ``serve_metrics``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import urllib.parse
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

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


def metrics_url(bind: str, port: int, names: Sequence[str] = ()) -> str:
    """Where a process on this machine scrapes ``serve_metrics(bind=bind, port=port)``: a
    wildcard bind is reached at 127.0.0.1, an IPv6 one in brackets. ``names``: only those
    metrics (prometheus_client's ``name[]`` filter), a read, not a scrape (``RunEnd``)."""
    host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
    host = f"[{host}]" if ":" in host else host
    query = "?" + urllib.parse.urlencode([("name[]", n) for n in names]) if names else ""
    return f"http://{host}:{port}/metrics{query}"


class RunEnd:
    """``traci_run_finished``: 0 while a service runs (or serves), 1 once its run is done.

    A container that ends with its run looks, to a Prometheus with static targets (compose),
    just like one that died. ``finished(wait)`` sets it to 1 and keeps the endpoint up until
    a scrape has read it, ``wait`` seconds at most, so the alert rules can tell the two apart
    (TraciTargetDown: ``unless last_over_time(traci_run_finished[1d]) == 1``). This object is
    the metric's collector: the scrape whose collection notices the end is the one that reads
    the 1. Only a scrape that asks for this metric counts: ``traci health`` (the containers'
    health checks) asks for its own metrics by name (``/metrics?name[]=...``), which
    collects nothing here, so a health check cannot pass for Prometheus's last scrape. The
    answer is written after the collection, by the endpoint's daemon thread: ``finished``
    gives it ``SEND`` seconds before the process may exit.
    """

    SEND = 0.5
    NAME = "traci_run_finished"
    HELP = "1 once this service's run is done (it is about to exit 0), else 0"

    def __init__(self, registry: CollectorRegistry) -> None:
        self._scraped = threading.Event()
        self.value = 0.0
        registry.register(self)

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.NAME, self.HELP)]

    def collect(self) -> list[GaugeMetricFamily]:
        self._scraped.set()  # before reading: a scrape that sets it after the end reads 1
        return [GaugeMetricFamily(self.NAME, self.HELP, value=self.value)]

    def finished(self, wait: float) -> bool:
        """Mark the run done; True if a scrape read it within ``wait`` seconds."""
        self.value = 1.0
        self._scraped.clear()
        if wait <= 0 or not self._scraped.wait(wait):
            return False
        time.sleep(self.SEND)
        return True
