"""The broker's peer bookkeeping: registration, the start gate, liveness and departures.

``PeerBook`` is the base of ``join.JoinBook`` and is used only through it: it keeps who is
registered (experts by id and routing id, with a generation per registration, and the reducer)
and answers HELLO, GOODBYE and HEARTBEAT; the step join, order, flow control and reply routing
are ``JoinBook``'s (join.py). A peer's arrival or departure changes which experts a step
expects, so this side calls back into the join (``_advance``, ``_dispatch``,
``_lose_reducer``); silent peers are expired by ``JoinBook.tick``. Like join.py, no sockets:
every call returns an ``Outcome``. The rules are docs/protocol.md's "Broker semantics".
"""

from __future__ import annotations

import hmac
import secrets
from collections import deque
from typing import TYPE_CHECKING

from traci_ml.proto import (
    ALIGN_EXPERT_STAGES,
    ALIGN_REDUCER_STAGES,
    ALIGN_WAIT,
    HELD,
    Align,
    Goodbye,
    Hello,
    Welcome,
)
from traci_ml.services.broker.outcomes import (
    EXPERT,
    REDUCER,
    ExpertPeer,
    Outcome,
    PendingStep,
    ReducerPeer,
    ReleasedStep,
    Send,
)


class PeerBook:
    """Registered experts and reducer, the start gate and liveness: ``JoinBook``'s base."""

    if TYPE_CHECKING:  # the join side, kept by JoinBook (join.py)
        next_seq: int
        highest_seq: int
        _head_since: float
        _pending: dict[int, PendingStep]
        _ready: deque[ReleasedStep]

        def _advance(self, now: float, out: Outcome) -> None: ...
        def _dispatch(self, now: float, out: Outcome) -> None: ...
        def _lose_reducer(self, out: Outcome, why: str) -> None: ...

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
        self._experts: dict[int, ExpertPeer] = {}  # by expert id, gone holders included
        self._by_routing: dict[bytes, int] = {}  # live expert routing id -> expert id
        self._reducer: ReducerPeer | None = None
        self._generation = 0
        self._registered_once: set[int] = set()
        self.started = False  # start gate: every expert registered once
        self._resume_seq = 0  # before the gate: the highest position a HELLO reported
        self._gate_opened = 0.0
        # (first seq every live expert is expected in, their ids); None: recompute
        self._roster: tuple[int, frozenset[int]] | None = None

    # ---- views for the server and metrics ------------------------------------------------

    @property
    def registered_experts(self) -> int:
        return len(self._experts)

    @property
    def live_experts(self) -> int:
        return len(self._by_routing)

    @property
    def reducer_up(self) -> bool:
        return self._reducer is not None

    def expert_up(self) -> dict[int, bool]:
        return {i: i in self._experts and self._experts[i].live for i in range(self.n_experts)}

    def live_peers(self) -> list[tuple[str, bytes]]:
        peers = [(EXPERT, rid) for rid in self._by_routing]
        if self._reducer is not None:
            peers.append((REDUCER, self._reducer.routing_id))
        return peers

    def serve_targets(self) -> tuple[dict[int, bytes], bytes | None]:
        """For served queries (serve.py): the live experts, id -> routing id, once the start
        gate is open (before it they wait for WELCOME), and the reducer's routing id."""
        experts = {eid: rid for rid, eid in self._by_routing.items()} if self.started else {}
        return experts, None if self._reducer is None else self._reducer.routing_id

    def key_of(self, socket: str, routing_id: bytes) -> str | None:
        """The key role a registered route registered with (None: not registered)."""
        if socket == EXPERT:
            eid = self._by_routing.get(routing_id)
            return None if eid is None else self._experts[eid].key
        if self._is_reducer(routing_id):
            return self._reducer.key  # type: ignore[union-attr]
        return None

    def touch(self, socket: str, routing_id: bytes, now: float) -> None:
        """Any message from a registered peer proves it alive."""
        if socket == EXPERT and routing_id in self._by_routing:
            self._experts[self._by_routing[routing_id]].last_seen = now
        elif socket == REDUCER and self._reducer is not None:
            if self._reducer.routing_id == routing_id:
                self._reducer.last_seen = now

    # ---- registration --------------------------------------------------------------------

    def hello(
        self, socket: str, routing_id: bytes, msg: Hello, now: float, key: str | None = None
    ) -> Outcome:
        """Register a peer. ``key``: with CURVE, the role of the key the HELLO came with."""
        out = Outcome()
        problem = self._mismatch(socket, msg)
        if problem is None and self.keys_bound:
            claimed = f"expert-{msg.expert_id}" if socket == EXPERT else REDUCER
            if key != claimed:
                problem = f"the key of {key or 'no role'!r} may not register as {claimed!r}"
                out.sends.append(Send(socket, routing_id, Welcome(ok=False, reason=problem)))
                return out.reject("wrong_key", problem)
        if problem is None and socket == EXPERT:
            return self._hello_expert(routing_id, msg, now, out, key)
        if problem is None:
            return self._hello_reducer(routing_id, msg, now, out, key)
        out.sends.append(Send(socket, routing_id, Welcome(ok=False, reason=problem)))
        return out.reject("refused", problem)

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

    def _held(self, socket: str, routing_id: bytes, what: str, out: Outcome) -> Outcome:
        """Refuse a HELLO for a role a live registration holds: ``held``, which the peer
        retries (docs/protocol.md, "Registration")."""
        detail = (
            f"{what} is held by another live peer; it is freed {self.liveness:g}s after "
            "that peer's last message"
        )
        out.sends.append(Send(socket, routing_id, Welcome(ok=False, reason=f"{HELD}: {detail}")))
        return out.reject(HELD, detail)

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
        self, routing_id: bytes, msg: Hello, now: float, out: Outcome, key: str | None
    ) -> Outcome:
        eid = msg.expert_id
        holder = self._experts.get(eid)
        if holder is not None and holder.live and holder.routing_id != routing_id:
            if not self._same_party(holder, msg):
                return self._held(EXPERT, routing_id, f"expert_id {eid}", out)
            self._retire(eid, out, f"expert {eid} reconnected on a new route")
        previous = self._by_routing.get(routing_id)
        if previous is not None:  # a rejoin from the same peer (or it changed its id)
            self._retire(previous, out, f"expert {previous} re-registered")
        if self.started:
            join_seq = max(self.next_seq, self.highest_seq + 1)
        else:  # a fresh broker (or a restarted one) resumes where the peers are
            self._resume_seq = join_seq = max(self._resume_seq, msg.next_seq)
        self._generation += 1
        peer = ExpertPeer(eid, routing_id, self._generation, join_seq, now,
                          token=secrets.token_hex(16), key=key)  # fmt: skip
        self._experts[eid] = peer
        self._by_routing[routing_id] = eid
        self._roster = None
        self._registered_once.add(eid)
        if not self.started:
            # WELCOME waits for the start gate, so nobody sends a step before the run's
            # start is known (the peer keeps heartbeating meanwhile).
            out.notes.append(f"expert {eid} registered, waiting for the start gate")
            if len(self._registered_once) == self.n_experts:
                self._open_gate(now, out)
            return out
        out.notes.append(f"expert {eid} registered, join_seq {join_seq}")
        welcome = Welcome(ok=True, start_seq=join_seq, token=peer.token)
        out.sends.append(Send(EXPERT, routing_id, welcome))
        self._advance(now, out)
        return out

    def _open_gate(self, now: float, out: Outcome) -> None:
        """Every expert registered once: start at the highest position any peer reported,
        and welcome every live expert with it."""
        start = self._resume_seq
        self.started, self._gate_opened, self._head_since = True, now, now
        self.next_seq, self.highest_seq = start, max(self.highest_seq, start - 1)
        for peer in self._experts.values():
            if peer.live:
                peer.join_seq = start
                self._roster = None
                welcome = Welcome(ok=True, start_seq=start, token=peer.token)
                out.sends.append(Send(EXPERT, peer.routing_id, welcome))
        out.notes.append(f"all {self.n_experts} experts registered: start gate open at {start}")
        self._advance(now, out)

    def _hello_reducer(
        self, routing_id: bytes, msg: Hello, now: float, out: Outcome, key: str | None
    ) -> Outcome:
        holder = self._reducer
        if holder is not None and holder.routing_id != routing_id:
            if not self._same_party(holder, msg):
                return self._held(REDUCER, routing_id, "the reducer", out)
        if holder is not None:
            self._lose_reducer(out, "reducer re-registered")
        self._reducer = ReducerPeer(routing_id, now, token=secrets.token_hex(16), key=key)
        if not self.started:
            self._resume_seq = max(self._resume_seq, msg.next_seq)
        start_seq = self._ready[0].seq if self._ready else self.next_seq
        out.notes.append(f"reducer registered, start_seq {start_seq}")
        welcome = Welcome(ok=True, start_seq=start_seq, token=self._reducer.token)
        out.sends.append(Send(REDUCER, routing_id, welcome))
        self._dispatch(now, out)
        return out

    # ---- departures and liveness ---------------------------------------------------------

    def goodbye(self, socket: str, routing_id: bytes, msg: Goodbye, now: float) -> Outcome:
        out = Outcome()
        if socket == EXPERT:
            eid = self._by_routing.get(routing_id)
            if eid is None:
                return out.reject("unregistered", "GOODBYE from a peer that has not said HELLO")
            self._retire(eid, out, f"expert {eid} said GOODBYE({msg.reason!r})")
            self._advance(now, out)
            return out
        if not self._is_reducer(routing_id):
            return out.reject("unregistered", "GOODBYE from a peer that is not the reducer")
        if msg.reason != "done":
            self._lose_reducer(out, f"reducer said GOODBYE({msg.reason!r})")
            self._reducer = None
            return out
        out.done = True
        out.notes.append("reducer said GOODBYE('done'): telling every expert")
        out.sends.extend(Send(EXPERT, rid, Goodbye("done")) for rid in self._by_routing)
        return out

    def heartbeat(self, socket: str, routing_id: bytes) -> Outcome:
        """Nothing to do for a known peer (``touch`` did it); an unknown one must HELLO."""
        out = Outcome()
        known = routing_id in self._by_routing if socket == EXPERT else self._is_reducer(routing_id)
        if not known:
            out.sends.append(Send(socket, routing_id, Goodbye("unregistered")))
            out.reject("unregistered", "HEARTBEAT from a peer that has not said HELLO")
        return out

    # ---- id alignment (ALIGN): relayed between an expert and the reducer ----------------

    def align(self, socket: str, routing_id: bytes, msg: Align) -> Outcome:
        """Relay an ALIGN (docs/protocol.md, "Alignment"), never looking inside it: from a
        registered expert under its own id to the reducer (or "wait" while there is none);
        from the registered reducer to the live registration of ``msg.expert_id``."""
        out = Outcome()
        if socket == EXPERT:
            eid = self._by_routing.get(routing_id)
            if eid is None:
                out.sends.append(Send(EXPERT, routing_id, Goodbye("unregistered")))
                return out.reject("unregistered", "ALIGN from a peer that has not said HELLO")
            if msg.expert_id != eid:
                return out.reject("impersonation", f"expert {eid} sent ALIGN as {msg.expert_id}")
            if msg.stage not in ALIGN_EXPERT_STAGES:
                detail = f"ALIGN stage {msg.stage!r} from expert {eid}"
                return out.reject("unexpected_kind", detail)
            if self._reducer is None:
                wait = Align(eid, ALIGN_WAIT, "no reducer is registered yet")
                out.sends.append(Send(EXPERT, routing_id, wait))
                return out
            out.sends.append(Send(REDUCER, self._reducer.routing_id, msg))  # its own frames
            return out
        if not self._is_reducer(routing_id):
            out.sends.append(Send(REDUCER, routing_id, Goodbye("unregistered")))
            return out.reject("unregistered", "ALIGN from a peer that is not the reducer")
        if msg.stage not in ALIGN_REDUCER_STAGES:
            return out.reject("unexpected_kind", f"ALIGN stage {msg.stage!r} from the reducer")
        expert = self._experts.get(msg.expert_id)
        if expert is None or not expert.live:
            detail = f"ALIGN {msg.stage!r} for expert {msg.expert_id}, which is not registered"
            return out.reject("align_undeliverable", detail)
        out.sends.append(Send(EXPERT, expert.routing_id, msg))
        return out

    def _is_reducer(self, routing_id: bytes) -> bool:
        return self._reducer is not None and self._reducer.routing_id == routing_id

    def _retire(self, eid: int, out: Outcome, why: str) -> None:
        """The holder of ``eid`` is gone: stop expecting it and mask its unreleased tokens."""
        expert = self._experts[eid]
        expert.live = False
        self._roster = None
        expert.in_flight.clear()
        self._by_routing.pop(expert.routing_id, None)
        for seq in [s for s, step in self._pending.items() if eid in step.tokens]:
            step = self._pending[seq]
            del step.tokens[eid]
            if not step.tokens:
                step.spec = None
                if not step.forfeited:
                    del self._pending[seq]
        out.notes.append(why)
