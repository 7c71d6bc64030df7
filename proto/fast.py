"""Fast paths of ``wire.decode`` and ``wire.encode`` for the kinds on the hot path.

``wire`` is the reference: it checks everything and names the reason of every rejection.
The functions here accept only messages that ``wire.decode`` would accept *and* that have
the exact shape the services send (EMB, BATCH, GRAD, ACK, HEARTBEAT with no extra or
missing field, every tensor ``[B, d]``), and build the very same message. Anything else --
any doubt at all -- goes to ``wire.decode``, which then accepts it or raises the precise
``ProtocolError``. So the two can never disagree on a verdict or a reason; the tests in
``tests/proto/test_fast.py`` compare them on valid, corrupted and random input.

What makes these cheap: one ``msgpack`` unpack straight from the frame (no copy), type
checks with ``type(x) is int`` instead of ``isinstance`` loops over a schema, the frame
size from ``len`` (``bytes`` and ``zmq.Frame``), the finiteness check as one numpy
reduction over a zero-copy view of the frame (``finite``), and messages built without the
frozen dataclasses' checked ``__init__`` (``_constructor``).

Nothing here restates a message's layout: the header sizes the decoder expects and the
order of the fields it builds come from the classes in ``messages.py`` (``_header_size``,
``_constructor``), and the fields the hand-written paths read and write are checked against
those classes when this module loads (``_fields``), so a field added to a hot kind fails the
import instead of desyncing these paths from ``wire``.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np

from traci_ml.proto import wire
from traci_ml.proto.messages import (
    ROW_SCALED,
    WIRE_DTYPES,
    Ack,
    Batch,
    Emb,
    FrameLike,
    Grad,
    Heartbeat,
    Message,
    Tensor,
    frame_nbytes,
)
from traci_ml.proto.wire import (
    MAX_DIM,
    MAX_EXPERTS,
    MAX_HEADER_BYTES,
    MAX_SEQ,
    MAX_TENSOR_BYTES,
    MAX_TENSORS,
    PHASES,
    VERSION,
)

_unpackb = msgpack.unpackb
_packb = msgpack.packb
_isfinite = np.isfinite
_frombuffer = np.frombuffer
_SIZED = frozenset({bytes, bytearray})  # len() is the byte count; zmq.Frame is added lazily
_F4 = np.dtype("<f4")
_U16 = np.dtype("<u2")
_EXPONENT = {"float16": 0x7C00, "bfloat16": 0x7F80}  # all ones: Inf or NaN
_HEARTBEAT = Heartbeat()
# float32 up to this many values: one BLAS dot (OpenBLAS runs sdot on one thread up to 10000
# values); beyond it, isfinite + all, which costs about the same per byte there. np.vdot, unlike
# ndarray.dot, does not turn the FPU's overflow/invalid flags into RuntimeWarnings.
_DOT_MAX = 8192
_vdot = np.vdot
_all = np.logical_and.reduce
_max = np.maximum.reduce
_isfinite_scalar = math.isfinite
_new = object.__new__


# ---- the layouts the hand-written paths rely on, taken from (or checked against) messages.py


def _fields(cls: type, *names: str) -> None:
    """Fail the import unless ``cls``'s header fields (``FIELDS``, then ``OPTIONAL``) are
    ``names``, in this order: the paths below read and write exactly those, by hand."""
    have = (*cls.FIELDS, *getattr(cls, "OPTIONAL", {}))
    if have != names:
        raise TypeError(f"proto/fast.py reads and writes {cls.KIND} as {names}, but the class "
                        f"has {have}: update its fast paths")  # fmt: skip


def _header_size(cls: type) -> int:
    """Keys of a header of ``cls`` as ``wire.encode`` writes it with tensors and without its
    optional fields: "v", "k", each of ``FIELDS``, and "t" when the class carries tensors."""
    carries = any(f.name in ("tensor", "tensors") for f in dataclasses.fields(cls))
    return 2 + len(cls.FIELDS) + carries


def _setters(cls: type, *names: str) -> tuple[Callable[[Any, Any], None], ...]:
    """The slot setters of frozen slotted dataclass ``cls``, when its fields are ``names`` in
    this order and it has no ``__post_init__`` (else the import fails): for the constructors
    below, which skip the frozen ``__init__``'s ``object.__setattr__`` per field (it costs more
    than the rest of decoding an EMB) and make the very same object."""
    have = tuple(f.name for f in dataclasses.fields(cls))
    if have != names or hasattr(cls, "__post_init__"):
        raise TypeError(f"proto/fast.py builds {cls.__name__} from {names}, but its fields "
                        f"are {have}: update its constructor")  # fmt: skip
    return tuple(getattr(cls, name).__set__ for name in names)


_fields(Emb, "seq", "expert_id", "phase", "rows")
_fields(Batch, "seq", "phase", "present", "rows")
_fields(Grad, "seq", "expert_id")
_fields(Ack, "seq", "decided", "best", "stopped")
_fields(Heartbeat, "decided", "best", "stopped")
_EMB_SIZE, _BATCH_SIZE, _GRAD_SIZE, _ACK_SIZE, _HEARTBEAT_SIZE = map(
    _header_size, (Emb, Batch, Grad, Ack, Heartbeat)
)
_EMB_ROWS_SIZE = _EMB_SIZE + len(Emb.OPTIONAL)  # with its row bitmap
_SET_DTYPE, _SET_SHAPE, _SET_DATA = _setters(Tensor, "dtype", "shape", "data")
_SET_SEQ, _SET_EXPERT, _SET_PHASE, _SET_TENSOR, _SET_ROWS = _setters(
    Emb, "seq", "expert_id", "phase", "tensor", "rows"
)


def _new_tensor(dtype: str, shape: tuple[int, ...], data: FrameLike) -> Tensor:
    """``Tensor(dtype, shape, data)``, built faster (``_setters``)."""
    tensor = _new(Tensor)
    _SET_DTYPE(tensor, dtype)
    _SET_SHAPE(tensor, shape)
    _SET_DATA(tensor, data)
    return tensor


def _new_emb(seq: int, expert_id: int, phase: str, tensor: Tensor, rows: bytes) -> Emb:
    """``Emb(seq, expert_id, phase, tensor, rows)``, built faster (``_setters``)."""
    emb = _new(Emb)
    _SET_SEQ(emb, seq)
    _SET_EXPERT(emb, expert_id)
    _SET_PHASE(emb, phase)
    _SET_TENSOR(emb, tensor)
    _SET_ROWS(emb, rows)
    return emb


def finite(dtype: str, frame: FrameLike) -> bool:
    """True when no element of ``frame`` (raw ``dtype`` values) is NaN or Inf; the same
    verdict as ``wire.is_finite``, from one pass over a zero-copy view of the frame.

    float32: the sum of squares is NaN or Inf if any value is (squares are never negative,
    so nothing cancels), and finite values give a finite sum unless it overflows (|x| above
    about 1e19): a finite sum proves every value finite; otherwise the exact check decides.
    One BLAS dot reads the frame once and allocates nothing. float16 and bfloat16: no
    element has its exponent bits all ones."""
    if dtype == "float32":
        values = _frombuffer(frame, _F4)
        if values.size <= _DOT_MAX and _isfinite_scalar(_vdot(values, values)):
            return True
        return bool(_all(_isfinite(values)))
    mask = _EXPONENT[dtype]
    bits = _frombuffer(frame, _U16)
    return not bits.size or int(_max(bits & mask)) != mask


_FLT_MAX = float(np.finfo(np.float32).max)


def _scales_ok(frame: FrameLike, rows: int) -> bool:
    """Every row scale of an int8 frame is finite and >= 0 (NaN fails both comparisons)."""
    scales = _frombuffer(frame, _F4, count=rows)
    return float(np.min(scales)) >= 0.0 and float(np.max(scales)) <= _FLT_MAX


def _tensor(spec: Any, frame: FrameLike, check_finite: bool) -> Tensor | None:
    """The ``[B, d]`` tensor ``spec`` describes, or None if anything is off."""
    if type(spec) is not list or len(spec) != 2:
        return None
    dtype, shape = spec
    if type(dtype) is not str or dtype not in WIRE_DTYPES or type(shape) is not list:
        return None
    if len(shape) != 2:
        return None
    rows, cols = shape
    if type(rows) is not int or type(cols) is not int:
        return None
    if not (0 <= rows <= MAX_DIM and 0 <= cols <= MAX_DIM):
        return None
    size = frame_nbytes(dtype, shape)
    got = len(frame) if type(frame) in _SIZED else memoryview(frame).nbytes
    if size > MAX_TENSOR_BYTES or got != size:
        return None
    if dtype in ROW_SCALED:  # its scales: finite and >= 0, or wire.decode names the reason
        if rows and not _scales_ok(frame, rows):
            return None
    elif check_finite and not finite(dtype, frame):
        return None
    return _new_tensor(dtype, (rows, cols), frame)


def _same_tensors(specs: Any, frames: Sequence[FrameLike], check_finite: bool) -> tuple | None:
    """One ``[B, d]`` tensor per frame, all of one spec; None if anything is off."""
    if type(specs) is not list or len(specs) != len(frames) or not specs:
        return None
    first = _tensor(specs[0], frames[0], check_finite)
    if first is None:
        return None
    tensors = [first]
    for spec, frame in zip(specs[1:], frames[1:], strict=True):
        tensor = _tensor(spec, frame, check_finite)
        if tensor is None or tensor.shape != first.shape or tensor.dtype != first.dtype:
            return None
        tensors.append(tensor)
    return tuple(tensors)


def _seq(header: dict, key: str = "seq") -> int | None:
    value = header.get(key)
    return value if type(value) is int and 0 <= value <= MAX_SEQ else None


def _emb(header: dict, frame: FrameLike, check_finite: bool) -> Emb | None:
    """The EMB ``header`` (version checked) and its tensor ``frame`` describe; None if
    anything is off."""
    size, seq, eid = len(header), header.get("seq"), header.get("expert_id")
    if size == _EMB_SIZE:
        rows = b""
    elif size == _EMB_ROWS_SIZE:  # with its row bitmap (an absent key makes another one missing)
        rows = header.get("rows")
        if type(rows) is not bytes:
            return None
    else:
        return None
    phase, specs = header.get("phase"), header.get("t")
    if type(seq) is not int or type(eid) is not int or not 0 <= seq <= MAX_SEQ:
        return None
    if not -1 <= eid <= MAX_SEQ or type(phase) is not str or phase not in PHASES:
        return None
    if type(specs) is not list or len(specs) != 1:
        return None
    tensor = _tensor(specs[0], frame, check_finite)
    if tensor is None or (rows and not _rows_ok(rows, tensor.shape[0])):
        return None
    return _new_emb(seq, eid, phase, tensor, rows)


def _rows_ok(bits: bytes, n: int) -> bool:
    """``bits`` is the row bitmap of ``n`` rows (``wire.rows_problem`` finds nothing)."""
    tail = n & 7
    return len(bits) == (n + 7) >> 3 and not (tail and bits[-1] >> tail)


def _fast(frames: Sequence[FrameLike], check_finite: bool) -> Message | dict | None:
    """The message; or its unpacked header map (of a version-1 kind without a fast path,
    or a hot kind in another shape) for ``wire.decode_header``; or None: ``wire.decode``."""
    count = len(frames)
    if not 0 < count <= MAX_TENSORS + 1:
        return None
    head = frames[0]
    if (len(head) if type(head) in _SIZED else memoryview(head).nbytes) > MAX_HEADER_BYTES:
        return None
    header = _unpackb(head, raw=False, strict_map_key=True)
    if type(header) is not dict:
        return None
    version = header.get("v")
    if type(version) is not int or version != VERSION:
        return None
    kind = header.get("k")
    if kind == "EMB":  # first: the bulk of the traffic
        return _emb(header, frames[1], check_finite) if count == 2 else None
    size = len(header)
    if kind == "ACK":
        seq = _seq(header)
        return Ack(seq) if size == _ACK_SIZE and count == 1 and seq is not None else None
    if kind == "HEARTBEAT":
        return _HEARTBEAT if size == _HEARTBEAT_SIZE and count == 1 else None
    if kind == "GRAD":
        seq, eid = _seq(header), header.get("expert_id")
        if size != _GRAD_SIZE or seq is None or type(eid) is not int or not -1 <= eid <= MAX_SEQ:
            return None
        tensors = _same_tensors(header.get("t"), frames[1:], check_finite)
        if tensors is None or (eid != -1 and len(tensors) != 1):
            return None
        return Grad(seq, eid, tensors)
    if kind == "BATCH":
        seq, phase, present = _seq(header), header.get("phase"), header.get("present")
        if size != _BATCH_SIZE or seq is None or type(phase) is not str or phase not in PHASES:
            return None
        if type(present) is not list or not 0 < len(present) <= MAX_EXPERTS:
            return None
        n_present = 0
        for flag in present:
            if type(flag) is not bool:
                return None
            n_present += flag
        tensors = _same_tensors(header.get("t"), frames[1:], check_finite)
        if tensors is None or len(tensors) != n_present:
            return None
        return Batch(seq, phase, tuple(present), tensors)
    return header


def quick(frames: Sequence[FrameLike], check_finite: bool = True) -> Message | None:
    """The message, when ``frames`` hold a hot kind (EMB, BATCH, GRAD, ACK, HEARTBEAT) in the
    exact shape the services send it; None for anything else, which ``wire.decode`` then
    accepts or rejects with its reason. Never raises."""
    try:
        msg = _fast(frames, check_finite)
    except Exception:  # e.g. not msgpack
        return None
    return None if type(msg) is dict else msg


def decode(frames: Sequence[FrameLike], *, check_finite: bool = True) -> Message:
    """``wire.decode``, faster for well-formed hot-path messages: same result, same errors."""
    try:
        msg = _fast(frames, check_finite)
    except Exception:  # e.g. not msgpack: wire.decode names the reason
        msg = None
    if msg is None:
        return wire.decode(frames, check_finite=check_finite)
    if type(msg) is dict:  # unpacked once: wire checks the rest
        return wire.decode_header(msg, frames, check_finite)
    return msg


# ---- encode -------------------------------------------------------------------------------
# A header is packed from cached pieces: msgpack packs a map as its length then each key and
# value in turn, so {"v", "k", "seq", *rest} is (map head + "v", "k", "seq" keys and values)
# + seq + (rest). Only seq changes from step to step; the rest is cached by its values,
# checked to have the exact types packb would see (True == 1 and 1.0 == 1 in a dict key).

_FIXINT = [bytes((i,)) for i in range(128)]
_PACK_U8, _PACK_U16, _PACK_U32, _PACK_U64 = (
    struct.Struct(f).pack for f in (">BB", ">BH", ">BI", ">BQ")
)
_PIECES: dict[tuple, tuple[bytes, bytes]] = {}


def _uint(n: int) -> bytes:
    """``msgpack.packb(n)`` for ``0 <= n < 2**64``."""
    if n < 0x80:
        return _FIXINT[n]
    if n < 0x100:
        return _PACK_U8(0xCC, n)
    if n < 0x10000:
        return _PACK_U16(0xCD, n)
    if n < 0x100000000:
        return _PACK_U32(0xCE, n)
    return _PACK_U64(0xCF, n)


def _header(kind: str, seq: int, rest: tuple, tail: tuple = ()) -> bytes:
    """``packb({"v": VERSION, "k": kind, "seq": seq, **dict(rest), **dict(tail)})``; the
    pieces of ``rest`` are cached, those of ``tail`` (values that change, e.g. a row bitmap)
    are packed each time."""
    if type(seq) is not int or not 0 <= seq < 1 << 64:
        return _packb({"v": VERSION, "k": kind, "seq": seq, **dict(rest), **dict(tail)})
    key = (kind, rest, len(tail))
    pieces = _PIECES.get(key)
    if pieces is None:
        if len(_PIECES) >= 4096:
            _PIECES.clear()
        head = bytes((0x80 | (3 + len(rest) + len(tail)),))
        head += b"".join(_packb(x) for x in ("v", VERSION, "k", kind, "seq"))
        pieces = _PIECES[key] = (head, b"".join(_packb(k) + _packb(v) for k, v in rest))
    header = pieces[0] + _uint(seq) + pieces[1]
    for k, v in tail:
        header += _packb(k) + _packb(v, use_bin_type=True)
    return header


def _specs(tensors: tuple[Tensor, ...]) -> tuple | None:
    """The ``t`` field as a (hashable) tuple; None when a dtype or dim has an odd type."""
    first = tensors[0]
    dtype, shape = first.dtype, first.shape
    if type(dtype) is not str or type(shape) is not tuple:
        return None
    for dim in shape:
        if type(dim) is not int:
            return None
    for tensor in tensors:
        if tensor.dtype != dtype or tensor.shape != shape:
            return None  # mixed tensors (wire.decode refuses them): the plain way
    return ((dtype, shape),) * len(tensors)


def _ints(*values: Any) -> bool:
    for value in values:
        if type(value) is not int:
            return False
    return True


def encode(msg: Message) -> list[FrameLike]:
    """``wire.encode`` (byte for byte the same frames), faster for the hot kinds."""
    cls = type(msg)
    if cls is Batch:
        tensors, present, phase = msg.tensors, msg.present, msg.phase
        specs = _specs(tensors) if tensors else ()
        if specs is not None and type(present) is tuple and type(phase) is str and not msg.rows:
            for flag in present:
                if type(flag) is not bool:
                    break
            else:
                rest = (("phase", phase), ("present", present))
                if specs:
                    rest += (("t", specs),)
                return [_header("BATCH", msg.seq, rest), *(t.data for t in tensors)]
    elif cls is Grad:
        tensors = msg.tensors
        specs = _specs(tensors) if tensors else ()
        if specs is not None and _ints(msg.expert_id):
            rest = (("expert_id", msg.expert_id), ("t", specs)) if specs else (
                ("expert_id", msg.expert_id),)  # fmt: skip
            return [_header("GRAD", msg.seq, rest), *(t.data for t in tensors)]
    elif cls is Emb:
        tensor, rows = msg.tensor, msg.rows
        specs = _specs((tensor,))
        if specs is not None and _ints(msg.expert_id) and type(msg.phase) is str:
            if not rows:
                rest = (("expert_id", msg.expert_id), ("phase", msg.phase), ("t", specs))
                return [_header("EMB", msg.seq, rest), tensor.data]
            if type(rows) is bytes:  # the bitmap changes from step to step: not cached
                rest = (("expert_id", msg.expert_id), ("phase", msg.phase))
                tail = (("rows", rows), ("t", specs))
                return [_header("EMB", msg.seq, rest, tail), tensor.data]
    elif cls is Ack:
        if msg.decided == msg.best == msg.stopped == -1:  # no selection fields to write
            return [_header("ACK", msg.seq, ())]
    return wire.encode(msg)


def register_frame_type(frame_type: type) -> None:
    """Let the fast paths take a frame's byte count as ``len`` for ``frame_type`` (e.g.
    ``zmq.Frame``, whose ``len`` is it). proto imports no zmq; services that do call this once."""
    global _SIZED
    _SIZED = _SIZED | {frame_type}
