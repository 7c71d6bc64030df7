"""A peer's connection to the broker (used by experts and the reducer; not by the broker).

One DEALER socket, the HELLO/WELCOME handshake, heartbeats and broker liveness on
``time.monotonic()``. Every received message is decoded here; a message that fails
validation is counted through ``on_reject`` and logged, never raised to the caller.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq

from traci_ml import proto
from traci_ml.errors import PeerTimeout, ProtocolError, TraciError
from traci_ml.security import ClientKeys, apply_client

log = logging.getLogger(__name__)


class BrokerLink:
    def __init__(
        self,
        context: zmq.Context,
        endpoint: str,
        hello: Callable[[], proto.Hello],
        *,
        heartbeat_interval: float,
        liveness: float,
        on_reject: Callable[[str], None] = lambda reason: None,
        name: str = "peer",
        stop: threading.Event | None = None,
        curve: ClientKeys | None = None,
    ) -> None:
        self.context, self.endpoint, self.hello = context, endpoint, hello
        self.curve = curve  # None: plaintext (the broker must be on loopback or --insecure)
        self.heartbeat_interval, self.liveness = heartbeat_interval, liveness
        self.on_reject, self.name = on_reject, name
        self.stop = stop or threading.Event()  # set: give up waiting for the broker
        self.socket: zmq.Socket | None = None
        self.last_heard = self.last_sent = time.monotonic()

    # -- connection -------------------------------------------------------------------

    def connect(self, *, timeout: float) -> proto.Welcome | None:
        """(Re)connect and register. Returns the broker's WELCOME, or None if ``stop`` was set
        while waiting; raises ``TraciError`` if the broker refuses (with its reason) or
        ``PeerTimeout`` if it never answers."""
        self.close()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            apply_client(self.socket, self.curve)
        self.socket.connect(self.endpoint)
        self.send(self.hello())  # built now: it carries the peer's current position
        deadline = time.monotonic() + timeout
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                # A broker that refuses our CURVE key sends nothing at all: say so.
                hint = (
                    f" (CURVE on: is {self.name}.key in the broker's authorized/ folder, and "
                    "broker.key the broker's current public key?)"
                    if self.curve is not None
                    else ""
                )
                raise PeerTimeout(
                    f"broker at {self.endpoint} did not answer HELLO in {timeout:.0f}s{hint}",
                    service=self.name,
                )
            if time.monotonic() - self.last_sent >= self.heartbeat_interval:
                self.send(proto.Heartbeat())  # the broker may hold WELCOME for the start gate
            msg = self.recv(min(left, self.heartbeat_interval))
            if isinstance(msg, proto.Welcome):
                if not msg.ok:
                    raise TraciError(
                        f"broker refused registration: {msg.reason}", service=self.name
                    )
                log.info(
                    "%s registered with broker %s, start at seq %d",
                    self.name,
                    self.endpoint,
                    msg.start_seq,
                )
                return msg
            if msg is not None and not isinstance(msg, proto.Heartbeat):
                log.debug("%s ignores %s before WELCOME", self.name, msg.KIND)
        return None

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None

    # -- traffic ----------------------------------------------------------------------

    def send(self, msg: proto.Message) -> None:
        """Queue ``msg`` for the broker without ever blocking. A refused CURVE handshake (or
        a CURVE/plaintext mismatch) ends the connection for good, and a blocking send on a
        DEALER with no connection would hang forever; instead the message is dropped and
        the broker's silence surfaces as ``PeerTimeout`` (connect timeout or liveness)."""
        assert self.socket is not None, "send before connect"  # programming error, not input
        try:
            self.socket.send_multipart(proto.encode(msg), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.debug("%s: no connection to the broker, %s not sent", self.name, msg.KIND)
            return
        self.last_sent = time.monotonic()

    def recv(self, timeout: float) -> proto.Message | None:
        """The next valid message within ``timeout`` seconds, or None."""
        assert self.socket is not None, "recv before connect"
        if not self.socket.poll(max(0, int(timeout * 1000))):
            return None
        frames = self.socket.recv_multipart(copy=False)
        self.last_heard = time.monotonic()
        try:
            return proto.decode(frames)
        except ProtocolError as exc:
            self.on_reject(exc.reason)
            log.warning("%s rejected a message from the broker: %s", self.name, exc)
            return None

    def tick(self) -> None:
        """Send a heartbeat when due; raise ``PeerTimeout`` if the broker went silent."""
        now = time.monotonic()
        if now - self.last_sent >= self.heartbeat_interval:
            self.send(proto.Heartbeat())
        if now - self.last_heard > self.liveness:
            raise PeerTimeout(f"broker silent for {now - self.last_heard:.1f}s", service=self.name)
