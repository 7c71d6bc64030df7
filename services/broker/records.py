"""Records the broker's bookkeeping keeps and returns: what to send, and per-peer/per-step state."""

from __future__ import annotations

from dataclasses import dataclass, field

from traci_ml.proto import Message, Tensor

EXPERT = "expert"  # the two sockets, as named in Send.socket
REDUCER = "reducer"


@dataclass(frozen=True, slots=True)
class Send:
    """One message for the server to encode and send to ``routing_id`` on ``socket``."""

    socket: str
    routing_id: bytes
    message: Message


@dataclass(slots=True)
class Outcome:
    """What one call decided: messages to send, and facts for metrics and logs."""

    sends: list[Send] = field(default_factory=list)
    rejected: str | None = None  # a metrics.BROKER_REASONS label when the input was refused
    detail: str = ""  # why, for the log line
    join_waits: list[float] = field(default_factory=list)  # one per released step
    queue_latencies: list[float] = field(default_factory=list)  # one per dispatched step
    skipped: int = 0
    dropped: list[str] = field(default_factory=list)  # one DROP_REASONS label per dropped step
    notes: list[str] = field(default_factory=list)  # state changes worth an INFO line
    done: bool = False  # the reducer said GOODBYE("done")

    def reject(self, reason: str, detail: str) -> Outcome:
        self.rejected, self.detail = reason, detail
        return self


@dataclass(frozen=True, slots=True)
class Holder:
    """Who sent a token: enough to route its reply, and only to that very registration."""

    expert_id: int
    routing_id: bytes
    generation: int


@dataclass(slots=True)
class ExpertPeer:
    expert_id: int
    routing_id: bytes
    generation: int  # bumps on every accepted HELLO, so replies never reach a newer holder
    join_seq: int  # first step this registration is expected in
    last_seen: float
    live: bool = True
    in_flight: set[int] = field(default_factory=set)  # accepted, not yet answered (<= window)


@dataclass(slots=True)
class ReducerPeer:
    routing_id: bytes
    last_seen: float


@dataclass(slots=True)
class PendingStep:
    seq: int
    opened: float  # first EMB (or forfeit) for this seq
    spec: tuple[str, tuple[int, ...], str] | None = None  # (phase, shape, dtype) of first EMB
    first_arrival: float = 0.0
    tokens: dict[int, tuple[Holder, Tensor]] = field(default_factory=dict)
    forfeited: set[int] = field(default_factory=set)  # told DROP: will not send this seq


@dataclass(frozen=True, slots=True)
class ReleasedStep:
    """A released step: in the ready queue, then dispatched until the reducer answers."""

    seq: int
    phase: str
    shape: tuple[int, ...]
    present: tuple[bool, ...]
    tensors: tuple[Tensor, ...]  # one per present expert, ascending id
    holders: tuple[Holder, ...]  # same order as tensors
    first_arrival: float
