"""Records the broker's bookkeeping keeps and returns: what to send, and per-peer/per-step state."""

from __future__ import annotations

from dataclasses import dataclass, field

from traci_ml.proto import MAX_HEADER_BYTES, Message, Tensor

EXPERT = "expert"  # the two sockets, as named in Send.socket
REDUCER = "reducer"


# Send, Outcome and ReleasedStep are made for every message or step: plain (not frozen)
# slotted classes, whose constructors are a few stores, keep that cheap.


@dataclass(slots=True)
class Send:
    """One message for the service to encode and send to ``routing_id`` on ``socket``."""

    socket: str
    routing_id: bytes
    message: Message


class Outcome:
    """What one call decided: messages to send, and facts for metrics and logs."""

    __slots__ = ("sends", "rejected", "detail", "join_waits", "queue_latencies", "skipped",
                 "dropped", "notes", "done")  # fmt: skip

    def __init__(self) -> None:
        self.sends: list[Send] = []
        self.rejected: str | None = None  # a metrics.BROKER_REASONS label: input refused
        self.detail = ""  # why, for the log line
        self.join_waits: list[float] = []  # one per released step
        self.queue_latencies: list[float] = []  # one per dispatched step
        self.skipped = 0
        self.dropped: list[str] = []  # one metrics.DROPPED_REASONS label per dropped step
        self.notes: list[str] = []  # state changes worth an INFO line
        self.done = False  # the reducer said GOODBYE("done")

    def reject(self, reason: str, detail: str) -> Outcome:
        self.rejected, self.detail = reason, detail
        return self


def batch_fits(n_experts: int, n_tensors: int, rows: tuple[bytes, ...]) -> bool:
    """Whether a BATCH or QBATCH with these row bitmaps stays within the header limit (an
    upper bound of its header: the present list, a spec per tensor, each bitmap). Bitmaps
    travel in the header: ``B x present experts / 8`` bytes."""
    size = 96 + n_experts + 32 * n_tensors + sum(len(bits) + 5 for bits in rows)
    return size <= MAX_HEADER_BYTES


NOTHING = Outcome()  # shared by calls that decide nothing: read-only (tuples, not lists)
NOTHING.sends = NOTHING.join_waits = NOTHING.queue_latencies = ()  # type: ignore[assignment]
NOTHING.dropped = NOTHING.notes = ()  # type: ignore[assignment]


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
    token: str = ""  # this registration's secret (its WELCOME's): a rejoin that shows it wins
    key: str | None = None  # CURVE: the role of the key it registered with
    holder: Holder = field(init=False)  # this registration, as its tokens record it

    def __post_init__(self) -> None:
        self.holder = Holder(self.expert_id, self.routing_id, self.generation)


@dataclass(slots=True)
class ReducerPeer:
    routing_id: bytes
    last_seen: float
    token: str = ""
    key: str | None = None


@dataclass(slots=True)
class PendingStep:
    seq: int
    opened: float  # first EMB (or forfeit) for this seq
    spec: tuple[str, tuple[int, ...], str] | None = None  # (phase, shape, dtype) of first EMB
    first_arrival: float = 0.0
    # by expert id: who sent it, the embedding, and its row bitmap (b"": every row)
    tokens: dict[int, tuple[Holder, Tensor, bytes]] = field(default_factory=dict)
    forfeited: set[int] = field(default_factory=set)  # told DROP: will not send this seq
    quorum_at: float | None = None  # when join.quorum tokens were in: the deadline's base


@dataclass(slots=True)
class ReleasedStep:
    """A released step: in the ready queue, then dispatched until the reducer answers."""

    seq: int
    phase: str
    shape: tuple[int, ...]
    present: tuple[bool, ...]
    tensors: tuple[Tensor, ...]  # one per present expert, ascending id
    holders: tuple[Holder, ...]  # same order as tensors
    first_arrival: float
    rows: tuple[bytes, ...] = ()  # BATCH.rows: a bitmap per present expert, () if all full
