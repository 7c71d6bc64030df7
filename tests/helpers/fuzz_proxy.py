"""A fuzzing man-in-the-middle between the peers (experts, reducer) and a live broker.

Experts and the reducer only have DEALER sockets that connect out, so to reach *their*
sockets the fuzzer has to stand where the broker is::

    expert i --DEALER--> [ROUTER  proxy  DEALER per peer connection] --> broker ROUTER
    reducer  --DEALER--> [ROUTER  proxy  DEALER per peer connection] --> broker ROUTER
                          raw DEALERs (never registered) ----------------> broker ROUTERs

Every real message is forwarded unchanged, in order, both ways. On top of that, one thread
injects malformed messages (``fuzzing.py``) on six targets: down into each expert and the
reducer, up into the broker on a registered peer's own connection, and straight at the
broker's two ports from raw DEALERs. All sockets live in that one thread; ``SNDHWM``/``RCVHWM``
are 0 so the proxy itself never drops a message (pacing keeps the queues short).

Pacing: injection starts with the first BATCH (training under way) and follows training
progress, so the message budget is spread over the run. The final BATCH is held back until
the budget is spent and the test has read every service's counters (``fuzz_done`` then
``release``): the services are all still up, and nothing real is lost, only delayed.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from tests.helpers.fuzzing import (
    BROKER_EXPERTS,
    BROKER_REDUCER,
    EXPERT,
    REDUCER,
    VIA_EXPERT,
    VIA_REDUCER,
    Fuzz,
    PeerView,
    RunFacts,
    draw,
)
from tests.helpers.middleman import MiddleMan
from traci_ml import proto

# Share of the malformed messages each target gets.
TARGET_WEIGHTS = {
    BROKER_EXPERTS: 0.28,
    BROKER_REDUCER: 0.12,
    VIA_EXPERT: 0.12,
    VIA_REDUCER: 0.06,
    EXPERT: 0.28,  # split over the experts
    REDUCER: 0.14,
}
RAW_PEERS = {BROKER_EXPERTS: 4, BROKER_REDUCER: 2}  # raw DEALERs per broker port
BURST = 25  # messages per injection burst
LEAD = 0.7  # the budget is due when training is this far through the schedule
HOLD_MAX = 12.0  # seconds the final BATCH may wait for the budget (step_timeout is 30 s)
REACTION_DROPS = ("late", "too_far_ahead")  # broker DROPs that answer an injected EMB


@dataclass(slots=True)
class Link:
    """One peer connection through the proxy: its routing id on our ROUTER, our DEALER to
    the broker on its behalf, and what we have seen of its traffic."""

    side: str  # EXPERT or REDUCER
    peer_id: bytes
    upstream: zmq.Socket
    view: PeerView = field(default_factory=PeerView)
    swallow_welcomes: int = 0  # refusals the broker owes for HELLOs we injected
    swallow_drops: Counter[int] = field(default_factory=Counter)  # reducer: DROP seqs to eat

    @property
    def service(self) -> str:
        return f"expert-{self.view.expert_id}" if self.side == EXPERT else "reducer"


def header_of(frames: list[bytes]) -> dict[str, Any]:
    """The header of a real message (the proxy only reads the few fields it tracks)."""
    try:
        header = msgpack.unpackb(frames[0], raw=False)
    except Exception:
        return {}
    return header if isinstance(header, dict) else {}


class FuzzProxy(MiddleMan):
    def __init__(
        self,
        *,
        broker_experts: str,
        broker_reducer: str,
        run: RunFacts,
        messages: int,
        seed: int = 0,
        skip: dict[str, frozenset[str]] | None = None,
    ) -> None:
        self.run, self.messages, self.skip = run, messages, skip or {}
        self.rng = random.Random(seed)
        super().__init__(
            broker_experts=broker_experts, broker_reducer=broker_reducer, name="fuzz-proxy"
        )
        self.raw = {
            target: [self._dealer(self.endpoints[side]) for _ in range(RAW_PEERS[target])]
            for target, side in ((BROKER_EXPERTS, EXPERT), (BROKER_REDUCER, REDUCER))
        }
        self.raw_view = PeerView()
        self.links: dict[tuple[str, bytes], Link] = {}
        self.by_upstream: dict[zmq.Socket, Link] = {}
        self.experts: dict[int, Link] = {}
        self.reducer: Link | None = None
        self.welcomed: set[int] = set()
        self.rejoins = 0
        self.last_batch_seq = -1
        self.held: list[bytes] | None = None
        self.held_at = 0.0
        # results
        self.sent: Counter[tuple[str, str]] = Counter()  # (target, category)
        self.reasons: dict[tuple[str, str], set[str]] = {}  # (target, category) -> reasons
        self.expected: dict[str, Counter[tuple[str, ...]]] = {}  # service -> expect -> n
        self.reactions: Counter[str] = Counter()  # service -> rejections our fuzz provoked
        self.stolen = 0  # raw HELLOs the broker accepted (an id whose holder was gone)
        self.fuzz_window = (0.0, 0.0)
        # control, set by this thread / by the test
        self.started = threading.Event()  # the first BATCH went by: injection on
        self.fuzz_done = threading.Event()  # budget spent, final BATCH held: read counters
        self.release = threading.Event()  # counters read: let the final BATCH go

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    # ---- sockets -----------------------------------------------------------------------

    def _dealer(self, endpoint: str) -> zmq.Socket:
        sock = self._socket(zmq.DEALER)
        sock.connect(endpoint)
        self.poller.register(sock, zmq.POLLIN)
        return sock

    def _sockets(self) -> list[zmq.Socket]:
        return [*self.front.values(), *self.by_upstream, *sum(self.raw.values(), [])]

    # ---- the loop ----------------------------------------------------------------------

    def _turn(self) -> None:
        due = self._due()
        for sock, _ in self.poller.poll(0 if due else 5):
            self._drain(sock)
        if due:
            self._inject(min(due, BURST))
        self._end_game()

    def _due(self) -> int:
        if not self.started.is_set() or self.fuzz_done.is_set():
            return 0
        progress = (self.last_batch_seq + 1) / self.run.total
        share = 1.0 if self.held is not None else min(1.0, (progress + 0.02) / LEAD)
        return max(0, int(self.messages * share) - self.total_sent)

    def _end_game(self) -> None:
        if self.held is None:
            return
        waited = time.monotonic() - self.held_at
        if not self.fuzz_done.is_set() and (self.total_sent >= self.messages or waited > HOLD_MAX):
            self.fuzz_window = (self.fuzz_window[0], time.monotonic())
            self.fuzz_done.set()
        if self.release.is_set():
            held, self.held = self.held, None
            self._to_reducer_peer(held)

    def _drain(self, sock: zmq.Socket) -> None:
        for frames in self._ready(sock, 200):
            if sock is self.front[EXPERT] or sock is self.front[REDUCER]:
                side = EXPERT if sock is self.front[EXPERT] else REDUCER
                self._upstream(self._link(side, frames[0]), frames[1:])
            elif sock in self.by_upstream:
                self._downstream(self.by_upstream[sock], frames)
            else:
                self._raw_reply(sock, frames)

    def _link(self, side: str, peer_id: bytes) -> Link:
        link = self.links.get((side, peer_id))
        if link is None:
            upstream = self._dealer(self.endpoints[side])
            link = self.links[(side, peer_id)] = Link(side, peer_id, upstream)
            self.by_upstream[upstream] = link
        return link

    # ---- real traffic: forward, and note what the fuzz generators need ------------------

    def _upstream(self, link: Link, frames: list[bytes]) -> None:
        header, view = header_of(frames), link.view
        kind = header.get("k")
        if kind == "HELLO" and link.side == EXPERT:
            eid = view.expert_id = header.get("expert_id", -1)
            if eid in self.experts and self.experts[eid] is not link:
                self.rejoins += 1  # an expert registered again: no more HELLO impersonation
            self.experts[eid] = link
        elif kind == "HELLO":
            self.reducer = link
        elif kind == "EMB":
            view.unanswered[header["seq"]] = header["phase"]
            view.outbound.append(frames)
        elif kind in ("GRAD", "ACK"):
            view.outbound.append(frames)
        elif kind == "DROP" and link.side == REDUCER:
            if link.swallow_drops[header["seq"]] > 0 and header.get("reason") == "conflict":
                link.swallow_drops[header["seq"]] -= 1  # answers a BATCH we injected
                return
            self.reactions["broker"] += 1  # the broker has no such step: unknown_step
        link.upstream.send_multipart(frames)

    def _downstream(self, link: Link, frames: list[bytes]) -> None:
        header, view = header_of(frames), link.view
        kind, seq = header.get("k"), header.get("seq", -1)
        if kind == "WELCOME" and not header.get("ok") and link.swallow_welcomes > 0:
            link.swallow_welcomes -= 1  # refuses a HELLO we injected
            return
        if kind == "WELCOME" and header.get("ok") and link.side == EXPERT:
            self.welcomed.add(view.expert_id)
        if kind in ("GRAD", "ACK", "DROP"):
            view.unanswered.pop(seq, None)
        if kind in ("GRAD", "ACK"):
            view.inbound.append(frames)
        if kind == "DROP" and header.get("reason") in REACTION_DROPS:
            self.reactions[link.service] += 1  # not in flight there: unknown_step
        if kind == "BATCH" and seq == self.run.total - 1 and not self.release.is_set():
            self.held, self.held_at = frames, time.monotonic()
            return
        if link.side == REDUCER:
            self._to_reducer_peer(frames, link)
        else:
            self.front[EXPERT].send_multipart([link.peer_id, *frames])

    def _to_reducer_peer(self, frames: list[bytes], link: Link | None = None) -> None:
        link = link or self.reducer
        assert link is not None, "a BATCH before any reducer"
        self.front[REDUCER].send_multipart([link.peer_id, *frames])
        header = header_of(frames)
        if header.get("k") == "BATCH":
            self.last_batch_seq = max(self.last_batch_seq, header["seq"])
            link.view.last_batch_seq = self.last_batch_seq
            link.view.inbound.append(frames)
            if not self.started.is_set():
                self.fuzz_window = (time.monotonic(), 0.0)
                self.started.set()

    def _raw_reply(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        """Answers to raw DEALERs: ignored, except an accepted HELLO, given straight back."""
        header = header_of(frames)
        if header.get("k") == "WELCOME" and header.get("ok"):
            self.stolen += 1
            sock.send_multipart(proto.encode(proto.Goodbye("fuzz")))

    # ---- injection ---------------------------------------------------------------------

    def _inject(self, n: int) -> None:
        live = len(self.welcomed) == self.run.n_experts and self.rejoins == 0
        self.raw_view.all_live = live and self.reducer is not None
        targets, weights = zip(*TARGET_WEIGHTS.items(), strict=True)
        for target in self.rng.choices(targets, weights, k=n):
            link = self._link_for(target)
            if link is None and target not in self.raw:
                continue  # that peer is not connected (yet); the budget is drawn again
            view = link.view if link is not None else self.raw_view
            fuzz = draw(self.rng, target, self.run, view, skip=self.skip.get(target, frozenset()))
            self._send(target, link, fuzz)

    def _link_for(self, target: str) -> Link | None:
        if target in (EXPERT, VIA_EXPERT):
            links = [self.experts[i] for i in sorted(self.experts)]
            return self.rng.choice(links) if links else None
        if target in (REDUCER, VIA_REDUCER):
            return self.reducer
        return None

    def _send(self, target: str, link: Link | None, fuzz: Fuzz) -> None:
        if link is None:
            sock, service = self.rng.choice(self.raw[target]), "broker"
            sock.send_multipart(fuzz.frames)
        elif target in (VIA_EXPERT, VIA_REDUCER):
            service = "broker"
            link.swallow_welcomes += fuzz.swallow
            link.upstream.send_multipart(fuzz.frames)
        else:
            service = link.service
            if fuzz.swallow:
                link.swallow_drops[fuzz.seq] += 1
            self.front[link.side].send_multipart([link.peer_id, *fuzz.frames])
        self.sent[(target, fuzz.category)] += 1
        self.reasons.setdefault((target, fuzz.category), set()).update(fuzz.expect)
        self.expected.setdefault(service, Counter())[fuzz.expect] += 1
