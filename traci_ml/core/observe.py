"""Logging setup and the Prometheus endpoint helper shared by every service.

Each service builds its metrics in its own ``CollectorRegistry`` (so several services can live
in one test process) and exposes it with ``serve_metrics``.
"""

from __future__ import annotations

import logging
import sys

from prometheus_client import CollectorRegistry, start_http_server

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
