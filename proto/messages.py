"""TRACI wire protocol, version 1: the messages, one typed frozen class per kind.

``Tensor`` is a tensor on the wire (dtype, shape, and the frame that holds its bytes); each
message class names its ``KIND`` and its header schema ``FIELDS``. Encoding, decoding and
every check live in ``wire.py``; ``KINDS`` maps a kind to its class for ``decode``.

This module imports neither torch nor zmq: the broker holds no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from traci_ml.core.errors import ProtocolError
from traci_ml.proto import codec

# dtype name -> (itemsize, numpy dtype or None where numpy has none)
DTYPES: dict[str, tuple[int, Any]] = {
    "float32": (4, np.dtype("<f4")),
    "float16": (2, np.dtype("<f2")),
    "bfloat16": (2, None),
}
# The compressed dtypes (docs/compression.md): dtype -> bytes of side data per row (its
# scale), stored before the values, one byte each. Their logical shape is the tensor's
# ([B, d]), so joins and shape checks are those of the floats; ``frame_nbytes`` sizes the frame.
ROW_SCALED: dict[str, int] = {"int8": 4}  # int8: a float32 scale per row (codec.py)
# What an embedding or a gradient may travel as (``expert.dtype``): the floats, or compressed.
WIRE_DTYPES: dict[str, tuple[int, Any]] = {**DTYPES, "int8": (1, None)}
# Raw (non-float) dtypes, accepted only in ALIGN tensors (ids, hashed ids, ciphertexts): never
# value-checked, never an embedding. dtype name -> (itemsize, numpy dtype).
BLOB_DTYPES: dict[str, tuple[int, Any]] = {
    "int64": (8, np.dtype("<i8")),
    "uint8": (1, np.dtype("u1")),
}
ALL_DTYPES: dict[str, tuple[int, Any]] = {**WIRE_DTYPES, **BLOB_DTYPES}

FrameLike = Any  # bytes, bytearray, memoryview, or a zmq.Frame (which has .buffer)


def frame_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """The bytes of the frame of a ``dtype`` tensor of (logical) ``shape``: the one size rule
    of ``Tensor.nbytes`` and both decoders. A plain dtype: ``prod(shape) * itemsize``; a
    compressed one (``ROW_SCALED``): its rows' side data first (a row is the last axis: there
    are ``prod(shape[:-1])`` rows), then one byte per value. ``dtype`` must be known."""
    count = math.prod(shape)
    side = ROW_SCALED.get(dtype)
    if side is None:
        return count * ALL_DTYPES[dtype][0]
    return side * math.prod(shape[:-1]) + count


@dataclass(frozen=True, slots=True)
class Tensor:
    """A tensor on the wire: dtype name, shape, and the frame that holds its bytes.

    ``data`` is kept as received (``bytes`` or a ``zmq.Frame``) so it can be forwarded
    without a copy; ``buffer`` is a memoryview over the same memory.
    """

    dtype: str
    shape: tuple[int, ...]
    data: FrameLike

    @property
    def buffer(self) -> memoryview:
        return _buffer(self.data)

    @property
    def nbytes(self) -> int:
        return frame_nbytes(self.dtype, self.shape)

    def numpy(self) -> np.ndarray:
        """A read-only numpy view (no copy). bfloat16 comes back as raw uint16; a compressed
        dtype (int8) as its dequantized float32 values (a new array)."""
        if self.dtype in ROW_SCALED:
            return codec.dequantize(self.buffer, self.shape)
        np_dtype = ALL_DTYPES[self.dtype][1] or np.dtype("<u2")
        return np.frombuffer(self.buffer, dtype=np_dtype).reshape(self.shape)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Tensor:
        """A tensor over ``array``'s memory (made C-contiguous first). The blob dtypes
        (int64, uint8) come out too, but only ALIGN may carry them (decode's ``dtype``)."""
        for name, (_, np_dtype) in ALL_DTYPES.items():
            if np_dtype is not None and array.dtype == np_dtype:
                array = np.ascontiguousarray(array)
                raw = array.reshape(-1).view(np.uint8)  # 1-D bytes, also for empty arrays
                return cls(name, tuple(int(s) for s in array.shape), memoryview(raw))
        raise ProtocolError("dtype", f"numpy dtype {array.dtype} has no wire dtype")


def _buffer(data: FrameLike) -> memoryview:
    buf = getattr(data, "buffer", None)  # zmq.Frame
    view = buf if buf is not None else memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


# --------------------------------------------------------------------------------------
# Messages. One typed class per kind; ``FIELDS`` is the header schema checked by decode.
# ``OPTIONAL`` (some kinds): fields added later (issue 10), left out of the header while
# empty (b"" or ()), so a message without them is byte for byte what it was before.
# --------------------------------------------------------------------------------------


# Model selection's decision as it travels (docs/protocol.md "Model selection"): the last
# validation round the reducer decided on, the best round so far, the round training stopped
# after; -1 for none, and left out of the header while -1.
SELECTION: dict[str, type] = {"decided": int, "best": int, "stopped": int}


@dataclass(frozen=True, slots=True)
class Hello:
    """Peer -> broker: register. Experts give ``expert_id``; the reducer gives ``n_experts``."""

    KIND: ClassVar[str] = "HELLO"
    FIELDS: ClassVar[dict[str, type]] = {
        "role": str,
        "run_id": str,
        "expert_id": int,
        "n_experts": int,
        "embed_dim": int,
        "dtype": str,
        "window": int,
        "next_seq": int,
        "token": str,
    }
    role: str
    run_id: str
    embed_dim: int
    dtype: str
    expert_id: int = -1  # -1 for the reducer
    n_experts: int = 0
    window: int = 1
    next_seq: int = 0  # the peer's own position; a restarted broker resumes at the highest
    # The secret of the peer's last registration (its WELCOME's ``token``), "" for none: a
    # reconnecting peer proves it is the holder of a still-live registration with it.
    token: str = ""
    # The reducer's: its model selection decision (``SELECTION``), for a restarted broker
    OPTIONAL: ClassVar[dict[str, type]] = SELECTION
    decided: int = -1
    best: int = -1
    stopped: int = -1


@dataclass(frozen=True, slots=True)
class Welcome:
    """Broker -> peer: accepted (``ok``) with the step to start at, or refused with a reason.

    Sent unsolicited to a registered expert it means *resync*: drop every step in flight
    (count them dropped) and continue at ``start_seq``."""

    KIND: ClassVar[str] = "WELCOME"
    FIELDS: ClassVar[dict[str, type]] = {
        "ok": bool,
        "reason": str,
        "start_seq": int,
        "token": str,
    }
    ok: bool
    reason: str = ""
    start_seq: int = 0
    token: str = ""  # this registration's secret, for the peer's next HELLO (never logged)


# A refusal that passes: the id is held by a registration that has not yet timed out. The
# peer says HELLO again until it is let in (at most ``network.liveness`` later).
HELD = "held"


@dataclass(frozen=True, slots=True)
class Emb:
    """Expert -> broker: the target embedding ``[B, d]`` of step ``seq``. ``rows``: which
    of the B rows the expert holds (a row bitmap, ``rows.pack_rows``; b"": all of them)."""

    KIND: ClassVar[str] = "EMB"
    FIELDS: ClassVar[dict[str, type]] = {"seq": int, "expert_id": int, "phase": str}
    OPTIONAL: ClassVar[dict[str, type]] = {"rows": bytes}
    seq: int
    expert_id: int
    phase: str
    tensor: Tensor
    rows: bytes = b""


@dataclass(frozen=True, slots=True)
class Batch:
    """Broker -> reducer: one joined step. ``tensors`` holds one ``[B, d]`` per present
    expert, in ascending expert id; ``present[i]`` says whether expert ``i`` took part.
    ``rows``: one row bitmap per present expert, same order as ``tensors`` (b"": that expert
    holds every row); () when every present expert holds every row."""

    KIND: ClassVar[str] = "BATCH"
    FIELDS: ClassVar[dict[str, type]] = {"seq": int, "phase": str, "present": list}
    OPTIONAL: ClassVar[dict[str, type]] = {"rows": list}
    seq: int
    phase: str
    present: tuple[bool, ...]
    tensors: tuple[Tensor, ...]
    rows: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Grad:
    """Reducer -> broker: dL/dtoken for every present expert of ``seq`` (same order as the
    BATCH, ``expert_id`` = -1). Broker -> expert: one slice, ``expert_id`` = its id."""

    KIND: ClassVar[str] = "GRAD"
    FIELDS: ClassVar[dict[str, type]] = {"seq": int, "expert_id": int}
    seq: int
    expert_id: int
    tensors: tuple[Tensor, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """Reducer -> broker -> experts: step ``seq`` (an eval step) is done; no gradient. With
    model selection it carries the reducer's decision (``SELECTION``)."""

    KIND: ClassVar[str] = "ACK"
    FIELDS: ClassVar[dict[str, type]] = {"seq": int}
    OPTIONAL: ClassVar[dict[str, type]] = SELECTION
    seq: int
    decided: int = -1
    best: int = -1
    stopped: int = -1


@dataclass(frozen=True, slots=True)
class Drop:
    """Broker -> expert: step ``seq`` will never get a reply (late, or lost); count it."""

    KIND: ClassVar[str] = "DROP"
    FIELDS: ClassVar[dict[str, type]] = {"seq": int, "reason": str}
    # ``frontier`` (reason late only): the first step no expert has sent yet, so a late
    # expert can skip ahead to where the others are (-1: not given)
    OPTIONAL: ClassVar[dict[str, type]] = {"frontier": int}
    seq: int
    reason: str
    frontier: int = -1


# What ``values.value_problem`` can say of well-formed tensors (non_finite is decode's reason too).
VALUE_REASONS = ("non_finite", "too_large")
# What a DROP says (``Drop.reason``; docs/protocol.md). From the broker, which gave the step up
# or refused the expert's EMB of it (an EMB refused as malformed, or before the start gate, is
# answered with its rejection reason instead: one of wire.REJECT_REASONS, or "not_started"):
BROKER_DROP_REASONS = (
    "late",
    "too_far_ahead",
    "conflict",
    "window",
    "reducer_lost",
    "grad_mismatch",
    "timeout",
    *VALUE_REASONS,  # the expert's EMB held NaN/Inf or a value beyond the bound
    "grad_rejected",  # the reducer's GRAD did
    "oversize",  # the step's row bitmaps would not fit one BATCH header
)
# From the reducer, which refused a BATCH (for its values) or would not train on it; the
# broker forwards it to the step's experts as it is.
REDUCER_DROP_REASONS = (
    *VALUE_REASONS,
    "non_finite_loss",
    "non_finite_grad",
    "no_rows",  # a parties run: no expert holds any row of this train step
)
# Every reason a DROP can carry on the wire, each once.
DROP_REASONS = tuple(dict.fromkeys((*BROKER_DROP_REASONS, *REDUCER_DROP_REASONS)))


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Either way: still here. The broker's to an expert carries the latest model selection
    decision it has seen from the reducer (``SELECTION``), so an expert that missed it (a
    restart) learns it within one heartbeat interval."""

    KIND: ClassVar[str] = "HEARTBEAT"
    FIELDS: ClassVar[dict[str, type]] = {}
    OPTIONAL: ClassVar[dict[str, type]] = SELECTION
    decided: int = -1
    best: int = -1
    stopped: int = -1


@dataclass(frozen=True, slots=True)
class Goodbye:
    """Either way: the sender is leaving (``reason``: "done", "shutdown", ...)."""

    KIND: ClassVar[str] = "GOODBYE"
    FIELDS: ClassVar[dict[str, type]] = {"reason": str}
    reason: str = ""


# ---- served prediction (docs/serving.md): a client's QUERY at the broker's front door is
# fanned out to the experts (QUERY), joined (QEMB -> QBATCH), answered by the reducer (QOUT)
# and split back per request (REPLY). ``status`` is SERVE_OK or names the cause of an error.

SERVE_OK = "ok"


@dataclass(frozen=True, slots=True)
class Query:
    """Client -> broker: predict raw (unstandardised) feature rows ``[R, F]`` float32 whose
    columns ``columns`` names; ``qid`` is the client's, echoed in its REPLY. Broker ->
    expert: one (batched) query under the broker's ``qid``; the expert picks its view's
    columns by name.

    Or by id: ``ids`` lists R row ids (all int or all str, unique), ``columns`` is () and
    there is no tensor: each expert looks the rows up in its own table.

    ``attention`` (client -> broker, optional, issue 14): the client wants each row's
    attention per expert in its REPLY (a second tensor); never sent on to the experts."""

    KIND: ClassVar[str] = "QUERY"
    FIELDS: ClassVar[dict[str, type]] = {"qid": int, "columns": list}
    OPTIONAL: ClassVar[dict[str, type]] = {"ids": list, "attention": bool}
    qid: int
    columns: tuple[str, ...]
    tensors: tuple[Tensor, ...] = ()  # one [R, F] float32; none for a query by id
    ids: tuple[int, ...] | tuple[str, ...] = ()
    attention: bool = False


@dataclass(frozen=True, slots=True)
class QEmb:
    """Expert -> broker: the target embedding ``[R, d]`` of query ``qid`` (status "ok") and
    the row bitmap of the rows it holds (b"": all), or no tensor, the cause (e.g.
    "missing_columns") and a detail. ``compute_us`` (optional): microseconds the expert
    spent on the query, from decoding it to sending this (the broker's per-hop latency)."""

    KIND: ClassVar[str] = "QEMB"
    FIELDS: ClassVar[dict[str, type]] = {"qid": int, "expert_id": int, "status": str,
                                         "detail": str}  # fmt: skip
    OPTIONAL: ClassVar[dict[str, type]] = {"rows": bytes, "compute_us": int}  # rows: ok only
    qid: int
    expert_id: int
    status: str
    detail: str
    tensors: tuple[Tensor, ...]
    rows: bytes = b""
    compute_us: int = -1


@dataclass(frozen=True, slots=True)
class QBatch:
    """Broker -> reducer: query ``qid`` joined, one ``[R, d]`` per present expert in
    ascending id (``present[i]``: expert ``i`` took part) and ``rows`` as in BATCH.
    ``attention``: some request of the batch asked for attention: the QOUT carries it."""

    KIND: ClassVar[str] = "QBATCH"
    FIELDS: ClassVar[dict[str, type]] = {"qid": int, "present": list}
    OPTIONAL: ClassVar[dict[str, type]] = {"rows": list, "attention": bool}
    qid: int
    present: tuple[bool, ...]
    tensors: tuple[Tensor, ...]
    rows: tuple[bytes, ...] = ()
    attention: bool = False


@dataclass(frozen=True, slots=True)
class QOut:
    """Reducer -> broker: the outputs ``[R, C]`` float32 of query ``qid``: class
    probabilities (task "classification", ``classes`` their names) or values in the label's
    units (``[R, 1]``, task "regression"); or no tensor, the cause and a detail. When the
    QBATCH asked for ``attention``, a second tensor ``[R, 1 + P]`` float32: per row the
    [CLS] query's attention weight on [CLS] itself, then on each of the P present experts in
    QBATCH order: the reducer's last block's softmax weights of the [CLS] query, averaged
    over heads (a row sums to 1; an expert masked for a row weighs 0 there).
    ``compute_us`` (optional): microseconds the reducer spent on the QBATCH."""

    KIND: ClassVar[str] = "QOUT"
    FIELDS: ClassVar[dict[str, type]] = {"qid": int, "status": str, "detail": str,
                                         "task": str, "classes": list}  # fmt: skip
    OPTIONAL: ClassVar[dict[str, type]] = {"compute_us": int}
    qid: int
    status: str
    detail: str
    task: str
    classes: tuple[str, ...]
    tensors: tuple[Tensor, ...]
    compute_us: int = -1


@dataclass(frozen=True, slots=True)
class Reply:
    """Broker -> client: the answer to the client's QUERY ``qid`` (-1: a request too broken
    to have one): its rows' outputs as in QOUT, the experts that took part (ids and names),
    and ``batch_rows``, the rows of the batched query it travelled in; or no tensor, the
    cause and a detail. ``rows``: one row bitmap per entry of ``experts`` over this
    request's R rows, the rows that expert took part in (b"": all); () when every listed
    expert took part in every row. A request that asked for ``attention`` gets a second
    tensor ``[R, 1 + len(experts)]`` float32: [CLS]'s own weight, then one column per entry
    of ``experts`` (see QOUT); a request that did not gets exactly what it got before.
    ``hops`` (optional, status ok): the request's time in the broker, microseconds per
    entry of ``SERVE_HOPS``, in that order (docs/serving.md "Where the time goes")."""

    KIND: ClassVar[str] = "REPLY"
    FIELDS: ClassVar[dict[str, type]] = {"qid": int, "status": str, "detail": str,
                                         "task": str, "classes": list, "experts": list,
                                         "expert_names": list, "batch_rows": int}  # fmt: skip
    OPTIONAL: ClassVar[dict[str, type]] = {"rows": list, "hops": list}
    qid: int
    status: str
    detail: str = ""
    task: str = ""
    classes: tuple[str, ...] = ()
    experts: tuple[int, ...] = ()
    expert_names: tuple[str, ...] = ()
    batch_rows: int = 0
    tensors: tuple[Tensor, ...] = ()
    rows: tuple[bytes, ...] = ()
    hops: tuple[int, ...] = ()


SERVE_KINDS = (Query, QEmb, QBatch, QOut, Reply)
# One served request's time in the broker, split where it changes hands (REPLY.hops, and
# traci_broker_serve_hop_seconds{hop}): waiting to travel (the batching window, a free
# in-flight slot), the experts' round trip (the slowest one's) and, within it, that expert's
# own compute, the reducer's round trip and its compute, and the broker's split of the
# answer into this reply. What the client sees beyond their sum is the client <-> front
# door wire (and the client's own encode/decode).
SERVE_HOPS = ("queue", "experts", "expert_compute", "reducer", "reducer_compute", "reply")


# ---- id alignment at start-up (docs/parties.md, docs/protocol.md "Alignment"): an expert
# and the reducer (the label holder) exchange ALIGN messages, relayed by the broker, which
# never looks inside them. ``stage`` says what a message is:
ALIGN_EXPERT_STAGES = ("plain", "psi", "held")  # expert -> reducer
ALIGN_REDUCER_STAGES = ("answer", "error")  # reducer -> expert
ALIGN_WAIT = "wait"  # broker -> expert: no reducer is registered yet, ask again later
ALIGN_STAGES = (*ALIGN_EXPERT_STAGES, *ALIGN_REDUCER_STAGES, ALIGN_WAIT)


@dataclass(frozen=True, slots=True)
class Align:
    """Id alignment at start-up (docs/parties.md): expert <-> reducer, relayed by the broker.

    ``expert_id`` is the expert's (also on the reducer's messages: whom it is for);
    ``counts`` up to 16 small integers (sizes, rounds; -1 for none); ``tensors`` up to 4
    raw tensors of any wire dtype or of the blob dtypes int64/uint8 (ids, hashes,
    ciphertexts), which are never value-checked."""

    KIND: ClassVar[str] = "ALIGN"
    FIELDS: ClassVar[dict[str, type]] = {"expert_id": int, "stage": str, "detail": str,
                                         "counts": list}  # fmt: skip
    expert_id: int
    stage: str
    detail: str = ""
    counts: tuple[int, ...] = ()
    tensors: tuple[Tensor, ...] = ()


Message = (
    Hello | Welcome | Emb | Batch | Grad | Ack | Drop | Heartbeat | Goodbye
    | Query | QEmb | QBatch | QOut | Reply | Align
)  # fmt: skip
TRAINING_KINDS = (Hello, Welcome, Emb, Batch, Grad, Ack, Drop, Heartbeat, Goodbye)
KINDS: dict[str, type] = {cls.KIND: cls for cls in (*TRAINING_KINDS, *SERVE_KINDS, Align)}
