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

from collections import deque
from typing import TYPE_CHECKING

from traci_ml.proto import Goodbye, Hello, Welcome
from traci_ml.services.broker.records import (
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
        self, *, n_experts: int, run_id: str, embed_dim: int, dtype: str, liveness: float
    ) -> None:
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        self.n_experts, self.run_id = n_experts, run_id
        self.embed_dim, self.dtype = embed_dim, dtype
        self.liveness = liveness
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

    def touch(self, socket: str, routing_id: bytes, now: float) -> None:
        """Any message from a registered peer proves it alive."""
        if socket == EXPERT and routing_id in self._by_routing:
            self._experts[self._by_routing[routing_id]].last_seen = now
        elif socket == REDUCER and self._reducer is not None:
            if self._reducer.routing_id == routing_id:
                self._reducer.last_seen = now

    # ---- registration --------------------------------------------------------------------

    def hello(self, socket: str, routing_id: bytes, msg: Hello, now: float) -> Outcome:
        out = Outcome()
        problem = self._mismatch(socket, msg)
        if problem is None and socket == EXPERT:
            return self._hello_expert(routing_id, msg, now, out)
        if problem is None:
            return self._hello_reducer(routing_id, msg, now, out)
        out.sends.append(Send(socket, routing_id, Welcome(ok=False, reason=problem)))
        return out.reject("refused", problem)

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

    def _hello_expert(self, routing_id: bytes, msg: Hello, now: float, out: Outcome) -> Outcome:
        eid = msg.expert_id
        holder = self._experts.get(eid)
        if holder is not None and holder.live and holder.routing_id != routing_id:
            reason = f"expert_id {eid} is held by another live peer"
            out.sends.append(Send(EXPERT, routing_id, Welcome(ok=False, reason=reason)))
            return out.reject("refused", reason)
        previous = self._by_routing.get(routing_id)
        if previous is not None:  # a rejoin from the same peer (or it changed its id)
            self._retire(previous, out, f"expert {previous} re-registered")
        if self.started:
            join_seq = max(self.next_seq, self.highest_seq + 1)
        else:  # a fresh broker (or a restarted one) resumes where the peers are
            self._resume_seq = join_seq = max(self._resume_seq, msg.next_seq)
        self._generation += 1
        self._experts[eid] = ExpertPeer(eid, routing_id, self._generation, join_seq, now)
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
        out.sends.append(Send(EXPERT, routing_id, Welcome(ok=True, start_seq=join_seq)))
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
                out.sends.append(Send(EXPERT, peer.routing_id, Welcome(ok=True, start_seq=start)))
        out.notes.append(f"all {self.n_experts} experts registered: start gate open at {start}")
        self._advance(now, out)

    def _hello_reducer(self, routing_id: bytes, msg: Hello, now: float, out: Outcome) -> Outcome:
        if self._reducer is not None and self._reducer.routing_id != routing_id:
            reason = "another reducer is registered"
            out.sends.append(Send(REDUCER, routing_id, Welcome(ok=False, reason=reason)))
            return out.reject("refused", reason)
        if self._reducer is not None:
            self._lose_reducer(out, "reducer re-registered")
        self._reducer = ReducerPeer(routing_id, now)
        if not self.started:
            self._resume_seq = max(self._resume_seq, msg.next_seq)
        start_seq = self._ready[0].seq if self._ready else self.next_seq
        out.notes.append(f"reducer registered, start_seq {start_seq}")
        out.sends.append(Send(REDUCER, routing_id, Welcome(ok=True, start_seq=start_seq)))
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
