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

from traci_ml.errors import ProtocolError

# dtype name -> (itemsize, numpy dtype or None where numpy has none)
DTYPES: dict[str, tuple[int, Any]] = {
    "float32": (4, np.dtype("<f4")),
    "float16": (2, np.dtype("<f2")),
    "bfloat16": (2, None),
}

FrameLike = Any  # bytes, bytearray, memoryview, or a zmq.Frame (which has .buffer)


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
        return math.prod(self.shape) * DTYPES[self.dtype][0]

    def numpy(self) -> np.ndarray:
        """A read-only numpy view (no copy). bfloat16 comes back as raw uint16."""
        np_dtype = DTYPES[self.dtype][1] or np.dtype("<u2")
        return np.frombuffer(self.buffer, dtype=np_dtype).reshape(self.shape)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> Tensor:
        for name, (_, np_dtype) in DTYPES.items():
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
# --------------------------------------------------------------------------------------


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
    """Expert -> broker: the target embedding ``[B, d]`` of step ``seq``."""

    KIND: ClassVar[str] = "EMB"
    FIELDS: ClassVar[dict[str, type]] = {"seq": int, "expert_id": int, "phase": str}
    seq: int
    expert_id: int
    phase: str
    tensor: Tensor


@dataclass(frozen=True, slots=True)
class Batch:
    """Broker -> reducer: one joined step. ``tensors`` holds one ``[B, d]`` per present
    expert, in ascending expert id; ``present[i]`` says whether expert ``i`` took part."""

    KIND: ClassVar[str] = "BATCH"
    FIELDS: ClassVar[dict[str, type]] = {"seq": int, "phase": str, "present": list}
    seq: int
    phase: str
    present: tuple[bool, ...]
    tensors: tuple[Tensor, ...]


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
    """Reducer -> broker -> experts: step ``seq`` (an eval step) is done; no gradient."""

    KIND: ClassVar[str] = "ACK"
    FIELDS: ClassVar[dict[str, type]] = {"seq": int}
    seq: int


@dataclass(frozen=True, slots=True)
class Drop:
    """Broker -> expert: step ``seq`` will never get a reply (late, or lost); count it."""

    KIND: ClassVar[str] = "DROP"
    FIELDS: ClassVar[dict[str, type]] = {"seq": int, "reason": str}
    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    KIND: ClassVar[str] = "HEARTBEAT"
    FIELDS: ClassVar[dict[str, type]] = {}


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
    columns by name."""

    KIND: ClassVar[str] = "QUERY"
    FIELDS: ClassVar[dict[str, type]] = {"qid": int, "columns": list}
    qid: int
    columns: tuple[str, ...]
    tensors: tuple[Tensor, ...]  # one [R, F] float32


@dataclass(frozen=True, slots=True)
class QEmb:
    """Expert -> broker: the target embedding ``[R, d]`` of query ``qid`` (status "ok"), or
    no tensor, the cause (e.g. "missing_columns") and a detail."""

    KIND: ClassVar[str] = "QEMB"
    FIELDS: ClassVar[dict[str, type]] = {"qid": int, "expert_id": int, "status": str,
                                         "detail": str}  # fmt: skip
    qid: int
    expert_id: int
    status: str
    detail: str
    tensors: tuple[Tensor, ...]


@dataclass(frozen=True, slots=True)
class QBatch:
    """Broker -> reducer: query ``qid`` joined, one ``[R, d]`` per present expert in
    ascending id (``present[i]``: expert ``i`` took part), as in BATCH."""

    KIND: ClassVar[str] = "QBATCH"
    FIELDS: ClassVar[dict[str, type]] = {"qid": int, "present": list}
    qid: int
    present: tuple[bool, ...]
    tensors: tuple[Tensor, ...]


@dataclass(frozen=True, slots=True)
class QOut:
    """Reducer -> broker: the outputs ``[R, C]`` float32 of query ``qid``: class
    probabilities (task "classification", ``classes`` their names) or values in the label's
    units (``[R, 1]``, task "regression"); or no tensor, the cause and a detail."""

    KIND: ClassVar[str] = "QOUT"
    FIELDS: ClassVar[dict[str, type]] = {"qid": int, "status": str, "detail": str,
                                         "task": str, "classes": list}  # fmt: skip
    qid: int
    status: str
    detail: str
    task: str
    classes: tuple[str, ...]
    tensors: tuple[Tensor, ...]


@dataclass(frozen=True, slots=True)
class Reply:
    """Broker -> client: the answer to the client's QUERY ``qid`` (-1: a request too broken
    to have one): its rows' outputs as in QOUT, the experts that took part (ids and names),
    and ``batch_rows``, the rows of the batched query it travelled in; or no tensor, the
    cause and a detail."""

    KIND: ClassVar[str] = "REPLY"
    FIELDS: ClassVar[dict[str, type]] = {"qid": int, "status": str, "detail": str,
                                         "task": str, "classes": list, "experts": list,
                                         "expert_names": list, "batch_rows": int}  # fmt: skip
    qid: int
    status: str
    detail: str = ""
    task: str = ""
    classes: tuple[str, ...] = ()
    experts: tuple[int, ...] = ()
    expert_names: tuple[str, ...] = ()
    batch_rows: int = 0
    tensors: tuple[Tensor, ...] = ()


SERVE_KINDS = (Query, QEmb, QBatch, QOut, Reply)
Message = (
    Hello | Welcome | Emb | Batch | Grad | Ack | Drop | Heartbeat | Goodbye
    | Query | QEmb | QBatch | QOut | Reply
)  # fmt: skip
KINDS: dict[str, type] = {
    cls.KIND: cls
    for cls in (Hello, Welcome, Emb, Batch, Grad, Ack, Drop, Heartbeat, Goodbye, *SERVE_KINDS)
}
