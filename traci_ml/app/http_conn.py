"""Slow and many clients on ``traci http``'s REST side (docs/serving.md "Security").

uvicorn keeps a connection open for as long as its client likes while it waits for a
request: one that sends nothing, or a request's headers a byte at a time, holds a file
descriptor and a slot forever (the "slowloris" attack; uvicorn has no header timeout, and its
keep-alive timer is reset by every byte). Two bounds, for every client:

- ``serve.http_read_timeout``: from the moment a connection waits for a request (it opened,
  or its previous answer went out) the whole request, headers and body, must arrive within
  that many seconds, else the connection is closed. Trickling bytes does not reset it.
- ``serve.http_max_connections``: a connection beyond it is closed as it opens (and
  requests in progress beyond it are answered 503 by uvicorn's ``limit_concurrency``), so a
  flood of connections cannot take the process's file descriptors.

The gRPC side (``app/grpc_v2.py``) takes ``serve.http_read_timeout`` as grpc-core's
handshake and idle-connection timeouts, and holds at most ``MAX_CALLS`` calls.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
LOG_EVERY = 10.0  # seconds between two warnings about closed slow connections


class Closed:
    """Counts the connections closed for taking too long or for one too many, and says so
    now and then (one line per ``LOG_EVERY`` seconds at most, with the counts)."""

    def __init__(self) -> None:
        self.slow = 0
        self.over = 0
        self._lock = threading.Lock()
        self._warned = float("-inf")

    def count(self, why: str, client: Any) -> None:
        with self._lock:
            setattr(self, why, getattr(self, why) + 1)
            now = time.monotonic()
            warn = now - self._warned >= LOG_EVERY
            if warn:
                self._warned = now
            slow, over = self.slow, self.over
        if warn:
            what = ("sent no whole request within serve.http_read_timeout" if why == "slow"
                    else "was one over serve.http_max_connections")  # fmt: skip
            log.warning("http: closed a connection from %s that %s (so far: %d slow, %d over "
                        "the limit)", client, what, slow, over)  # fmt: skip


def protocol(read_timeout: float, max_connections: int, closed: Closed) -> type:
    """uvicorn's h11 protocol with a deadline on each request's arrival and a cap on the
    connections open at once (see the module)."""

    class Deadline(H11Protocol):
        _wait = 0  # which wait the pending timer belongs to (a later one replaces it)

        def _arm(self) -> None:
            self._wait += 1
            self.loop.call_later(read_timeout, self._expire, self._wait)

        def _expire(self, wait: int) -> None:
            if wait != self._wait or self.transport.is_closing():
                return
            # IDLE: the request's headers have not all come; SEND_BODY: its body has not
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                closed.count("slow", self.client)
                self.transport.close()

        def connection_made(self, transport) -> None:  # noqa: ANN001
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                closed.count("over", self.client)
                transport.close()  # connection_lost takes it out of the set
                return
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

    return Deadline
