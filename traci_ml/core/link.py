"""A peer's connection to the broker (used by experts and the reducer; not by the broker).

One DEALER socket, the HELLO/WELCOME handshake, heartbeats and broker liveness on
``time.monotonic()``. Every received message is decoded here; a message that fails
validation is counted through ``on_reject`` and logged, never raised to the caller.

Heartbeats go out from a small thread, so a long step (a big evaluation, a slow device) does
not make the broker think the peer is gone; a stopped or dead process still falls silent. The
socket is shared with that thread under a lock, held only for single socket calls.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

import zmq

from traci_ml import proto
from traci_ml.core.errors import PeerTimeout, ProtocolError, TraciError
from traci_ml.core.security import ClientKeys, apply_client, is_ipv6

log = logging.getLogger(__name__)


def new_routing_id() -> bytes:
    """16 random bytes for a DEALER's ROUTING_ID. libzmq's automatic ids are predictable
    (the same sequence in every run), and a stranger who sends with a registered peer's id
    must find nothing to take over; the first byte is never 0 (libzmq reserves those)."""
    raw = secrets.token_bytes(16)
    return bytes([raw[0] % 255 + 1]) + raw[1:]


def dealer(context: zmq.Context, endpoint: str, curve: ClientKeys | None) -> zmq.Socket:
    """A DEALER connected to a broker socket as every TRACI peer and client connects: a
    random routing id, IPv6 when the host is an IPv6 literal, CURVE when keys are given."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, new_routing_id())  # a new route per connection
    sock.setsockopt(zmq.IPV6, int(is_ipv6(endpoint)))  # e.g. tcp://[::1]:5555
    if curve is not None:
        apply_client(sock, curve)
    sock.connect(endpoint)
    return sock


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
        checks_values: tuple[type, ...] = (),
    ) -> None:
        self.context, self.endpoint, self.hello = context, endpoint, hello
        self.curve = curve  # None: plaintext (the broker must be on loopback or --insecure)
        # Kinds whose values the service checks itself, with the step in hand (it can free
        # the step); any other kind holding NaN/Inf is rejected non_finite here.
        self.checks_values = checks_values
        self.heartbeat_interval, self.liveness = heartbeat_interval, liveness
        self.on_reject, self.name = on_reject, name
        self.stop = stop or threading.Event()  # set: give up waiting for the broker
        self.socket: zmq.Socket | None = None
        self.last_heard = self.last_sent = time.monotonic()
        self._lock = threading.Lock()  # guards self.socket between the loop and the beater
        self._beat_stop = threading.Event()
        self._beater: threading.Thread | None = None
        self._token = ""  # the last WELCOME's secret: proves a rejoin is this same peer
        # post(): messages from another thread (an expert's compute stream), sent by the
        # thread that polls (recv), which an inproc PAIR wakes; made on the first post
        self._outbox: deque[list] = deque()
        self._out_lock = threading.Lock()
        self._wake: tuple[zmq.Socket, zmq.Socket] | None = None  # (poller's end, posters')

    # -- connection -------------------------------------------------------------------

    def connect(self, *, timeout: float) -> proto.Welcome | None:
        """(Re)connect and register. Returns the broker's WELCOME, or None if ``stop`` was set
        while waiting; raises ``TraciError`` if the broker refuses (with its reason) or
        ``PeerTimeout`` if it never answers."""
        self.close()
        sock = dealer(self.context, self.endpoint, self.curve)  # a new route per registration
        with self._lock:
            self.socket = sock
        self.send(self._hello())  # built now: it carries the peer's current position
        self.last_heard = time.monotonic()
        self._beat_stop = threading.Event()
        self._beater = threading.Thread(
            target=self._beat, args=(self._beat_stop,), name=f"{self.name}-heartbeat", daemon=True
        )
        self._beater.start()
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
            msg = self.recv(min(left, self.heartbeat_interval))
            if isinstance(msg, proto.Welcome):
                if not msg.ok and msg.reason.startswith(proto.HELD):
                    # our id is still held by a registration the broker has not yet timed
                    # out (our own, before a restart): ask again until it expires
                    log.warning("%s: %s; saying HELLO again", self.name, msg.reason)
                    self.stop.wait(self.heartbeat_interval)
                    self.send(self._hello())
                    continue
                if not msg.ok:
                    raise TraciError(
                        f"broker refused registration: {msg.reason}", service=self.name
                    )
                log.info(  # the service's "ready" line: it can do its job from here on
                    "%s ready: registered with broker %s, start at seq %d",
                    self.name,
                    self.endpoint,
                    msg.start_seq,
                )
                self._token = msg.token
                return msg
            if msg is not None and not isinstance(msg, proto.Heartbeat):
                log.debug("%s ignores %s before WELCOME", self.name, msg.KIND)
        return None

    def _hello(self) -> proto.Hello:
        return dataclasses.replace(self.hello(), token=self._token)

    def close(self) -> None:
        self._beat_stop.set()
        if self._beater is not None:
            self._beater.join()
            self._beater = None
        with self._lock:
            if self.socket is not None:
                self.socket.close(linger=0)
                self.socket = None
        with self._out_lock:  # a new registration: what was posted for the old one is void
            self._outbox.clear()
            if self._wake is not None:
                for sock in self._wake:
                    sock.close(linger=0)
                self._wake = None

    def _beat(self, stop: threading.Event) -> None:
        """Heartbeat whenever nothing else went out for a heartbeat interval (while waiting
        for WELCOME too: the broker holds it until every expert has registered)."""
        while not stop.wait(self.heartbeat_interval / 4):
            if time.monotonic() - self.last_sent >= self.heartbeat_interval:
                self.send(proto.Heartbeat())

    # -- traffic ----------------------------------------------------------------------

    def send(self, msg: proto.Message) -> None:
        """Queue ``msg`` for the broker without ever blocking. A refused CURVE handshake (or
        a CURVE/plaintext mismatch) ends the connection for good, and a blocking send on a
        DEALER with no connection would hang forever; instead the message is dropped and
        the broker's silence surfaces as ``PeerTimeout`` (connect timeout or liveness)."""
        frames = proto.encode(msg)
        with self._lock:
            if self.socket is None:
                raise zmq.ZMQError(zmq.ENOTSOCK, "send before connect or after close")
            try:
                self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                log.debug("%s: no connection to the broker, %s not sent", self.name, msg.KIND)
                return
            self.last_sent = time.monotonic()

    def post(self, msg: proto.Message) -> None:
        """``send`` from another thread without waiting for the one in ``recv``: the message
        is encoded here and sent now when no thread holds the socket, else handed to the
        polling thread, which an inproc PAIR wakes to send it at once (the socket is not
        thread-safe; ``recv`` holds it while it polls). Posts go out in the order posted."""
        frames = proto.encode(msg)
        if self._lock.acquire(blocking=False):  # nobody in recv: send it now, in order
            try:
                if self.socket is not None:
                    with self._out_lock:
                        self._outbox.append(frames)
                    self._flush()
                    return
            finally:
                self._lock.release()
        with self._out_lock:
            if self._wake is None:
                pull, push = self.context.socket(zmq.PAIR), self.context.socket(zmq.PAIR)
                address = f"inproc://traci-link-{id(self)}-{secrets.token_hex(4)}"
                pull.bind(address)
                push.connect(address)
                self._wake = (pull, push)
            self._outbox.append(frames)
            self._wake[1].send(b"", zmq.NOBLOCK)

    def _flush(self) -> None:
        """Send what ``post`` handed over (the caller holds ``_lock``)."""
        while self._outbox:
            frames = self._outbox.popleft()
            try:
                self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)  # type: ignore[union-attr]
                self.last_sent = time.monotonic()
            except zmq.Again:
                log.debug("%s: no connection to the broker, a posted message not sent", self.name)

    def recv(self, timeout: float) -> proto.Message | None:
        """The next valid message within ``timeout`` seconds, or None. Messages ``post``ed
        meanwhile are sent as they come."""
        deadline = time.monotonic() + timeout
        while True:  # poll in short slices: the heartbeat thread needs the lock too
            with self._lock:
                if self.socket is None:
                    raise zmq.ZMQError(zmq.ENOTSOCK, "recv before connect or after close")
                self._flush()
                left = min(deadline - time.monotonic(), self.heartbeat_interval / 4)
                wake = self._wake
                if wake is None:
                    ready = self.socket.poll(max(0, int(left * 1000)))
                else:
                    polled = [(self.socket, zmq.POLLIN), (wake[0], zmq.POLLIN)]
                    events = zmq.zmq_poll(polled, max(0, int(left * 1000)))
                    ready = any(sock is self.socket for sock, _ in events)
                    if len(events) > ready:  # woken by post: drain the wake-ups, send
                        while wake[0].poll(0):
                            wake[0].recv(zmq.NOBLOCK)
                        self._flush()
                if ready:
                    frames = self.socket.recv_multipart(copy=False)
                    break
            if time.monotonic() >= deadline:
                return None
        self.last_heard = time.monotonic()
        try:
            msg = proto.decode(frames, check_finite=False)  # values: see checks_values
            if not isinstance(msg, self.checks_values):
                if not all(proto.is_finite(t) for t in proto.tensors_of(msg)):
                    raise ProtocolError("non_finite", f"{msg.KIND} holds NaN or Inf")
            return msg
        except ProtocolError as exc:
            self.on_reject(exc.reason)
            log.warning("%s rejected a message from the broker: %s", self.name, exc)
            return None

    def tick(self) -> None:
        """Raise ``PeerTimeout`` if the broker went silent. Messages still waiting in the
        socket (we were busy computing, not the broker silent) do not count as silence."""
        now = time.monotonic()
        if now - self.last_heard <= self.liveness:
            return
        with self._lock:
            waiting = self.socket is not None and bool(self.socket.poll(0))
        if not waiting:
            raise PeerTimeout(f"broker silent for {now - self.last_heard:.1f}s", service=self.name)
