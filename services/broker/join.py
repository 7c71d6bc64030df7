"""The broker's bookkeeping: registration, join, order, flow control and reply routing.

No sockets here. The server hands in every decoded message with its peer's routing id (opaque
bytes) and ``now`` from ``time.monotonic()``; every call returns an ``Outcome`` saying what to
send and what to count, so the server only does I/O. The rules are docs/protocol.md's
"Broker semantics"; in short::

    EMB(seq, i) -> pending[seq] --(all expected experts in, in seq order)--> ready (no reducer)
                -> dispatched[seq] --BATCH--> reducer --GRAD/ACK--> slice k to k-th present expert

All state is bounded: pending + ready + dispatched steps stay below ``max_pending_steps``
(EMBs for later steps are refused ``too_far_ahead``), and each expert holds at most ``window``
steps in flight. A step nobody can complete is not kept forever: the head step is released
(missing experts masked) or skipped ``step_timeout`` seconds after it opened, and a step the
reducer has not answered ``step_timeout`` seconds after its first EMB is dropped -- the same
timeout after which the experts themselves give the step up.
"""

from __future__ import annotations

from collections import deque

from traci_ml.config import Config
from traci_ml.proto import Ack, Batch, Drop, Emb, Goodbye, Grad, Hello, Tensor, Welcome
from traci_ml.services.broker.records import (
    EXPERT,
    NOTHING,
    REDUCER,
    ExpertPeer,
    Holder,
    Outcome,
    PendingStep,
    ReducerPeer,
    ReleasedStep,
    Send,
)


class JoinBook:
    """All broker state that is not a socket."""

    def __init__(
        self,
        *,
        n_experts: int,
        run_id: str,
        embed_dim: int,
        dtype: str,
        window: int,
        max_pending_steps: int,
        liveness: float,
        step_timeout: float,
    ) -> None:
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        self.n_experts, self.run_id = n_experts, run_id
        self.embed_dim, self.dtype = embed_dim, dtype
        self.window, self.max_pending_steps = window, max_pending_steps
        self.liveness, self.step_timeout = liveness, step_timeout
        self._experts: dict[int, ExpertPeer] = {}  # by expert id, gone holders included
        self._by_routing: dict[bytes, int] = {}  # live expert routing id -> expert id
        self._reducer: ReducerPeer | None = None
        self._generation = 0
        self._registered_once: set[int] = set()
        self.started = False  # start gate: every expert registered once
        self._resume_seq = 0  # before the gate: the highest position a HELLO reported
        self._gate_opened = 0.0
        self.next_seq = 0  # head: the next step to release
        self._head_since = 0.0
        self.highest_seq = -1  # highest seq accepted
        self._pending: dict[int, PendingStep] = {}
        self._ready: deque[ReleasedStep] = deque()
        self._dispatched: dict[int, ReleasedStep] = {}  # insertion order is seq order
        self._all_present = (True,) * n_experts
        # (first seq every live expert is expected in, their ids); None: recompute
        self._roster: tuple[int, frozenset[int]] | None = None

    @classmethod
    def from_config(cls, config: Config, *, n_experts: int) -> JoinBook:
        net = config.network
        return cls(
            n_experts=n_experts,
            run_id=config.run_id,
            embed_dim=config.embed_dim,
            dtype=config.expert.dtype,
            window=config.expert.window,
            max_pending_steps=net.max_pending_steps,
            liveness=net.liveness,
            step_timeout=config.expert.step_timeout,
        )

    # ---- views for the server and metrics ------------------------------------------------

    @property
    def pending_steps(self) -> int:
        """Steps joined or joining but not yet sent to a reducer (pending + ready)."""
        return len(self._pending) + len(self._ready)

    @property
    def dispatched_steps(self) -> int:
        return len(self._dispatched)

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

    # ---- expert traffic ------------------------------------------------------------------

    def emb(self, routing_id: bytes, msg: Emb, now: float) -> Outcome:
        return self.emb_fields(routing_id, msg.seq, msg.expert_id, msg.phase, msg.tensor, now)

    def emb_fields(
        self, routing_id: bytes, seq: int, expert_id: int, phase: str, tensor: Tensor, now: float
    ) -> Outcome:
        """``emb`` from the decoded fields (the server's hot path builds no ``Emb``)."""
        eid = self._by_routing.get(routing_id)
        if eid is None:
            out = Outcome()
            out.sends.append(Send(EXPERT, routing_id, Goodbye("unregistered")))
            return out.reject("unregistered", "EMB from a peer that has not said HELLO")
        if expert_id != eid:
            return Outcome().reject("impersonation", f"expert {eid} sent EMB as {expert_id}")
        expert = self._experts[eid]
        if not self.started:  # it has no WELCOME yet: this is not a well-behaved peer
            return self._refuse_emb(
                Outcome(), expert, seq, "not_started", "the start gate is closed"
            )
        step = self._pending.get(seq)
        in_flight = expert.in_flight
        if seq in in_flight or (step is not None and eid in step.forfeited):
            return Outcome().reject("duplicate", f"second EMB from expert {eid}")
        first_ok = max(self.next_seq, expert.join_seq)
        if seq < first_ok:
            return self._refuse_emb(
                Outcome(), expert, seq, "late", f"first open step is {first_ok}"
            )
        limit = self._oldest_open() + self.max_pending_steps
        if seq >= limit:
            return self._refuse_emb(
                Outcome(), expert, seq, "too_far_ahead", f"limit is {limit - 1}"
            )
        spec = (phase, tensor.shape, tensor.dtype)
        if (
            tensor.dtype != self.dtype
            or tensor.shape[1] != self.embed_dim
            or (step is not None and step.spec is not None and step.spec != spec)
        ):
            conflict = self._conflict(spec, step)
            return self._refuse_emb(Outcome(), expert, seq, "conflict", conflict, forfeit_at=now)
        if len(in_flight) >= self.window:
            detail = f"{len(in_flight)} steps in flight, window {self.window}"
            return self._refuse_emb(Outcome(), expert, seq, "window", detail, forfeit_at=now)
        if step is None:
            step = self._pending[seq] = PendingStep(seq, now, spec, now)
        elif step.spec is None:
            step.spec, step.first_arrival = spec, now
        step.tokens[eid] = (expert.holder, tensor)
        in_flight.add(seq)
        if seq > self.highest_seq:
            self.highest_seq = seq
        if seq == self.next_seq or self.next_seq not in self._pending:
            out = Outcome()
            self._advance(now, out)
            return out
        return NOTHING  # the head is an incomplete step this EMB left alone: nothing to do

    def _conflict(self, spec: tuple[str, tuple[int, ...], str], step: PendingStep | None) -> str:
        """Why an EMB of ``spec`` (phase, shape, dtype) does not fit (the log's detail)."""
        _, shape, dtype = spec
        if dtype != self.dtype or shape[1] != self.embed_dim:
            want = f"{self.dtype}[B, {self.embed_dim}]"
            return f"{dtype}{list(shape)}, registered {want}"
        return f"{spec} differs from first {step.spec if step is not None else None}"

    def _refuse_emb(
        self,
        out: Outcome,
        expert: ExpertPeer,
        seq: int,
        reason: str,
        detail: str,
        *,
        forfeit_at: float | None = None,
    ) -> Outcome:
        """Refuse an EMB with DROP. With ``forfeit_at`` (the seq is still open), the step
        stops waiting for this expert: it will not send that seq again."""
        out.sends.append(Send(EXPERT, expert.routing_id, Drop(seq, reason)))
        out.dropped.append(reason)
        if forfeit_at is not None:
            step = self._pending.setdefault(seq, PendingStep(seq, opened=forfeit_at))
            step.forfeited.add(expert.expert_id)
            self._advance(forfeit_at, out)
        return out.reject(reason, f"expert {expert.expert_id}: {detail}")

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

    # ---- reducer traffic -----------------------------------------------------------------

    def grad(self, routing_id: bytes, msg: Grad, now: float) -> Outcome:
        out = Outcome()
        step = self._answerable(routing_id, msg.seq, out)
        if step is None:
            return out
        if (
            len(msg.tensors) != len(step.holders)
            or step.phase != "train"
            or any(t.shape != step.shape or t.dtype != self.dtype for t in msg.tensors)
        ):
            detail = (
                f"{len(msg.tensors)} {msg.tensors[0].dtype} tensors of {msg.tensors[0].shape} "
                f"for a {step.phase} "
                f"step with {len(step.holders)} present of {step.shape}"
            )
            self._drop_step(self._dispatched.pop(step.seq), "grad_mismatch", out)
            return out.reject("grad_mismatch", detail)
        del self._dispatched[step.seq]
        for holder, tensor in zip(step.holders, msg.tensors, strict=True):
            self._reply(holder, Grad(step.seq, holder.expert_id, (tensor,)), out)
        return out

    def ack(self, routing_id: bytes, msg: Ack, now: float) -> Outcome:
        out = Outcome()
        step = self._answerable(routing_id, msg.seq, out)
        if step is not None and step.phase != "eval":  # a train step needs its GRAD
            self._drop_step(self._dispatched.pop(step.seq), "grad_mismatch", out)
            return out.reject("grad_mismatch", f"ACK for train step {step.seq}")
        if step is not None:
            del self._dispatched[step.seq]
            for holder in step.holders:  # the reducer's ACK itself: encoded once for all
                self._reply(holder, msg, out)
        return out

    def reducer_drop(self, routing_id: bytes, msg: Drop, now: float) -> Outcome:
        """The reducer refused a BATCH: its experts get DROP with the reducer's reason."""
        out = Outcome()
        step = self._answerable(routing_id, msg.seq, out)
        if step is not None:
            del self._dispatched[step.seq]
            drop = Drop(step.seq, msg.reason)
            for holder in step.holders:
                self._reply(holder, drop, out)
            out.dropped.append("reducer_rejected")
            out.notes.append(f"reducer dropped step {step.seq}: {msg.reason}")
        return out

    def _answerable(self, routing_id: bytes, seq: int, out: Outcome) -> ReleasedStep | None:
        if not self._is_reducer(routing_id):
            out.sends.append(Send(REDUCER, routing_id, Goodbye("unregistered")))
            out.reject("unregistered", "reply from a peer that is not the registered reducer")
            return None
        step = self._dispatched.get(seq)
        if step is None:
            out.reject("unknown_step", "no dispatched step awaits a reply for this seq")
        return step

    # ---- time ----------------------------------------------------------------------------

    def tick(self, now: float) -> Outcome:
        """Expire silent peers and overdue steps; release what that unblocks."""
        out = Outcome()
        for expert in [e for e in self._experts.values() if e.live]:
            if now - expert.last_seen > self.liveness:
                self._retire(expert.expert_id, out, f"expert {expert.expert_id} timed out")
        if self._reducer is not None and now - self._reducer.last_seen > self.liveness:
            self._lose_reducer(out, "reducer timed out")
            self._reducer = None
        self._expire_steps(now, out)
        self._advance(now, out)
        while self.started and self._head_overdue(now):
            step = self._pending.pop(self.next_seq, None)
            if step is not None and step.tokens:
                out.notes.append(f"step {self.next_seq} overdue: released with experts masked")
                self._release(step, now, out)
            else:
                out.skipped += 1
            self.next_seq, self._head_since = self.next_seq + 1, now
            self._advance(now, out)
        return out

    def _head_overdue(self, now: float) -> bool:
        step = self._pending.get(self.next_seq)
        if step is None:
            return self.next_seq <= self.highest_seq and now - self._head_since > self.step_timeout
        return now - max(step.opened, self._gate_opened) > self.step_timeout

    def _expire_steps(self, now: float, out: Outcome) -> None:
        deadline = now - self.step_timeout
        for seq in [s for s, step in self._dispatched.items() if step.first_arrival < deadline]:
            self._drop_step(self._dispatched.pop(seq), "timeout", out)
        if any(step.first_arrival < deadline for step in self._ready):
            waiting: deque[ReleasedStep] = deque()
            for step in self._ready:
                if step.first_arrival < deadline:
                    self._drop_step(step, "timeout", out)
                else:
                    waiting.append(step)
            self._ready = waiting

    # ---- internals -----------------------------------------------------------------------

    def _is_reducer(self, routing_id: bytes) -> bool:
        return self._reducer is not None and self._reducer.routing_id == routing_id

    def _oldest_open(self) -> int:
        """Lowest seq still held (ready or dispatched), else the head: the bound's base."""
        oldest = self.next_seq
        if self._ready:
            oldest = min(oldest, self._ready[0].seq)
        if self._dispatched:
            oldest = min(oldest, next(iter(self._dispatched)))
        return oldest

    def _expected(self, seq: int) -> frozenset[int] | set[int]:
        roster = self._roster
        if roster is None:
            live = [e for e in self._experts.values() if e.live]
            first = max((e.join_seq for e in live), default=0)
            roster = self._roster = (first, frozenset(e.expert_id for e in live))
        if seq >= roster[0]:  # the usual case: every live expert is expected
            return roster[1]
        return {e.expert_id for e in self._experts.values() if e.live and e.join_seq <= seq}

    def _advance(self, now: float, out: Outcome) -> None:
        """Release (or skip) head steps in seq order while they are complete; then dispatch."""
        while self.started:
            seq = self.next_seq
            expected = self._expected(seq)
            step = self._pending.get(seq)
            if step is None:
                if expected or seq > self.highest_seq:
                    break
                out.skipped += 1
            elif len(step.tokens) + len(step.forfeited) < len(expected) or not (
                expected <= step.tokens.keys() | step.forfeited
            ):
                break
            elif step.tokens:
                self._release(self._pending.pop(seq), now, out)
            else:
                del self._pending[seq]
                out.skipped += 1
            self.next_seq, self._head_since = seq + 1, now
        self._dispatch(now, out)

    def _release(self, step: PendingStep, now: float, out: Outcome) -> None:
        tokens = step.tokens
        phase, shape, _ = step.spec  # type: ignore[misc]  # set with the first token
        if len(tokens) == self.n_experts:  # everyone took part: ids 0..n-1
            present = self._all_present
            joined = [tokens[i] for i in range(self.n_experts)]
        else:
            present = tuple(i in tokens for i in range(self.n_experts))
            joined = [tokens[i] for i in sorted(tokens)]
        holders, tensors = zip(*joined, strict=True)
        self._ready.append(
            ReleasedStep(step.seq, phase, shape, present, tensors, holders, step.first_arrival)
        )
        out.join_waits.append(now - step.first_arrival)

    def _dispatch(self, now: float, out: Outcome) -> None:
        while self._reducer is not None and self._ready:
            step = self._ready.popleft()
            batch = Batch(step.seq, step.phase, step.present, step.tensors)
            out.sends.append(Send(REDUCER, self._reducer.routing_id, batch))
            self._dispatched[step.seq] = step
            out.queue_latencies.append(now - step.first_arrival)

    def _reply(self, holder: Holder, msg: Grad | Ack | Drop, out: Outcome) -> None:
        """Route a reply to the registration that sent the token, if it is still there."""
        expert = self._experts.get(holder.expert_id)
        if expert is not None and expert.live and expert.generation == holder.generation:
            expert.in_flight.discard(msg.seq)
            out.sends.append(Send(EXPERT, holder.routing_id, msg))

    def _drop_step(self, step: ReleasedStep, reason: str, out: Outcome) -> None:
        drop = Drop(step.seq, reason)
        for holder in step.holders:
            self._reply(holder, drop, out)
        out.dropped.append(reason)

    def _lose_reducer(self, out: Outcome, why: str) -> None:
        """Every step dispatched to the old reducer gets DROP: never a late gradient."""
        lost = list(self._dispatched.values())
        self._dispatched.clear()
        for step in lost:
            self._drop_step(step, "reducer_lost", out)
        out.notes.append(f"{why}: {len(lost)} dispatched steps dropped")

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
