"""The broker loop: two ROUTER sockets around a ``JoinBook``.

One loop in the Majordomo shape::

    poll (heartbeat-length timeout) -> recv -> strip routing id -> decode -> its kind's
        handler -> send what the book decided -> tick (expiries, heartbeats, gauges)

All decisions live in ``join.JoinBook`` (and its ``peers.PeerRegistry``) and, for served
queries, ``serve.ServeDesk``; this module only moves frames. Every decoded message, of every
kind, enters through one table, socket -> kind -> handler (``_handlers``): an EMB -- the bulk of
the traffic, decoded by ``proto.fast`` -- is one dict lookup away from ``JoinBook.emb``. Tensor
frames are forwarded as the very ``zmq.Frame`` objects that arrived (received with
``copy=False``; a Frame is always sent by reference). A bad message -- undecodable, the wrong
kind for its socket, or one that trips a bug -- is counted, logged and dropped; the loop keeps
running.
"""

from __future__ import annotations

import ctypes
import logging
import secrets
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from traci_ml.core.config import Config
from traci_ml.core.data import expert_count
from traci_ml.core.errors import ConfigError, ProtocolError
from traci_ml.core.security import (
    apply_domain,
    apply_server,
    broker_keys,
    check_bind,
    is_ipv6,
    start_authenticator,
    tcp_endpoint,
)
from traci_ml.proto import (
    MAX_TENSOR_BYTES,
    Ack,
    Align,
    Drop,
    Emb,
    Goodbye,
    Grad,
    Heartbeat,
    Hello,
    Message,
    QEmb,
    QOut,
    Query,
    tensors_of,
    value_problem,
)
from traci_ml.proto.fast import decode, encode, register_frame_type
from traci_ml.services.broker.join import JoinBook
from traci_ml.services.broker.metrics import BrokerMetrics
from traci_ml.services.broker.outcomes import EXPERT, REDUCER, Outcome
from traci_ml.services.broker.serve import CLIENT, ServeDesk

log = logging.getLogger(__name__)

LOG_EVERY = 1.0  # seconds between warnings of one rejection reason (the rest are counted)
DRAIN = 64  # messages handled per socket per poll: fewer polls under load, still fair
_SNDMORE = int(zmq.SNDMORE)  # plain ints: pyzmq's enum arithmetic shows in the profile
_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_zmq_poll = zmq.zmq_poll  # the poll itself, without zmq.Poller's bookkeeping
# The Cython send, without the sugar layer's Python wrapper (routing_id/group handling we
# never use). Positional copy=True: small header frames are copied (cheaper than wrapping
# them in a Frame); a received zmq.Frame is always forwarded by reference, whatever copy says.
_socket_send = zmq.backend.Socket.send
register_frame_type(zmq.Frame)  # proto may take len(frame) as its byte count
# handler(routing_id, message, now): every kind a socket takes, by its class. Each handler
# checks the values it uses (EMB, GRAD, QUERY, QEMB, QOUT, with the step, query or bound in
# hand) or gets none (ALIGN's tensors are opaque ids and hashes; the rest carry no tensor).
Handler = Callable[[bytes, Any, float], Outcome]


def seed_auto_ids() -> None:
    """Seed libc ``random()`` from the OS, before the ROUTERs exist.

    A ROUTER names a peer that sets no routing id ``00`` + a counter that starts at libc
    ``random()``, which nobody seeds: the same ids in every run. Without handover a newcomer
    cannot take a live id, but libzmq 4.3 never checks its *automatic* id against the
    explicit ones: a stranger that first claims the next automatic id makes the next
    id-less connection abort the whole process (``Assertion failed: ok
    (src/socket_base.cpp:2113)``). Seeded, the next automatic id is a 32-bit secret."""
    try:
        ctypes.CDLL(None).srandom(ctypes.c_uint(secrets.randbits(32)))
    except (OSError, AttributeError):  # no libc random() here: libzmq seeds nothing either
        log.warning("broker: could not seed libc random(); automatic routing ids predictable")


class BrokerService:
    """Joins expert embeddings into ordered batches for the reducer and routes replies.

    ``expert_endpoint``/``reducer_endpoint`` override the bind addresses from
    ``config.network`` (tests pass ``tcp://127.0.0.1:*``); the bound ones are exposed as
    ``expert_endpoint``/``reducer_endpoint`` after construction.

    With ``security.curve_dir`` set, both sockets are CURVE servers and a ZAP authenticator on
    the broker's context admits only the peer keys in ``authorized/``. Without it, binding a
    non-loopback address is a ``ConfigError`` unless ``security.insecure``.
    """

    def __init__(
        self,
        config: Config,
        *,
        metrics: BrokerMetrics | None = None,
        n_experts: int | None = None,
        expert_endpoint: str | None = None,
        reducer_endpoint: str | None = None,
        context: zmq.Context | None = None,
        stop: threading.Event | None = None,
        client_endpoint: str | None = None,
        serve: bool = False,
    ) -> None:
        net = config.network
        self.n_experts = n_experts if n_experts is not None else expert_count(config)
        self.metrics = metrics if metrics is not None else BrokerMetrics(self.n_experts)
        self.metrics.serving.set(1 if serve else 0)
        self._curve = broker_keys(config)  # None: plaintext
        self.book = JoinBook.from_config(
            config, n_experts=self.n_experts, keys_bound=self._curve is not None
        )
        self.heartbeat_interval = net.heartbeat_interval
        self._key: str | None = None  # CURVE: the role of the key of the message in hand
        self._insecure = config.security.insecure
        self._stop = stop if stop is not None else threading.Event()
        self._own_context = context is None
        self._context = context if context is not None else zmq.Context()
        self._sockets: dict[str, zmq.Socket] = {}
        self._auth: ThreadAuthenticator | None = None
        seed_auto_ids()  # before any ROUTER is made: each takes its first id from random()
        try:
            if self._curve is not None:  # before any bind: with no ZAP handler, any key passes
                self._auth = start_authenticator(self._context, self._curve.authorized)
            self.expert_endpoint = self._bind(
                EXPERT, expert_endpoint or tcp_endpoint(net.bind_host, net.expert_port)
            )
            self.reducer_endpoint = self._bind(
                REDUCER, reducer_endpoint or tcp_endpoint(net.bind_host, net.reducer_port)
            )
            self.serve = ServeDesk.from_config(config, metrics=self.metrics.serve)
            self.client_endpoint = self._bind_front_door(config, client_endpoint, strict=serve)
        except Exception:  # e.g. a ConfigError from check_bind: release what was opened
            self.close()
            raise
        book, peers = self.book, self.book.peers
        self._touch = peers.touch
        self._handlers: dict[str, dict[type, Handler]] = {
            EXPERT: {
                Emb: book.emb,
                Hello: partial(self._hello, EXPERT),
                Heartbeat: partial(peers.heartbeat, EXPERT),
                Goodbye: partial(self._goodbye, EXPERT),
                Align: partial(self._align, EXPERT),
                QEmb: self._qemb,  # served queries (serve.py)
            },
            REDUCER: {
                Grad: book.grad,
                Ack: book.ack,
                Drop: book.reducer_drop,
                Hello: partial(self._hello, REDUCER),
                Heartbeat: partial(peers.heartbeat, REDUCER),
                Goodbye: partial(self._goodbye, REDUCER),
                Align: partial(self._align, REDUCER),
                QOut: self._qout,
            },
            CLIENT: {Query: self._query},
        }
        self._encoded: tuple[Message | None, list] = (None, [])  # one ACK to N experts
        self._last_warned: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._done = False

    def _bind(self, name: str, endpoint: str) -> str:
        check_bind(endpoint, curve=self._curve is not None, insecure=self._insecure)
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # No ROUTER_HANDOVER: a new connection never inherits a routing id that a live
        # connection holds (libzmq ignores the newcomer), so nobody takes a route over by
        # naming its id; peers pick random ids anyway (link.new_routing_id).
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_TENSOR_BYTES)  # per frame; larger: peer cut off
        sock.setsockopt(zmq.IPV6, int(is_ipv6(endpoint)))  # e.g. ::1
        if self._curve is not None:
            apply_server(sock, self._curve)
            apply_domain(sock, name)  # only keys of this socket's role are admitted
        self._sockets[name] = sock
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(
                f"broker cannot bind the {name} socket to {endpoint}: {exc}"
            ) from None
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until the reducer says GOODBYE("done") or ``stop()``; returns 0 either way."""
        polled = [(sock, _POLLIN) for sock in self._sockets.values()]
        names = {sock: name for name, sock in self._sockets.items()}
        clients = f", clients on {self.client_endpoint}" if self.client_endpoint else ""
        log.info("broker ready: experts on %s, reducer on %s%s; start gate closed until all "
                 "%d experts have registered", self.expert_endpoint, self.reducer_endpoint,
                 clients, self.n_experts)  # fmt: skip
        next_tick = time.monotonic()
        try:
            while not self._stop.is_set() and not self._done:
                wake = min(next_tick, self.serve.next_deadline(), self.book.next_deadline())
                timeout_ms = max(0.0, wake - time.monotonic()) * 1000
                for sock, _ in _zmq_poll(polled, int(timeout_ms + 0.999)):  # ready ones
                    self._drain(names[sock], sock)
                now = time.monotonic()
                if now >= self.book.next_deadline():  # a straggler's step goes without it
                    self._release_due(now)
                if now >= self.serve.next_deadline():
                    self._serve_tick(now)
                if now >= next_tick:
                    self._tick(now)
                    next_tick = now + self.heartbeat_interval
            self._apply(self.serve.close(time.monotonic()))  # waiting clients: "shutdown"
            if not self._done:
                log.info("broker: stopping; telling peers")
                self._say_goodbye("shutdown")
        finally:
            self.close(linger_ms=int(self.heartbeat_interval * 1000))
        log.info("broker: exit (%s)", "run done" if self._done else "stopped")
        return 0

    def stop(self) -> None:
        """Ask the loop to end (thread-safe; the loop notices within one heartbeat)."""
        self._stop.set()

    def close(self, *, linger_ms: int = 0) -> None:
        """Close the sockets, then the authenticator. A short linger lets the final GOODBYEs
        leave."""
        for sock in self._sockets.values():
            if not sock.closed:
                sock.close(linger=linger_ms)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_context and not self._context.closed:
            self._context.term()

    def _drain(self, name: str, sock: zmq.Socket) -> None:
        """Handle up to DRAIN messages waiting on ``sock`` (the poll said one is there).

        Whether another one waits is asked with a zero-timeout zmq_poll: far cheaper than
        the ``zmq.Again`` a non-blocking recv on an empty socket raises."""
        recv, receive, check = sock.recv, self._receive, [(sock, _POLLIN)]
        for n in range(DRAIN):
            if n and not _zmq_poll(check, 0):
                return
            try:
                frames = [recv(_NOBLOCK, False)]  # copy=False: zmq.Frame, forwarded as is
            except zmq.Again:
                return
            while frames[-1].more:  # the rest of a multipart message is already here
                frames.append(recv(0, False))
            receive(name, frames)

    def _receive(self, socket: str, frames: list[zmq.Frame]) -> None:
        routing_id = frames[0].bytes
        try:
            self._handle(socket, routing_id, frames[1:], time.monotonic())
        except Exception:  # one bad message must never end the loop
            self.metrics.reject("internal")
            log.exception("broker: internal error handling a message from %s peer %s",
                          socket, routing_id.hex())  # fmt: skip

    def _handle(self, socket: str, routing_id: bytes, frames: list[zmq.Frame], now: float) -> None:
        """Decode one message (routing id stripped) and hand it to its kind's handler."""
        if (
            self._curve is not None
            and socket != CLIENT
            and not self._same_key(socket, routing_id, frames[0])
        ):
            return
        self._touch(socket, routing_id, now)
        try:
            msg = decode(frames, check_finite=False)  # values: checked where they are used
        except ProtocolError as exc:
            return self._malformed(socket, routing_id, exc, now)
        self.metrics.message(msg.KIND, "in")
        handler = self._handlers[socket].get(type(msg))
        if handler is None:
            return self._unexpected(socket, routing_id, msg, now)
        self._apply(handler(routing_id, msg, now), socket, routing_id, msg)
        return None

    def _malformed(self, socket: str, routing_id: bytes, exc: ProtocolError, now: float) -> None:
        """A message that failed decoding: counted, and answered where its sender can use an
        answer."""
        self.metrics.message("invalid", "in")
        detail = exc.message.removeprefix(f"{exc.reason}: ")
        if socket == CLIENT:  # a client gets an answer naming the cause
            self._rejected(exc.reason, socket, routing_id, None, detail)
            self._apply(self.serve.malformed(routing_id, exc.reason, detail, now))
        elif exc.kind == "HELLO":  # a refusal naming the problem, not silence
            self._apply(self.book.peers.refuse_hello(socket, routing_id, exc.message), socket,
                        routing_id)  # fmt: skip
        elif exc.kind == "EMB" and exc.seq is not None and socket == EXPERT:
            outcome = self.book.refuse_emb(routing_id, exc.seq, exc.reason, detail, now,
                                           expert_id=exc.expert_id)  # fmt: skip
            self._apply(outcome, socket, routing_id, exc)  # DROP: the step goes on
        else:
            self._rejected(exc.reason, socket, routing_id, None, detail)

    def _unexpected(self, socket: str, routing_id: bytes, msg: Message, now: float) -> None:
        """A kind this socket does not take: ``unexpected_kind``, unless its values are bad
        (NaN/Inf first, whatever the kind; ALIGN's blobs hold none)."""
        problem = value_problem(tensors_of(msg), float("inf"))
        if problem is None:
            problem = ("unexpected_kind", f"{msg.KIND} is not expected on the {socket} socket")
        reason, detail = problem
        self._rejected(reason, socket, routing_id, getattr(msg, "seq", None), detail)
        if socket == CLIENT:
            self._apply(self.serve.malformed(routing_id, reason, detail, now))

    def _same_key(self, socket: str, routing_id: bytes, first: zmq.Frame) -> bool:
        """CURVE: the key of this message's connection (its role, the ZAP User-Id) must be
        the one its route registered with; a HELLO's key is checked by the book."""
        try:
            key = first.get("User-Id") or None
        except zmq.ZMQError:  # no ZAP metadata: never admitted under CURVE
            key = None
        self._key = key
        held = self.book.peers.key_of(socket, routing_id)
        if held is None or held == key:
            return True
        detail = f"key of {key!r} on the route of {held!r}"
        self._rejected("wrong_route", socket, routing_id, None, detail)
        return False

    def _release_due(self, now: float) -> None:
        try:
            self._apply(self.book.release_due(now))
        except Exception:
            self.metrics.reject("internal")
            log.exception("broker: internal error releasing a step past its deadline")

    def _tick(self, now: float) -> None:
        try:
            self._apply(self.book.tick(now))
            beat = self.book.expert_heartbeat  # with the reducer's model selection decision
            for socket, routing_id in self.book.peers.live_peers():
                self._send(socket, routing_id, beat if socket == EXPERT else Heartbeat())
        except Exception:
            self.metrics.reject("internal")
            log.exception("broker: internal error in tick")
        self._serve_tick(now)
        book, peers = self.book, self.book.peers
        experts, reducer = peers.serve_targets()  # whom a request would go to now
        self.metrics.set_state(
            pending=book.pending_steps, dispatched=book.dispatched_steps,
            registered=peers.registered_experts, live=peers.live_experts,
            expert_up=peers.expert_up(), reducer_up=peers.reducer_up,
            serve_ready=bool(experts) and reducer is not None,
        )  # fmt: skip

    # ---- handlers that add what only the service knows -----------------------------------

    def _hello(self, socket: str, routing_id: bytes, msg: Hello, now: float) -> Outcome:
        """HELLO, with the role of the key its connection came with (CURVE; None without)."""
        return self.book.hello(socket, routing_id, msg, now, key=self._key)

    def _goodbye(self, socket: str, routing_id: bytes, msg: Goodbye, now: float) -> Outcome:
        outcome = self.book.goodbye(socket, routing_id, msg, now)
        self._done = self._done or outcome.done  # the reducer said GOODBYE("done")
        return outcome

    def _align(self, socket: str, routing_id: bytes, msg: Align, now: float) -> Outcome:
        outcome = self.book.peers.align(socket, routing_id, msg, now)
        for send in outcome.sends:  # counted by stage: relayed, or "wait" answered
            if type(send.message) is Align:
                self.metrics.align(send.message.stage)
        return outcome

    # ---- served prediction: the front door (serve.py decides, this only moves frames) ----

    def _bind_front_door(self, config: Config, endpoint: str | None, *, strict: bool) -> str | None:
        """Bind the client socket. Training (not ``strict``) goes on without it when the
        port is taken; ``traci serve`` (``strict``) fails instead."""
        net = config.network
        if endpoint is None and not net.serve_port:
            if strict:
                raise ConfigError("traci serve needs network.serve_port (it is 0)")
            return None
        try:
            bound = self._bind(CLIENT, endpoint or tcp_endpoint(net.bind_host, net.serve_port))
        except ConfigError as exc:
            if strict:
                raise
            sock = self._sockets.pop(CLIENT, None)
            if sock is not None:
                sock.close(linger=0)
            log.error("broker: %s; serving is off, training goes on", exc)
            return None
        log.info("broker: front door for served prediction on %s", bound)
        return bound

    def _query(self, routing_id: bytes, msg: Query, now: float) -> Outcome:
        # Raw feature values: only NaN/Inf is refused here (a raw column may be large);
        # what the experts make of them is bounded below, on QEMB.
        problem = value_problem(msg.tensors, float("inf"))
        if problem is not None:
            out = self.serve.malformed(routing_id, problem[0], f"request rows: {problem[1]}", now)
            return out.reject(problem[0], problem[1])
        return self.serve.request(routing_id, msg, now, self.book.peers.serve_targets())

    def _qemb(self, routing_id: bytes, msg: QEmb, now: float) -> Outcome:
        problem = value_problem(msg.tensors, self.book.max_abs)
        if problem is not None:  # that expert fails this query, naming why
            detail = f"its embedding of the rows: {problem[1]} (rows out of the trained range?)"
            msg = QEmb(msg.qid, msg.expert_id, problem[0], detail, ())
        outcome = self.serve.qemb(routing_id, msg, now, self.book.peers.serve_targets())
        return outcome if problem is None else outcome.reject(problem[0], problem[1])

    def _qout(self, routing_id: bytes, msg: QOut, now: float) -> Outcome:
        problem = value_problem(msg.tensors, float("inf"))  # outputs: finite is the bound
        if problem is not None:
            msg = QOut(msg.qid, problem[0], f"outputs: {problem[1]}", msg.task, (), ())
        outcome = self.serve.qout(routing_id, msg, now, self.book.peers.serve_targets())
        return outcome if problem is None else outcome.reject(problem[0], problem[1])

    def _serve_tick(self, now: float) -> None:
        try:
            self._apply(self.serve.tick(now, self.book.peers.serve_targets()))
        except Exception:
            self.metrics.reject("internal")
            log.exception("broker: internal error in the serve tick")

    # ---- output --------------------------------------------------------------------------

    def _apply(
        self, outcome: Outcome, socket: str = "", routing_id: bytes = b"", about: object = None
    ) -> None:
        """Send what the book decided and count it. ``about``: the message (or decode error)
        it answers, whose ``seq``, if any, a rejection's log line names. A rejection is
        counted before its answer goes out: a peer that reads the answer sees the count."""
        if outcome.rejected is not None:
            seq = getattr(about, "seq", None)
            self._rejected(outcome.rejected, socket, routing_id, seq, outcome.detail)
        for send in outcome.sends:
            self._send(send.socket, send.routing_id, send.message)
        for note in outcome.notes:
            log.info("broker: %s", note)
        for wait in outcome.join_waits:
            self.metrics.released(wait)
        for latency in outcome.queue_latencies:
            self.metrics.dispatched(latency)
        if outcome.skipped:
            self.metrics.steps_skipped.inc(outcome.skipped)
        for reason in outcome.dropped:
            self.metrics.steps_dropped.labels(reason=reason).inc()

    def _send(self, socket: str, routing_id: bytes, msg: Message) -> None:
        # Tensor frames are the received zmq.Frame objects: zero-copy forwarding.
        sock = self._sockets[socket]
        last, frames = self._encoded
        if msg is not last:  # the book sends one reply object to every expert of a step
            frames = encode(msg)
            self._encoded = (msg, frames)
        _socket_send(sock, routing_id, _SNDMORE)
        for frame in frames[:-1]:
            _socket_send(sock, frame, _SNDMORE)
        _socket_send(sock, frames[-1], 0)
        self.metrics.message(msg.KIND, "out")

    def _say_goodbye(self, reason: str) -> None:
        for socket, routing_id in self.book.peers.live_peers():
            self._send(socket, routing_id, Goodbye(reason))

    def _rejected(
        self, reason: str, socket: str, routing_id: bytes, seq: int | None, detail: str
    ) -> None:
        """Count a rejection; warn at most once per LOG_EVERY seconds per reason."""
        self.metrics.reject(reason)
        now = time.monotonic()
        if now - self._last_warned.get(reason, -LOG_EVERY) < LOG_EVERY:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last_warned[reason] = now
        more = self._suppressed.pop(reason, 0)
        log.warning("broker: rejected message from %s peer %s (step %s): %s: %s%s",
                    socket, routing_id.hex(), seq, reason, detail,
                    f" ({more} more since last warning)" if more else "")  # fmt: skip
