"""The broker's step bookkeeping: join, order, flow control and reply routing.

No sockets here. The service (``service.py``) hands in every decoded message with its peer's
routing id (opaque bytes) and ``now`` from ``time.monotonic()``; every call returns an
``Outcome`` saying what to send and what to count, so the service only does I/O. Who is
registered is the book's own ``peers.PeerRegistry`` (``book.peers``, which also answers
HEARTBEAT and ALIGN by itself); a HELLO, GOODBYE or tick goes through the book, which hands it
to the registry and reacts to the ``PeerEvent``s it returns (an expert gone: mask its tokens;
the reducer gone: drop what it held; the gate open: start). The rules are docs/protocol.md's
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

from traci_ml.core.config import Config
from traci_ml.proto import (
    DEFAULT_MAX_ABS,
    Ack,
    Batch,
    Drop,
    Emb,
    Goodbye,
    Grad,
    Heartbeat,
    Hello,
    Welcome,
    value_problem,
)
from traci_ml.services.broker.deadline import Deadline
from traci_ml.services.broker.outcomes import (
    EXPERT,
    NOTHING,
    REDUCER,
    ExpertPeer,
    Holder,
    Outcome,
    PendingStep,
    ReleasedStep,
    Send,
    batch_fits,
)
from traci_ml.services.broker.peers import (
    ExpertGone,
    ExpertJoined,
    GateOpened,
    PeerEvent,
    PeerRegistry,
    ReducerGone,
    ReducerJoined,
)


class JoinBook:
    """All broker state that is not a socket: the steps, and (``peers``) who is registered."""

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
        max_abs: float = DEFAULT_MAX_ABS,
        keys_bound: bool = False,
        deadline: Deadline | None = None,
    ) -> None:
        self.peers = PeerRegistry(
            n_experts=n_experts,
            run_id=run_id,
            embed_dim=embed_dim,
            dtype=dtype,
            liveness=liveness,
            keys_bound=keys_bound,
        )
        self.n_experts, self.embed_dim, self.dtype = n_experts, embed_dim, dtype
        # The registry's records, read here on every EMB and reply (only the registry
        # changes them), and its roster of who each step waits for.
        self._experts, self._by_routing = self.peers.experts, self.peers.by_routing
        self._expected = self.peers.expected
        self.started = False  # the start gate is open (GateOpened)
        self._gate_opened = 0.0
        self.max_abs = max_abs  # the bound on every embedding and gradient value
        self.window, self.max_pending_steps = window, max_pending_steps
        self.step_timeout = step_timeout
        self.next_seq = 0  # head: the next step to release
        self._head_since = 0.0
        self.highest_seq = -1  # highest seq accepted
        self._pending: dict[int, PendingStep] = {}
        self._ready: deque[ReleasedStep] = deque()
        self._dispatched: dict[int, ReleasedStep] = {}  # insertion order is seq order
        self._all_present = (True,) * n_experts
        # the deadline join (None: wait for every expected expert, as with join.quorum all)
        self.deadline = deadline if deadline is not None and deadline.quorum < n_experts else None
        self._wake = float("inf")  # when the head step's deadline passes (next_deadline)
        # model selection: the reducer's latest decision (its HELLO's, then its ACKs'), told
        # to every expert on the heartbeats (docs/protocol.md "Model selection")
        self.expert_heartbeat = Heartbeat()

    @classmethod
    def from_config(cls, config: Config, *, n_experts: int, keys_bound: bool = False) -> JoinBook:
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
            max_abs=config.security.max_abs_value,
            keys_bound=keys_bound,
            deadline=Deadline.from_config(config.join, n_experts, config.expert.step_timeout),
        )

    # ---- views for the service and metrics ------------------------------------------------

    @property
    def pending_steps(self) -> int:
        """Steps joined or joining but not yet sent to a reducer (pending + ready)."""
        return len(self._pending) + len(self._ready)

    @property
    def dispatched_steps(self) -> int:
        return len(self._dispatched)

    # ---- peers coming and going: the registry decides, the book reacts -------------------

    def hello(
        self, socket: str, routing_id: bytes, msg: Hello, now: float, key: str | None = None
    ) -> Outcome:
        """Register a peer (``peers.hello``); ``key``: with CURVE, the role of its key."""
        join_seq = max(self.next_seq, self.highest_seq + 1)  # the first step nobody has sent
        out, events = self.peers.hello(socket, routing_id, msg, now, key, join_seq=join_seq)
        if any(isinstance(e, ReducerJoined) for e in events):  # its decision, as it restored it
            self.expert_heartbeat = Heartbeat(msg.decided, msg.best, msg.stopped)
        return self._react(events, now, out)

    def goodbye(self, socket: str, routing_id: bytes, msg: Goodbye, now: float) -> Outcome:
        out, events = self.peers.goodbye(socket, routing_id, msg, now)
        self._react(events, now, out)
        if socket == EXPERT and events:  # an expert left: steps that waited for it may go
            self._advance(now, out)
        return out

    def _react(self, events: list[PeerEvent], now: float, out: Outcome) -> Outcome:
        """Bring the steps in line with what the registry changed, in order."""
        for event in events:
            match event:
                case ExpertGone(expert_id):
                    self._forget(expert_id)
                case ReducerGone(why):
                    self._lose_reducer(out, why)
                case ExpertJoined():
                    self._advance(now, out)
                case GateOpened(start):
                    self.started, self._gate_opened, self._head_since = True, now, now
                    self.next_seq, self.highest_seq = start, max(self.highest_seq, start - 1)
                    self._advance(now, out)
                case ReducerJoined(routing_id, token):  # it starts at the oldest unsent step
                    start = self._ready[0].seq if self._ready else self.next_seq
                    out.notes.append(f"reducer registered, start_seq {start}")
                    welcome = Welcome(ok=True, start_seq=start, token=token)
                    out.sends.append(Send(REDUCER, routing_id, welcome))
                    self._dispatch(now, out)
        return out

    def _forget(self, eid: int) -> None:
        """Expert ``eid``'s registration is gone: its tokens in unreleased steps are masked
        (a step left with none and no forfeit is forgotten)."""
        for seq in [s for s, step in self._pending.items() if eid in step.tokens]:
            step = self._pending[seq]
            del step.tokens[eid]
            if not step.tokens:
                step.spec = None
                if not step.forfeited:
                    del self._pending[seq]

    # ---- expert traffic ------------------------------------------------------------------

    def emb(self, routing_id: bytes, msg: Emb, now: float) -> Outcome:
        """An expert's EMB (the hot path: one per expert per step). Its values are checked
        first: NaN/Inf or beyond ``max_abs`` is refused like a malformed EMB (``refuse_emb``:
        DROP when it is its expert's own open step). ``msg.rows`` is already checked against
        the tensor's rows by decoding."""
        seq, expert_id, tensor = msg.seq, msg.expert_id, msg.tensor
        problem = value_problem((tensor,), self.max_abs)
        if problem is not None:
            return self.refuse_emb(routing_id, seq, *problem, now, expert_id=expert_id)
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
        if seq < first_ok:  # DROP says where the others are: the expert may skip ahead
            return self._refuse_emb(
                Outcome(),
                expert,
                seq,
                "late",
                f"first open step is {first_ok}",
                frontier=max(first_ok, self.highest_seq + 1),
            )
        limit = self._oldest_open() + self.max_pending_steps
        if seq >= limit:
            return self._refuse_emb(
                Outcome(), expert, seq, "too_far_ahead", f"limit is {limit - 1}"
            )
        spec = (msg.phase, tensor.shape, tensor.dtype)
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
        step.tokens[eid] = (expert.holder, tensor, msg.rows)
        in_flight.add(seq)
        if self.deadline is not None and msg.phase == "train":
            if step.quorum_at is None:
                if len(step.tokens) >= min(self.deadline.quorum, len(self._expected(seq))):
                    step.quorum_at = now
                self.deadline.arrived(eid, 0.0)
            else:
                self.deadline.arrived(eid, now - step.quorum_at)
        if seq > self.highest_seq:
            self.highest_seq = seq
        if seq == self.next_seq or self.next_seq not in self._pending:
            out = Outcome()
            self._advance(now, out)
            return out
        return NOTHING  # the head is an incomplete step this EMB left alone: nothing to do

    def refuse_emb(
        self,
        routing_id: bytes,
        seq: int,
        reason: str,
        detail: str,
        now: float,
        *,
        expert_id: int | None = None,
    ) -> Outcome:
        """An EMB for ``seq`` that failed validation. From a registered expert under its own
        id, for a step still open, it is answered DROP and the step stops waiting for that
        expert (masked), so one bad message never stalls the run; otherwise it is counted."""
        out = Outcome()
        eid = self._by_routing.get(routing_id)
        expert = None if eid is None else self._experts[eid]
        if (
            expert is None
            or expert_id != eid
            or not self.started
            or seq in expert.in_flight
            or seq < max(self.next_seq, expert.join_seq)
            or seq >= self._oldest_open() + self.max_pending_steps
        ):
            return out.reject(reason, detail)
        step = self._pending.get(seq)
        if step is not None and (eid in step.tokens or eid in step.forfeited):
            return out.reject(reason, detail)
        return self._refuse_emb(out, expert, seq, reason, detail, forfeit_at=now)

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
        frontier: int = -1,
    ) -> Outcome:
        """Refuse an EMB with DROP. With ``forfeit_at`` (the seq is still open), the step
        stops waiting for this expert: it will not send that seq again."""
        out.sends.append(Send(EXPERT, expert.routing_id, Drop(seq, reason, frontier)))
        out.dropped.append(reason)
        if forfeit_at is not None:
            step = self._pending.setdefault(seq, PendingStep(seq, opened=forfeit_at))
            step.forfeited.add(expert.expert_id)
            self._advance(forfeit_at, out)
        return out.reject(reason, f"expert {expert.expert_id}: {detail}")

    # ---- reducer traffic -----------------------------------------------------------------

    def grad(self, routing_id: bytes, msg: Grad, now: float) -> Outcome:
        out = Outcome()
        problem = value_problem(msg.tensors, self.max_abs)
        if problem is not None:  # never forwarded; the reducer's own step: DROP to its experts
            is_reducer = self.peers.is_reducer(routing_id)
            step = self._dispatched.pop(msg.seq, None) if is_reducer else None
            if step is not None:
                self._drop_step(step, "grad_rejected", out)
            return out.reject(problem[0], f"GRAD for step {msg.seq}: {problem[1]}")
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
            if msg.decided >= self.expert_heartbeat.decided:  # the registered reducer's
                self.expert_heartbeat = Heartbeat(msg.decided, msg.best, msg.stopped)
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
        if not self.peers.is_reducer(routing_id):
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
        out, events = self.peers.expire(now)
        self._react(events, now, out)
        self._expire_steps(now, out)
        self._advance(now, out)
        while self.started and self._head_overdue(now):
            step = self._pending.pop(self.next_seq, None)
            if step is not None and step.tokens:
                out.notes.append(f"step {self.next_seq} overdue: released with experts masked")
                self._release(step, now, out, self._expected(step.seq))
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

    def _oldest_open(self) -> int:
        """Lowest seq still held (ready or dispatched), else the head: the bound's base."""
        oldest = self.next_seq
        if self._ready:
            oldest = min(oldest, self._ready[0].seq)
        if self._dispatched:
            oldest = min(oldest, next(iter(self._dispatched)))
        return oldest

    def _advance(self, now: float, out: Outcome) -> None:
        """Release (or skip) head steps in seq order while they are complete -- or, for a
        train step, past its deadline (``deadline.py``); then dispatch."""
        self._wake = float("inf")
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
                awaited = expected - step.tokens.keys() - step.forfeited
                if not step.tokens or not self._past_deadline(step, awaited, now):
                    break
                self._release(self._pending.pop(seq), now, out, expected)
            elif step.tokens:
                self._release(self._pending.pop(seq), now, out, expected)
            else:
                del self._pending[seq]
                out.skipped += 1
            self.next_seq, self._head_since = seq + 1, now
        self._dispatch(now, out)

    def _past_deadline(self, step: PendingStep, awaited: set[int], now: float) -> bool:
        """Whether a train step with its quorum may go without ``awaited``; else note when."""
        deadline = self.deadline
        phase = step.spec[0] if step.spec is not None else None
        if deadline is None or step.quorum_at is None or phase != "train":
            return False
        due = step.quorum_at + deadline.allowance(awaited)
        if now >= due:
            return True
        self._wake = due
        return False

    def next_deadline(self) -> float:
        """When the head step's deadline passes (``time.monotonic()``; inf: none pending)."""
        return self._wake

    def release_due(self, now: float) -> Outcome:
        """Release what a passed deadline allows (the service calls it at ``next_deadline``)."""
        out = Outcome()
        self._advance(now, out)
        return out

    def _release(
        self, step: PendingStep, now: float, out: Outcome, expected: frozenset[int] | set[int]
    ) -> None:
        tokens = step.tokens
        phase, shape, _ = step.spec  # type: ignore[misc]  # set with the first token
        if self.deadline is not None and phase == "train":
            self.deadline.observe(step.first_arrival, step.quorum_at, now, expected, tokens)
        if len(tokens) == self.n_experts:  # everyone took part: ids 0..n-1
            present = self._all_present
            joined = [tokens[i] for i in range(self.n_experts)]
        else:
            present = tuple(i in tokens for i in range(self.n_experts))
            joined = [tokens[i] for i in sorted(tokens)]
        holders, tensors, rows = zip(*joined, strict=True)
        if not any(rows):  # the usual case: every expert holds every row
            rows = ()
        released = ReleasedStep(step.seq, phase, shape, present, tensors, holders,
                                step.first_arrival, rows)  # fmt: skip
        if rows and not batch_fits(self.n_experts, len(tensors), rows):
            out.notes.append(f"step {step.seq}: its row bitmaps do not fit one BATCH header")
            self._drop_step(released, "oversize", out)
            return
        self._ready.append(released)
        out.join_waits.append(now - step.first_arrival)

    def _dispatch(self, now: float, out: Outcome) -> None:
        reducer = self.peers.reducer
        while reducer is not None and self._ready:
            step = self._ready.popleft()
            batch = Batch(step.seq, step.phase, step.present, step.tensors, step.rows)
            out.sends.append(Send(REDUCER, reducer.routing_id, batch))
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
