"""TRACI wire protocol, version 1: the one place a message is encoded or decoded.

A message is a list of ZeroMQ frames::

    [header, tensor_0, tensor_1, ...]

``header`` is a msgpack map ``{"v": VERSION, "k": KIND, <fields>, "t": [[dtype, shape], ...]}``.
Every tensor is one frame of raw little-endian, C-contiguous bytes whose length must equal
``messages.frame_nbytes(dtype, shape)`` (``prod(shape) * itemsize(dtype)``; the compressed
``int8``: its per-row scales, then one byte per value, ``codec.py``). Tensor frames are
handed to ZeroMQ without copying and, on the broker, forwarded as the very frame objects
that arrived.

ROUTER sockets prepend the peer's routing id; the service strips it before ``decode`` and
puts it back after ``encode``. ``decode`` checks everything (size, version, kind, fields,
dtype, shape against frame length, finite values) and raises ``ProtocolError`` whose
``reason`` is a short stable label, used as a metric label by every service.

The message classes, ``Tensor`` and the kind table ``KINDS`` are in ``messages.py``; this
module holds the version, the limits and the code that turns them into frames and back;
``rows.py`` the row bitmaps, ``values.py`` the value checks (NaN/Inf, the bound).
This module imports neither torch nor zmq: the broker holds no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from traci_ml.core.errors import ProtocolError
from traci_ml.proto import codec
from traci_ml.proto.messages import (
    ALIGN_STAGES,
    ALL_DTYPES,
    KINDS,
    ROW_SCALED,
    SERVE_HOPS,
    SERVE_KINDS,
    SERVE_OK,
    WIRE_DTYPES,
    Align,
    Batch,
    Emb,
    FrameLike,
    Grad,
    Hello,
    Message,
    QBatch,
    QEmb,
    Query,
    Reply,
    Tensor,
    _buffer,
    frame_nbytes,
)
from traci_ml.proto.rows import ids_bytes, rows_problem  # noqa: F401  (ids_bytes: app.client)
from traci_ml.proto.values import is_finite

VERSION = 1

# Limits. A message outside them is rejected before any allocation that depends on it.
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSOR_BYTES = 512 * 1024 * 1024
MAX_TENSORS = 1024  # tensors per message (BATCH carries one per present expert)
MAX_EXPERTS = 1024
MAX_RANK = 4
MAX_DIM = 1 << 31
MAX_STR = 1024
MAX_SEQ = (1 << 53) - 1
MAX_COLUMNS = 16384  # column names in a QUERY (the header limit bounds them as well)
MAX_ALIGN_COUNTS = 16  # integers in ALIGN.counts
MAX_ALIGN_TENSORS = 4  # tensors in one ALIGN
ID_MIN, ID_MAX = -(1 << 63), (1 << 63) - 1  # an int row id (QUERY.ids) is a signed 64-bit
# What the ids of one QUERY may take in its header (packed), leaving room for its other
# fields: a client's request by id, and the broker's batched one, stay within it.
MAX_IDS_BYTES = MAX_HEADER_BYTES - 256

ROLES = ("expert", "reducer")
PHASES = ("train", "eval")

# Every reason a message can be rejected with; services pre-create a metric series per reason.
REJECT_REASONS = (
    "empty",
    "too_many_frames",
    "header_size",
    "bad_header",
    "version",
    "unknown_kind",
    "bad_field",
    "dtype",
    "bad_shape",
    "size_mismatch",
    "oversize",
    "frame_count",
    "non_finite",
    "bad_scale",  # a compressed (int8) tensor with a negative row scale
)


# Kinds that may omit some of their FIELDS: only these are required (others: every field).
_REQUIRED: dict[str, frozenset[str]] = {
    "HELLO": frozenset({"role", "run_id", "embed_dim", "dtype"}),
    "WELCOME": frozenset({"ok", "reason", "start_seq"}),
    "ALIGN": frozenset({"expert_id", "stage"}),
}
# Each kind's OPTIONAL fields (messages.py): never required, left out while empty.
_OPTIONAL: dict[str, dict[str, type]] = {
    kind: getattr(cls, "OPTIONAL", {}) for kind, cls in KINDS.items()
}


# --------------------------------------------------------------------------------------
# Encode
# --------------------------------------------------------------------------------------


def encode(msg: Message) -> list[FrameLike]:
    """Frames for ``msg``: the msgpack header, then each tensor's frame as it is (no copy)."""
    header: dict[str, Any] = {"v": VERSION, "k": msg.KIND}
    for name in msg.FIELDS:
        value = getattr(msg, name)
        header[name] = list(value) if isinstance(value, tuple) else value
    for name in _OPTIONAL[msg.KIND]:
        value = getattr(msg, name)
        # empty (b"", (), -1 for an int, False for a flag): left out, the frames are those
        # without it
        if isinstance(value, bool):
            keep = value
        else:
            keep = (value >= 0) if isinstance(value, int) else len(value)
        if keep:
            header[name] = list(value) if isinstance(value, tuple) else value
    tensors = tensors_of(msg)
    if tensors:
        header["t"] = [[t.dtype, list(t.shape)] for t in tensors]
    return [msgpack.packb(header, use_bin_type=True), *(t.data for t in tensors)]


def tensors_of(msg: Message) -> tuple[Tensor, ...]:
    """The tensors a message carries (none for the kinds without)."""
    if isinstance(msg, Emb):
        return (msg.tensor,)
    if isinstance(msg, (Batch, Grad, Align, *SERVE_KINDS)):
        return msg.tensors
    return ()


# --------------------------------------------------------------------------------------
# Decode: all checking happens here.
# --------------------------------------------------------------------------------------


def decode(frames: Sequence[FrameLike], *, check_finite: bool = True) -> Message:
    """Validate ``frames`` (routing id already stripped) and return the typed message.

    Raises ``ProtocolError`` with a ``reason`` from ``REJECT_REASONS``.
    """
    if not frames:
        raise ProtocolError("empty", "message has no frames")
    if len(frames) > MAX_TENSORS + 1:
        raise ProtocolError("too_many_frames", f"{len(frames)} frames > {MAX_TENSORS + 1}")
    raw = _buffer(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("header_size", f"header of {len(raw)} bytes > {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("bad_header", f"header is not msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", f"header is a {type(header).__name__}, not a map")
    return decode_header(header, frames, check_finite)


def decode_header(
    header: dict[str, Any], frames: Sequence[FrameLike], check_finite: bool = True
) -> Message:
    """The rest of ``decode``, from the unpacked header map of ``frames`` (whose count and
    header size ``decode`` checked): ``fast.decode`` unpacks once for both."""
    version = header.get("v")
    if type(version) is not int or version != VERSION:
        raise ProtocolError("version", f"protocol version {version!r}, expected {VERSION}")
    kind = header.get("k")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError("unknown_kind", f"unknown message kind {kind!r}")
    try:
        fields = _check_fields(cls, header)
        if cls is Align:  # raw blobs too, and never values: nothing to check for NaN
            tensors = _check_tensors(header.get("t", []), frames[1:], False, ALL_DTYPES)
        else:
            tensors = _check_tensors(header.get("t", []), frames[1:], check_finite)
        try:
            return _build(cls, fields, tensors)
        except ProtocolError:  # NaN/Inf is the verdict whenever it applies, checked or not
            if cls is Align:
                raise
            if not check_finite and not all(is_finite(t) for t in tensors):
                raise ProtocolError("non_finite", "a tensor holds NaN or Inf") from None
            raise
    except ProtocolError as exc:  # the kind (and step) are known: the receiver may answer
        exc.kind = cls.KIND
        seq, eid = header.get("seq"), header.get("expert_id")
        exc.seq = seq if type(seq) is int and 0 <= seq <= MAX_SEQ else None
        exc.expert_id = eid if type(eid) is int else None
        raise


def _check_fields(cls: type, header: dict[str, Any]) -> dict[str, Any]:
    optional = _OPTIONAL[cls.KIND]
    unknown = set(header) - set(cls.FIELDS) - set(optional) - {"v", "k", "t"}
    if unknown:
        names = sorted(repr(k) for k in unknown)
        raise ProtocolError("bad_field", f"{cls.KIND} has unknown fields {', '.join(names)}")
    required = _REQUIRED.get(cls.KIND, frozenset(cls.FIELDS))
    fields: dict[str, Any] = {}
    for name, typ in (cls.FIELDS | optional).items() if optional else cls.FIELDS.items():
        if name not in header:
            if name in required:
                raise ProtocolError("bad_field", f"{cls.KIND} lacks field {name!r}")
            continue
        value = header[name]
        ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
        if not ok:
            raise ProtocolError(
                "bad_field", f"{cls.KIND}.{name} is {type(value).__name__}, not {typ.__name__}"
            )
        if typ is int and not -1 <= value <= MAX_SEQ:
            raise ProtocolError("bad_field", f"{cls.KIND}.{name}={value} out of range")
        if typ is str and len(value) > MAX_STR:
            raise ProtocolError("bad_field", f"{cls.KIND}.{name} longer than {MAX_STR}")
        fields[name] = value
    if "seq" in fields and fields["seq"] < 0:
        raise ProtocolError("bad_field", f"{cls.KIND}.seq={fields['seq']} is negative")
    if "phase" in fields and fields["phase"] not in PHASES:
        raise ProtocolError("bad_field", f"{cls.KIND}.phase={fields['phase']!r} not in {PHASES}")
    if cls is Hello:
        _check_hello(fields)
    return fields


def _check_hello(fields: dict[str, Any]) -> None:
    if fields["role"] not in ROLES:
        raise ProtocolError("bad_field", f"HELLO.role={fields['role']!r} not in {ROLES}")
    if fields["dtype"] not in WIRE_DTYPES:
        raise ProtocolError(
            "dtype", f"HELLO.dtype={fields['dtype']!r} not in {sorted(WIRE_DTYPES)}"
        )
    if not 1 <= fields["embed_dim"] <= MAX_DIM:
        raise ProtocolError("bad_field", f"HELLO.embed_dim={fields['embed_dim']} out of range")
    if fields["role"] == "expert" and not 0 <= fields.get("expert_id", -1) < MAX_EXPERTS:
        raise ProtocolError("bad_field", "expert HELLO needs 0 <= expert_id < MAX_EXPERTS")
    if fields["role"] == "reducer" and not 1 <= fields.get("n_experts", 0) <= MAX_EXPERTS:
        raise ProtocolError("bad_field", "reducer HELLO needs 1 <= n_experts <= MAX_EXPERTS")


def _check_tensors(
    specs: Any,
    frames: Sequence[FrameLike],
    check_finite: bool,
    dtypes: dict[str, tuple[int, Any]] = WIRE_DTYPES,
) -> tuple[Tensor, ...]:
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise ProtocolError("bad_header", "tensor list 't' is not a list of at most MAX_TENSORS")
    if len(specs) != len(frames):
        raise ProtocolError("frame_count", f"header lists {len(specs)} tensors, got {len(frames)}")
    tensors = []
    for i, (spec, frame) in enumerate(zip(specs, frames, strict=True)):
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[1], list)):
            raise ProtocolError("bad_header", f"tensor {i} spec is not [dtype, shape]")
        dtype, shape = spec
        if not isinstance(dtype, str) or dtype not in dtypes:
            raise ProtocolError("dtype", f"tensor {i} dtype {dtype!r} not in {sorted(dtypes)}")
        if len(shape) > MAX_RANK or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_DIM for s in shape
        ):
            raise ProtocolError("bad_shape", f"tensor {i} shape {shape!r} is not valid")
        nbytes = frame_nbytes(dtype, shape)
        if nbytes > MAX_TENSOR_BYTES:
            raise ProtocolError("oversize", f"tensor {i} of {nbytes} bytes > {MAX_TENSOR_BYTES}")
        got = len(_buffer(frame))
        if got != nbytes:
            raise ProtocolError(
                "size_mismatch", f"tensor {i} {dtype}{shape} needs {nbytes} bytes, frame has {got}"
            )
        tensor = Tensor(dtype, tuple(shape), frame)
        if dtype in ROW_SCALED:  # its scales: never negative (NaN/Inf: non_finite below)
            problem = codec.scale_problem(_buffer(frame), codec.rows_of(shape)[0])
            if problem is not None and problem[0] == "bad_scale":
                raise ProtocolError("bad_scale", f"tensor {i}: {problem[1]}")
        if check_finite and not is_finite(tensor):
            raise ProtocolError("non_finite", f"tensor {i} holds NaN or Inf")
        tensors.append(tensor)
    return tuple(tensors)


def _build(cls: type, fields: dict[str, Any], tensors: tuple[Tensor, ...]) -> Message:
    if cls is Emb:
        _expect(len(tensors) == 1, "EMB carries one tensor")
        _expect(len(tensors[0].shape) == 2, "EMB tensor is [B, d]", "bad_shape")
        rows = fields.get("rows", b"")
        _check_rows(rows, tensors[0].shape[0], "EMB.rows")
        return Emb(fields["seq"], fields["expert_id"], fields["phase"], tensors[0], rows)
    if cls is Batch:
        present = fields["present"]
        _expect(
            0 < len(present) <= MAX_EXPERTS
            and all(isinstance(p, bool) for p in present)
            and any(present),
            "BATCH.present is a list of booleans with at least one expert present",
            "bad_field",
        )
        _expect(len(tensors) == sum(present), "BATCH carries one tensor per present expert")
        _expect(_same_2d(tensors), "BATCH tensors are [B, d] of one shape and dtype", "bad_shape")
        rows = _rows_list(fields.get("rows", []), len(tensors), tensors[0].shape[0], "BATCH")
        return Batch(fields["seq"], fields["phase"], tuple(present), tensors, rows)
    if cls is Grad:
        _expect(len(tensors) >= 1, "GRAD carries at least one tensor")
        _expect(_same_2d(tensors), "GRAD tensors are [B, d] of one shape and dtype", "bad_shape")
        _expect(fields["expert_id"] == -1 or len(tensors) == 1, "GRAD to an expert has one")
        return Grad(fields["seq"], fields["expert_id"], tensors)
    if cls in SERVE_KINDS:
        return _build_serve(cls, fields, tensors)
    if cls is Align:
        return _build_align(fields, tensors)
    _expect(not tensors, f"{cls.KIND} carries no tensors")
    return cls(**fields)


def _same_2d(tensors: tuple[Tensor, ...]) -> bool:
    return all(
        len(t.shape) == 2 and t.shape == tensors[0].shape and t.dtype == tensors[0].dtype
        for t in tensors
    )


def _expect(condition: bool, what: str, reason: str = "frame_count") -> None:
    if not condition:
        raise ProtocolError(reason, what)


def _check_rows(bits: bytes, n: int, what: str) -> None:
    problem = rows_problem(bits, n)
    if problem is not None:
        raise ProtocolError("bad_field", f"{what} is no row bitmap of {n} rows: {problem}")


def _rows_list(rows: list, count: int, n: int, kind: str) -> tuple[bytes, ...]:
    """A ``rows`` list of BATCH/QBATCH/REPLY: () or ``count`` bitmaps (one per present or
    listed expert), each over ``n`` rows."""
    if not rows:
        return ()
    _expect(
        len(rows) == count and all(type(r) is bytes for r in rows),
        f"{kind}.rows is a list of {count} bitmaps (bytes), one per expert",
        "bad_field",
    )
    for k, bits in enumerate(rows):
        _check_rows(bits, n, f"{kind}.rows[{k}]")
    return tuple(rows)


def _build_align(fields: dict[str, Any], tensors: tuple[Tensor, ...]) -> Align:
    stage, eid, counts = fields["stage"], fields["expert_id"], fields.get("counts", [])
    _expect(stage in ALIGN_STAGES, f"ALIGN.stage={stage!r} not in {ALIGN_STAGES}", "bad_field")
    _expect(0 <= eid < MAX_EXPERTS, f"ALIGN.expert_id={eid} out of range", "bad_field")
    _expect(
        len(counts) <= MAX_ALIGN_COUNTS
        and all(type(c) is int and -1 <= c <= MAX_SEQ for c in counts),
        f"ALIGN.counts is a list of at most {MAX_ALIGN_COUNTS} integers in [-1, {MAX_SEQ}]",
        "bad_field",
    )
    _expect(len(tensors) <= MAX_ALIGN_TENSORS, f"ALIGN carries at most {MAX_ALIGN_TENSORS} tensors")
    return Align(eid, stage, fields.get("detail", ""), tuple(counts), tensors)


def _check_ids(ids: list) -> tuple[int, ...] | tuple[str, ...]:
    """QUERY.ids: all int (signed 64-bit) or all str (non-empty, at most MAX_STR), unique."""
    first = type(ids[0])
    if first is int:
        ok = all(type(i) is int and ID_MIN <= i <= ID_MAX for i in ids)
        what = "QUERY.ids are all int (signed 64-bit) or all str"
    else:
        ok = first is str and all(type(i) is str and 0 < len(i) <= MAX_STR for i in ids)
        what = f"QUERY.ids are all int or all str (non-empty, at most {MAX_STR} characters)"
    _expect(ok, what, "bad_field")
    repeated = first_repeat(ids)
    if repeated is not None:
        raise ProtocolError("bad_field", f"QUERY.ids repeat id {repeated!r}")
    return tuple(ids)


def first_repeat(values: Sequence[Any]) -> Any | None:
    """The first value of ``values`` seen a second time, or None when all are distinct."""
    if len(set(values)) == len(values):
        return None
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


_NAMES_SEEN: dict[tuple, None] = {}  # name lists found valid lately (a client repeats its own)
_NAMES_SEEN_MAX = 64


def _names_ok(names: tuple) -> bool:
    """At most MAX_COLUMNS names, each a str of 1..MAX_STR characters. A list seen lately
    is not checked name by name again: a 256-column QUERY is decoded by the broker and by
    every expert, and that loop was a third of a served request's decode time."""
    try:
        if names in _NAMES_SEEN:
            return True
    except TypeError:  # an unhashable entry: no name
        return False
    ok = len(names) <= MAX_COLUMNS and all(
        isinstance(c, str) and 0 < len(c) <= MAX_STR for c in names
    )
    if ok:
        if len(_NAMES_SEEN) >= _NAMES_SEEN_MAX:
            _NAMES_SEEN.pop(next(iter(_NAMES_SEEN)), None)
        _NAMES_SEEN[names] = None
    return ok


def _build_serve(cls: type, fields: dict[str, Any], tensors: tuple[Tensor, ...]) -> Message:
    """The served-prediction kinds: lists of names, qid, status and the tensor per kind."""
    kind, out = cls.KIND, dict(fields)
    for name in ("columns", "classes", "expert_names"):
        if name in out:
            names = tuple(out[name])
            _expect(
                _names_ok(names),
                f"{kind}.{name} is a list of at most {MAX_COLUMNS} non-empty names",
                "bad_field",
            )
            out[name] = names
    _expect(out["qid"] >= 0 or cls is Reply, f"{kind}.qid is negative", "bad_field")
    if cls is Query:
        columns = out["columns"]
        _expect(len(set(columns)) == len(columns), "QUERY.columns repeat a name", "bad_field")
        if out.get("ids"):  # a query by id: the experts look the rows up, no tensor
            out["ids"] = _check_ids(out["ids"])
            _expect(not columns, "QUERY by ids names no columns", "bad_field")
            _expect(not tensors, "QUERY by ids carries no tensor")
            return Query(out["qid"], (), (), out["ids"], out.get("attention", False))
        out["ids"] = ()
        _expect(len(tensors) == 1, "QUERY carries one tensor")
        _expect(tensors[0].dtype == "float32", "QUERY rows are float32", "dtype")
        shape = tensors[0].shape
        _expect(
            len(shape) == 2 and shape[0] >= 1 and shape[1] == len(columns),
            "QUERY rows are [R >= 1, len(columns)]",
            "bad_shape",
        )
    elif cls is QBatch:
        present = out["present"]
        _expect(
            0 < len(present) <= MAX_EXPERTS and all(isinstance(p, bool) for p in present),
            "QBATCH.present is a list of booleans, one per expert",
            "bad_field",
        )
        _expect(len(tensors) == sum(present) >= 1, "QBATCH carries one tensor per present expert")
        _expect(_same_2d(tensors), "QBATCH tensors are [R, d] of one shape and dtype", "bad_shape")
        out["present"] = tuple(present)
        out["rows"] = _rows_list(out.get("rows", []), len(tensors), tensors[0].shape[0], "QBATCH")
    else:
        ok = out["status"] == SERVE_OK
        # ok: the outputs, and for QOUT/REPLY the rows' attention when it was asked for
        counts = ((1, 2) if cls is not QEmb else (1,)) if ok else (0,)
        _expect(len(tensors) in counts, f"{kind} carries one tensor if and only if ok (QOUT "
                "and REPLY: and a second, the attention, when asked for)")  # fmt: skip
        _expect(all(len(t.shape) == 2 for t in tensors), f"{kind} tensor is 2-D", "bad_shape")
        _expect(
            cls is QEmb or all(t.dtype == "float32" for t in tensors),
            f"{kind} outputs are float32",
            "dtype",
        )
        if len(tensors) == 2:  # [R, 1 + experts]: [CLS], then one column per expert
            att = tensors[1].shape
            _expect(att[0] == tensors[0].shape[0] and att[1] >= 1,
                    f"{kind} attention is [R, 1 + experts] over the outputs' R rows",
                    "bad_shape")  # fmt: skip
        _expect(out.get("expert_id", 0) >= 0, f"{kind}.expert_id is negative", "bad_field")
        if cls is QEmb and out.get("rows"):
            _expect(ok, "QEMB.rows only with status ok", "bad_field")
            _check_rows(out["rows"], tensors[0].shape[0], "QEMB.rows")
        if cls is Reply:
            experts = out["experts"]
            _expect(
                all(type(e) is int and 0 <= e < MAX_EXPERTS for e in experts)
                and len(experts) == len(out["expert_names"]),
                "REPLY.experts are expert ids, one per name",
                "bad_field",
            )
            out["experts"] = tuple(experts)
            _expect(len(tensors) < 2 or tensors[1].shape[1] == 1 + len(experts),
                    "REPLY attention has 1 + len(experts) columns", "bad_shape")  # fmt: skip
            rows = out.get("rows", [])
            _expect(ok or not rows, "REPLY.rows only with status ok", "bad_field")
            n = tensors[0].shape[0] if tensors else 0
            out["rows"] = _rows_list(rows, len(experts), n, "REPLY")
            hops = out.get("hops", [])
            _expect(
                len(hops) <= len(SERVE_HOPS)
                and all(type(h) is int and 0 <= h <= MAX_SEQ for h in hops),
                f"REPLY.hops is at most {len(SERVE_HOPS)} microsecond counts (ints >= 0)",
                "bad_field",
            )
            _expect(ok or not hops, "REPLY.hops only with status ok", "bad_field")
            out["hops"] = tuple(hops)
    return cls(**out, tensors=tensors)
