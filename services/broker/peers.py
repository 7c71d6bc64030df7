"""The broker's peer registry: registration, the start gate, liveness and departures.

``PeerRegistry`` keeps who is registered -- experts by id and routing id, with a generation
per registration, and the reducer -- and answers HELLO, GOODBYE, HEARTBEAT and ALIGN. It knows
nothing of steps: ``join.JoinBook`` owns one and reacts to what changed. A call that changes
who is there returns, with its ``Outcome``, the ``PeerEvent``s it caused, in order (an expert
registered or gone, the reducer registered or gone, the start gate opened); the join book
masks, drops, releases and dispatches accordingly. Like join.py, no sockets: every call
returns an ``Outcome``. The rules are docs/protocol.md's "Broker semantics".
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from traci_ml.proto import (
    ALIGN_EXPERT_STAGES,
    ALIGN_REDUCER_STAGES,
    ALIGN_WAIT,
    HELD,
    Align,
    Goodbye,
    Heartbeat,
    Hello,
    Welcome,
)
from traci_ml.services.broker.outcomes import (
    EXPERT,
    REDUCER,
    ExpertPeer,
    Outcome,
    ReducerPeer,
    Send,
)

# ---- what changed: the events a call returns, for the join book -------------------------


@dataclass(frozen=True, slots=True)
class ExpertJoined:
    """Expert ``expert_id`` registered (the start gate was already open): it is expected from
    its ``join_seq`` on."""

    expert_id: int


@dataclass(frozen=True, slots=True)
class ExpertGone:
    """A registration of ``expert_id`` ended (timed out, GOODBYE, replaced): its tokens in
    unreleased steps are void."""

    expert_id: int


@dataclass(frozen=True, slots=True)
class GateOpened:
    """Every expert has registered once: the run starts at ``start_seq``."""

    start_seq: int


@dataclass(frozen=True, slots=True)
class ReducerJoined:
    """A reducer registered on ``routing_id``; its WELCOME is the join book's to send, with
    the first step it will get, and ``token``, its registration's secret."""

    routing_id: bytes
    token: str


@dataclass(frozen=True, slots=True)
class ReducerGone:
    """The reducer's registration ended (``why``): steps it holds will never be answered."""

    why: str


PeerEvent = ExpertJoined | ExpertGone | GateOpened | ReducerJoined | ReducerGone


class PeerRegistry:
    """Registered experts and reducer, the start gate and liveness.

    The join book reads ``experts``, ``by_routing`` and ``reducer`` (on its hot path, without a
    call); only this class changes them."""

    def __init__(
        self,
        *,
        n_experts: int,
        run_id: str,
        embed_dim: int,
        dtype: str,
        liveness: float,
        keys_bound: bool = False,
    ) -> None:
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        self.n_experts, self.run_id = n_experts, run_id
        self.embed_dim, self.dtype = embed_dim, dtype
        self.liveness = liveness
        # CURVE on: every HELLO comes with its key's role (the ZAP User-Id), which must be the
        # role and id it claims; the key then also proves a rejoin is the same party.
        self.keys_bound = keys_bound
        self.experts: dict[int, ExpertPeer] = {}  # by expert id, gone holders included
        self.by_routing: dict[bytes, int] = {}  # live expert routing id -> expert id
        self.reducer: ReducerPeer | None = None
        self._generation = 0
        self._registered_once: set[int] = set()
        self.started = False  # start gate: every expert registered once
        self._resume_seq = 0  # before the gate: the highest position a HELLO reported
        # (first seq every live expert is expected in, their ids); None: recompute
        self._roster: tuple[int, frozenset[int]] | None = None

    # ---- views for the join book, the service and metrics ---------------------------------

    @property
    def registered_experts(self) -> int:
        return len(self.experts)

    @property
    def live_experts(self) -> int:
        return len(self.by_routing)

    @property
    def reducer_up(self) -> bool:
        return self.reducer is not None

    def expert_up(self) -> dict[int, bool]:
        return {i: i in self.experts and self.experts[i].live for i in range(self.n_experts)}

    def live_peers(self) -> list[tuple[str, bytes]]:
        peers = [(EXPERT, rid) for rid in self.by_routing]
        if self.reducer is not None:
            peers.append((REDUCER, self.reducer.routing_id))
        return peers

    def serve_targets(self) -> tuple[dict[int, bytes], bytes | None]:
        """For served queries (serve.py): the live experts, id -> routing id, once the start
        gate is open (before it they wait for WELCOME), and the reducer's routing id."""
        experts = {eid: rid for rid, eid in self.by_routing.items()} if self.started else {}
        return experts, None if self.reducer is None else self.reducer.routing_id

    def key_of(self, socket: str, routing_id: bytes) -> str | None:
        """The key role a registered route registered with (None: not registered)."""
        if socket == EXPERT:
            eid = self.by_routing.get(routing_id)
            return None if eid is None else self.experts[eid].key
        if self.is_reducer(routing_id):
            return self.reducer.key  # type: ignore[union-attr]
        return None

    def is_reducer(self, routing_id: bytes) -> bool:
        return self.reducer is not None and self.reducer.routing_id == routing_id

    def expected(self, seq: int) -> frozenset[int] | set[int]:
        """The experts step ``seq`` waits for: the live ones whose ``join_seq <= seq``."""
        roster = self._roster
        if roster is None:
            live = [e for e in self.experts.values() if e.live]
            first = max((e.join_seq for e in live), default=0)
            roster = self._roster = (first, frozenset(e.expert_id for e in live))
        if seq >= roster[0]:  # the usual case: every live expert is expected
            return roster[1]
        return {e.expert_id for e in self.experts.values() if e.live and e.join_seq <= seq}

    def touch(self, socket: str, routing_id: bytes, now: float) -> None:
        """Any message from a registered peer proves it alive."""
        if socket == EXPERT:
            eid = self.by_routing.get(routing_id)
            if eid is not None:
                self.experts[eid].last_seen = now
        elif socket == REDUCER and self.reducer is not None:
            if self.reducer.routing_id == routing_id:
                self.reducer.last_seen = now

    # ---- registration --------------------------------------------------------------------

    def hello(
        self,
        socket: str,
        routing_id: bytes,
        msg: Hello,
        now: float,
        key: str | None = None,
        *,
        join_seq: int = 0,
    ) -> tuple[Outcome, list[PeerEvent]]:
        """Register a peer. ``key``: with CURVE, the role of the key the HELLO came with.
        ``join_seq``: where an expert registering after the start gate joins (the join
        book's first step nobody has sent)."""
        out, events = Outcome(), []
        problem = self._mismatch(socket, msg)
        if problem is None and self.keys_bound:
            claimed = f"expert-{msg.expert_id}" if socket == EXPERT else REDUCER
            if key != claimed:
                problem = f"the key of {key or 'no role'!r} may not register as {claimed!r}"
                out.sends.append(Send(socket, routing_id, Welcome(ok=False, reason=problem)))
                return out.reject("wrong_key", problem), events
        if problem is not None:
            return self.refuse_hello(socket, routing_id, problem), events
        if socket == EXPERT:
            self._hello_expert(routing_id, msg, now, key, join_seq, out, events)
        else:
            self._hello_reducer(routing_id, msg, now, key, out, events)
        return out, events

    def refuse_hello(self, socket: str, routing_id: bytes, problem: str) -> Outcome:
        """A HELLO that failed validation still gets its refusal, naming the problem."""
        out = Outcome()
        out.sends.append(Send(socket, routing_id, Welcome(ok=False, reason=problem)))
        return out.reject("refused", problem)

    def _same_party(self, holder: ExpertPeer | ReducerPeer, msg: Hello) -> bool:
        """Is a HELLO from a new route the live holder itself, reconnecting? Only its
        registration's secret (or, with CURVE, its key: the one key for that role) says so."""
        if self.keys_bound:
            return True  # hello() checked the key is the one for this role and id
        return bool(msg.token) and hmac.compare_digest(msg.token, holder.token)

    def _held(self, socket: str, routing_id: bytes, what: str, out: Outcome) -> None:
        """Refuse a HELLO for a role a live registration holds: ``held``, which the peer
        retries (docs/protocol.md, "Registration")."""
        detail = (
            f"{what} is held by another live peer; it is freed {self.liveness:g}s after "
            "that peer's last message"
        )
        out.sends.append(Send(socket, routing_id, Welcome(ok=False, reason=f"{HELD}: {detail}")))
        out.reject(HELD, detail)

    def _mismatch(self, socket: str, msg: Hello) -> str | None:
        if msg.role != socket:
            return f"role {msg.role!r} said HELLO on the {socket} socket"
        for name, mine in (
            ("run_id", self.run_id),
            ("embed_dim", self.embed_dim),
            ("dtype", self.dtype),
        ):
            if getattr(msg, name) != mine:
                return f"{name} mismatch: broker has {mine!r}, peer sent {getattr(msg, name)!r}"
        if socket == EXPERT and not 0 <= msg.expert_id < self.n_experts:
            return f"expert_id {msg.expert_id} outside [0, {self.n_experts})"
        if socket == REDUCER and msg.n_experts != self.n_experts:
            return f"n_experts mismatch: broker has {self.n_experts}, peer sent {msg.n_experts}"
        return None

    def _hello_expert(
        self,
        routing_id: bytes,
        msg: Hello,
        now: float,
        key: str | None,
        join_seq: int,
        out: Outcome,
        events: list[PeerEvent],
    ) -> None:
        eid = msg.expert_id
        holder = self.experts.get(eid)
        if holder is not None and holder.live and holder.routing_id != routing_id:
            if not self._same_party(holder, msg):
                return self._held(EXPERT, routing_id, f"expert_id {eid}", out)
            self._retire(eid, f"expert {eid} reconnected on a new route", out, events)
        previous = self.by_routing.get(routing_id)
        if previous is not None:  # a rejoin from the same peer (or it changed its id)
            self._retire(previous, f"expert {previous} re-registered", out, events)
        if not self.started:  # a fresh broker (or a restarted one) resumes where the peers are
            self._resume_seq = join_seq = max(self._resume_seq, msg.next_seq)
        self._generation += 1
        peer = ExpertPeer(eid, routing_id, self._generation, join_seq, now,
                          token=secrets.token_hex(16), key=key)  # fmt: skip
        self.experts[eid] = peer
        self.by_routing[routing_id] = eid
        self._roster = None
        self._registered_once.add(eid)
        if not self.started:
            # WELCOME waits for the start gate, so nobody sends a step before the run's
            # start is known (the peer keeps heartbeating meanwhile).
            out.notes.append(f"expert {eid} registered, waiting for the start gate")
            if len(self._registered_once) == self.n_experts:
                self._open_gate(out, events)
            return None
        out.notes.append(f"expert {eid} registered, join_seq {join_seq}")
        welcome = Welcome(ok=True, start_seq=join_seq, token=peer.token)
        out.sends.append(Send(EXPERT, routing_id, welcome))
        events.append(ExpertJoined(eid))
        return None

    def _open_gate(self, out: Outcome, events: list[PeerEvent]) -> None:
        """Every expert registered once: start at the highest position any peer reported,
        and welcome every live expert with it."""
        start = self._resume_seq
        self.started = True
        for peer in self.experts.values():
            if peer.live:
                peer.join_seq = start
                self._roster = None
                welcome = Welcome(ok=True, start_seq=start, token=peer.token)
                out.sends.append(Send(EXPERT, peer.routing_id, welcome))
        out.notes.append(f"all {self.n_experts} experts registered: start gate open at {start}")
        events.append(GateOpened(start))

    def _hello_reducer(
        self,
        routing_id: bytes,
        msg: Hello,
        now: float,
        key: str | None,
        out: Outcome,
        events: list[PeerEvent],
    ) -> None:
        holder = self.reducer
        if holder is not None and holder.routing_id != routing_id:
            if not self._same_party(holder, msg):
                return self._held(REDUCER, routing_id, "the reducer", out)
        if holder is not None:
            events.append(ReducerGone("reducer re-registered"))
        self.reducer = ReducerPeer(routing_id, now, token=secrets.token_hex(16), key=key)
        if not self.started:
            self._resume_seq = max(self._resume_seq, msg.next_seq)
        events.append(ReducerJoined(routing_id, self.reducer.token))
        return None

    # ---- departures and liveness ---------------------------------------------------------

    def goodbye(
        self, socket: str, routing_id: bytes, msg: Goodbye, now: float
    ) -> tuple[Outcome, list[PeerEvent]]:
        out, events = Outcome(), []
        if socket == EXPERT:
            eid = self.by_routing.get(routing_id)
            if eid is None:
                out.reject("unregistered", "GOODBYE from a peer that has not said HELLO")
            else:
                self._retire(eid, f"expert {eid} said GOODBYE({msg.reason!r})", out, events)
        elif not self.is_reducer(routing_id):
            out.reject("unregistered", "GOODBYE from a peer that is not the reducer")
        elif msg.reason != "done":
            events.append(ReducerGone(f"reducer said GOODBYE({msg.reason!r})"))
            self.reducer = None
        else:
            out.done = True
            out.notes.append("reducer said GOODBYE('done'): telling every expert")
            out.sends.extend(Send(EXPERT, rid, Goodbye("done")) for rid in self.by_routing)
        return out, events

    def expire(self, now: float) -> tuple[Outcome, list[PeerEvent]]:
        """Retire every peer silent for longer than ``liveness``."""
        out, events = Outcome(), []
        for expert in [e for e in self.experts.values() if e.live]:
            if now - expert.last_seen > self.liveness:
                self._retire(expert.expert_id, f"expert {expert.expert_id} timed out", out, events)
        if self.reducer is not None and now - self.reducer.last_seen > self.liveness:
            events.append(ReducerGone("reducer timed out"))
            self.reducer = None
        return out, events

    def heartbeat(self, socket: str, routing_id: bytes, msg: Heartbeat, now: float) -> Outcome:
        """Nothing to do for a known peer (``touch`` did it); an unknown one must HELLO."""
        out = Outcome()
        known = routing_id in self.by_routing if socket == EXPERT else self.is_reducer(routing_id)
        if not known:
            out.sends.append(Send(socket, routing_id, Goodbye("unregistered")))
            out.reject("unregistered", "HEARTBEAT from a peer that has not said HELLO")
        return out

    def _retire(self, eid: int, why: str, out: Outcome, events: list[PeerEvent]) -> None:
        """The holder of ``eid`` is gone: stop expecting it (its tokens: ``ExpertGone``)."""
        expert = self.experts[eid]
        expert.live = False
        self._roster = None
        expert.in_flight.clear()
        self.by_routing.pop(expert.routing_id, None)
        out.notes.append(why)
        events.append(ExpertGone(eid))

    # ---- id alignment (ALIGN): relayed between an expert and the reducer ----------------

    def align(self, socket: str, routing_id: bytes, msg: Align, now: float) -> Outcome:
        """Relay an ALIGN (docs/protocol.md, "Alignment"), never looking inside it: from a
        registered expert under its own id to the reducer (or "wait" while there is none);
        from the registered reducer to the live registration of ``msg.expert_id``."""
        out = Outcome()
        if socket == EXPERT:
            eid = self.by_routing.get(routing_id)
            if eid is None:
                out.sends.append(Send(EXPERT, routing_id, Goodbye("unregistered")))
                return out.reject("unregistered", "ALIGN from a peer that has not said HELLO")
            if msg.expert_id != eid:
                return out.reject("impersonation", f"expert {eid} sent ALIGN as {msg.expert_id}")
            if msg.stage not in ALIGN_EXPERT_STAGES:
                detail = f"ALIGN stage {msg.stage!r} from expert {eid}"
                return out.reject("unexpected_kind", detail)
            if self.reducer is None:
                wait = Align(eid, ALIGN_WAIT, "no reducer is registered yet")
                out.sends.append(Send(EXPERT, routing_id, wait))
                return out
            out.sends.append(Send(REDUCER, self.reducer.routing_id, msg))  # its own frames
            return out
        if not self.is_reducer(routing_id):
            out.sends.append(Send(REDUCER, routing_id, Goodbye("unregistered")))
            return out.reject("unregistered", "ALIGN from a peer that is not the reducer")
        if msg.stage not in ALIGN_REDUCER_STAGES:
            return out.reject("unexpected_kind", f"ALIGN stage {msg.stage!r} from the reducer")
        expert = self.experts.get(msg.expert_id)
        if expert is None or not expert.live:
            detail = f"ALIGN {msg.stage!r} for expert {msg.expert_id}, which is not registered"
            return out.reject("align_undeliverable", detail)
        out.sends.append(Send(EXPERT, expert.routing_id, msg))
        return out
