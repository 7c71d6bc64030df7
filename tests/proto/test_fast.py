"""The fast paths (``proto/fast.py``) against the reference (``wire``): the same messages, the
same frames byte for byte, the same rejections with the same reasons, on valid, corrupted and
random input; and the finiteness check's edge cases."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traci_ml import proto
from traci_ml.core.errors import ProtocolError
from traci_ml.proto import fast, wire

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = sorted(proto.DTYPES)


def raw_values(dtype: str, values: np.ndarray) -> bytes:
    """float32 ``values`` as raw bytes of ``dtype`` (bfloat16: the top half of a float32)."""
    values = values.astype(np.float32)
    if dtype == "bfloat16":
        return (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    return values.astype(proto.DTYPES[dtype][1]).tobytes()


def verdict(decoder: Any, frames: list[Any]) -> tuple[str, Any]:
    try:
        return "ok", decoder(frames)
    except ProtocolError as exc:
        return "rejected", exc.reason


def same_verdict(frames: list[Any]) -> None:
    """The property: fast.decode and wire.decode agree on the message or the reason."""
    assert verdict(fast.decode, frames) == verdict(wire.decode, frames)
    msg = fast.quick(frames)  # never raises; a result only for a valid hot-path message
    if msg is not None:
        assert wire.decode(frames) == msg


# ---- encode: byte for byte what wire.encode makes ------------------------------------------


@st.composite
def tensor_messages(draw: st.DrawFn) -> Any:
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(0, 4)), draw(st.integers(1, 5)))
    values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(shape)

    def tensors(n: int) -> tuple[proto.Tensor, ...]:
        return tuple(proto.Tensor(dtype, shape, raw_values(dtype, values)) for _ in range(n))

    def bitmap() -> bytes:  # a row bitmap of the tensors' rows (issue 10), often none
        mask = np.array(draw(st.lists(st.booleans(), min_size=shape[0], max_size=shape[0])), bool)
        return proto.pack_rows(mask) if draw(st.booleans()) else b""

    seq = draw(st.integers(0, wire.MAX_SEQ))
    kind = draw(st.sampled_from(["EMB", "BATCH", "GRAD_UP", "GRAD_DOWN", "ACK"]))
    if kind == "EMB":
        return proto.Emb(seq, draw(st.integers(-1, 1023)), draw(st.sampled_from(proto.PHASES)),
                         tensors(1)[0], bitmap())  # fmt: skip
    if kind == "BATCH":
        present = tuple(draw(st.lists(st.booleans(), min_size=1, max_size=6).filter(any)))
        rows = tuple(bitmap() for _ in range(sum(present))) if draw(st.booleans()) else ()
        return proto.Batch(seq, draw(st.sampled_from(proto.PHASES)), present,
                           tensors(sum(present)), rows)  # fmt: skip
    if kind == "GRAD_UP":
        return proto.Grad(seq, -1, tensors(draw(st.integers(1, 5))))
    if kind == "GRAD_DOWN":
        return proto.Grad(seq, draw(st.integers(0, 1023)), tensors(1))
    return proto.Ack(seq)


def frames_bytes(frames: list[Any]) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) for f in frames]


@FAST
@given(tensor_messages())
def test_encode_matches_wire_byte_for_byte(msg: Any) -> None:
    assert frames_bytes(fast.encode(msg)) == frames_bytes(wire.encode(msg))
    assert fast.decode(fast.encode(msg)) == msg


@pytest.mark.parametrize(
    "msg",
    [
        # odd field types (not what the services build): the plain packer decides
        proto.Batch(3, "eval", (1, 0), (proto.Tensor("float32", (1, 1), bytes(4)),)),  # type: ignore[arg-type]
        proto.Grad(9, True, (proto.Tensor("float32", (1, 1), bytes(4)),)),
        proto.Emb(1, 2, "train", proto.Tensor("float32", [1, 1], bytes(4))),  # type: ignore[arg-type]
        proto.Emb(1, 2, "train", proto.Tensor("float32", (1.0, 1), bytes(4))),  # type: ignore[arg-type]
        proto.Grad(
            4,
            -1,
            (proto.Tensor("float32", (1, 1), bytes(4)), proto.Tensor("float16", (1, 1), bytes(2))),
        ),  # fmt: skip
        proto.Grad(4, 2, ()),
        proto.Ack(-1),
        proto.Ack(True),  # type: ignore[arg-type]
        proto.Batch(-2, "eval", (True,), (proto.Tensor("float32", (1, 1), bytes(4)),)),
        proto.Heartbeat(),
        proto.Drop(3, "late"),
        proto.Goodbye("done"),
    ],
    ids=repr,
)
def test_encode_of_odd_messages_matches_wire(msg: Any) -> None:
    assert frames_bytes(fast.encode(msg)) == frames_bytes(wire.encode(msg))


@pytest.mark.parametrize("n", [*range(0, 300), 2**16 - 1, 2**16, 2**32 - 1, 2**32, wire.MAX_SEQ,
                               2**64 - 1])  # fmt: skip
def test_uint_packs_like_msgpack(n: int) -> None:
    assert fast._uint(n) == msgpack.packb(n)


# ---- decode: the same verdict as wire.decode -------------------------------------------------


@FAST
@given(tensor_messages(), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                                   min_size=1, max_size=4))  # fmt: skip
def test_header_byte_flips_get_the_same_verdict(msg: Any, flips: list[tuple[int, int]]) -> None:
    frames = wire.encode(msg)
    header = bytearray(frames[0])
    for at, byte in flips:
        header[at % len(header)] = byte
    same_verdict([bytes(header), *frames[1:]])


@FAST
@given(tensor_messages(), st.data())
def test_truncated_headers_and_frames_get_the_same_verdict(msg: Any, data: st.DataObject) -> None:
    frames = frames_bytes(wire.encode(msg))
    k = data.draw(st.integers(0, len(frames) - 1))
    frames[k] = frames[k][: data.draw(st.integers(0, max(0, len(frames[k]) - 1)))]
    same_verdict(frames)
    same_verdict(frames[:-1])  # a frame missing
    same_verdict([*frames, b"\x00" * 4])  # one too many


VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=6) | st.binary(max_size=6)
    | st.sampled_from(["EMB", "ACK", "GRAD", "BATCH", "train", "eval", "float32", 1, -1, 0,
                       b"\x01", b"\x03", b"\x08", b"", b"\x01\x00"]),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
KEYS = st.sampled_from(["v", "k", "seq", "expert_id", "phase", "present", "t", "rows", "zzz"])


@FAST
@given(st.dictionaries(KEYS, VALUES, max_size=7), st.lists(st.binary(max_size=40), max_size=3))
def test_random_headers_get_the_same_verdict(header: dict[str, Any], frames: list[bytes]) -> None:
    same_verdict([msgpack.packb(header), *frames])


@FAST
@given(st.sampled_from(["EMB", "EMB_ROWS", "ACK", "GRAD", "BATCH", "HEARTBEAT"]), st.data())
def test_near_valid_headers_get_the_same_verdict(kind: str, data: st.DataObject) -> None:
    """A valid header of ``kind`` with one field replaced, dropped or added."""
    spec = ["float32", [2, 3]]
    header: dict[str, Any] = {
        "EMB": {"seq": 4, "expert_id": 1, "phase": "train", "t": [spec]},
        "EMB_ROWS": {"seq": 4, "expert_id": 1, "phase": "train", "rows": b"\x02", "t": [spec]},
        "ACK": {"seq": 4},
        "GRAD": {"seq": 4, "expert_id": -1, "t": [spec, spec]},
        "BATCH": {"seq": 4, "phase": "eval", "present": [True, False, True], "t": [spec, spec]},
        "HEARTBEAT": {},
    }[kind]
    header = {"v": 1, "k": kind.removesuffix("_ROWS"), **header}
    key = data.draw(KEYS)
    action = data.draw(st.sampled_from(["replace", "drop"]))
    if action == "drop":
        header.pop(key, None)
    else:
        header[key] = data.draw(VALUES)
    n = len(header.get("t", [])) if isinstance(header.get("t"), list) else 0
    frames = [bytes(24)] * data.draw(st.sampled_from([n, max(0, n - 1), n + 1]))
    same_verdict([msgpack.packb(header), *frames])


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 17])
def test_emb_row_bitmaps_fast_and_wire_agree_on_every_padding_bit(rows: int) -> None:
    """Every bitmap of the right length (and a byte too many or too few) for ``rows`` rows:
    the fast path accepts exactly what wire accepts, and returns the bitmap."""
    tensor = proto.Tensor("float32", (rows, 2), bytes(8 * rows))
    need = (rows + 7) // 8
    for last in range(256):
        bits = bytes(need - 1) + bytes((last,))
        for candidate in (bits, bits + b"\x00", bits[:-1]):
            header = {"v": 1, "k": "EMB", "seq": 3, "expert_id": 0, "phase": "eval",
                      "rows": candidate, "t": [["float32", [rows, 2]]]}  # fmt: skip
            frames = [msgpack.packb(header, use_bin_type=True), tensor.data]
            same_verdict(frames)
            msg = fast.quick(frames)
            assert (msg is not None) == (wire.rows_problem(candidate, rows) is None)
            if msg is not None:
                assert msg.rows == candidate  # type: ignore[union-attr]


def test_fast_encode_of_rows_matches_wire_and_caches_no_bitmap() -> None:
    tensor = proto.Tensor("float32", (9, 2), bytes(72))
    fast._PIECES.clear()
    for k in range(300):
        mask = np.ones(9, bool)
        mask[k % 9] = False
        msg = proto.Emb(k, 1, "train", tensor, proto.pack_rows(mask))
        assert frames_bytes(fast.encode(msg)) == frames_bytes(wire.encode(msg))
        assert fast.decode(fast.encode(msg)) == msg
    assert len(fast._PIECES) == 1  # the bitmap is no cache key
    batch = proto.Batch(1, "train", (True, True), (tensor, tensor), (b"", b"\x01\x00"))
    assert frames_bytes(fast.encode(batch)) == frames_bytes(wire.encode(batch))
    assert fast.decode(fast.encode(batch)) == batch


def test_zmq_frames_decode_like_bytes() -> None:
    fast.register_frame_type(zmq.Frame)  # what the broker does
    tensor = proto.Tensor("float32", (2, 3), np.arange(6, dtype=np.float32).tobytes())
    msg = proto.Batch(7, "train", (True, True), (tensor, tensor))
    frames = [zmq.Frame(bytes(f)) for f in frames_bytes(wire.encode(msg))]
    decoded = fast.decode(frames)
    assert decoded == wire.decode(frames)
    assert all(t.data is f for t, f in zip(decoded.tensors, frames[1:], strict=True))
    short = [frames[0], frames[1], zmq.Frame(bytes(20))]
    assert verdict(fast.decode, short) == ("rejected", "size_mismatch")


def test_quick_takes_an_emb_and_leaves_anything_else() -> None:
    tensor = proto.Tensor("float32", (2, 3), np.ones(6, np.float32).tobytes())
    frames = wire.encode(proto.Emb(9, 2, "eval", tensor))
    assert fast.quick(frames) == proto.Emb(9, 2, "eval", tensor, b"")
    with_rows = wire.encode(proto.Emb(9, 2, "eval", tensor, b"\x02"))
    assert fast.quick(with_rows) == proto.Emb(9, 2, "eval", tensor, b"\x02")
    assert fast.quick(wire.encode(proto.Emb(9, 2, "eval", tensor, b"\x00"))) is not None
    assert fast.quick(wire.encode(proto.Drop(9, "late"))) is None  # not a hot kind
    assert fast.quick([b"\xc1", bytes(24)]) is None  # not msgpack: no exception
    assert fast.quick([frames[0]]) is None
    assert fast.quick([]) is None
    nan = np.ones(6, np.float32)
    nan[4] = np.nan
    assert fast.quick([frames[0], nan.tobytes()]) is None
    assert fast.quick([frames[0], nan.tobytes()], check_finite=False) is not None


def test_the_fast_layouts_are_the_classes() -> None:
    """The header sizes the fast decoder expects are derived from the message classes, and a
    class whose fields differ from what the hand-written paths handle fails the import."""
    assert (fast._EMB_SIZE, fast._EMB_ROWS_SIZE) == (6, 7)  # v, k, seq, expert_id, phase, t
    assert (fast._GRAD_SIZE, fast._BATCH_SIZE, fast._ACK_SIZE, fast._HEARTBEAT_SIZE) == (5, 6, 3, 2)
    for msg in (proto.Emb(1, 0, "train", proto.Tensor("float32", (1, 1), bytes(4))),
                proto.Ack(3), proto.Heartbeat()):  # fmt: skip
        header = msgpack.unpackb(wire.encode(msg)[0])
        assert len(header) == fast._header_size(type(msg))
    with pytest.raises(TypeError, match="update its fast paths"):
        fast._fields(proto.Emb, "seq", "expert_id")
    with pytest.raises(TypeError, match="update its constructor"):
        fast._setters(proto.Emb, "seq", "expert_id", "phase", "tensor")
    made = fast._new_emb(1, 2, "eval", proto.Tensor("float32", (1, 1), bytes(4)), b"")
    assert made == proto.Emb(1, 2, "eval", proto.Tensor("float32", (1, 1), bytes(4)))
    assert hash(made) == hash(proto.Emb(1, 2, "eval", made.tensor))
    with pytest.raises(AttributeError):  # still frozen
        made.seq = 3  # type: ignore[misc]


# ---- finite: the same verdict as wire.is_finite ----------------------------------------------

SIZES = [0, 1, 2, 7, 8, 9, 31, 33, 1000, 8191, 8192, 8193, 20000]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_catches_every_non_finite_anywhere(dtype: str, n: int) -> None:
    good = raw_values(dtype, np.linspace(-3, 3, n))
    assert fast.finite(dtype, good) and wire.is_finite(proto.Tensor(dtype, (n,), good))
    for at in sorted({0, n // 2, n - 1}) if n else ():
        for bad in (np.nan, np.inf, -np.inf):
            values = np.linspace(-3, 3, n)
            values[at] = bad
            raw = raw_values(dtype, values)
            assert not fast.finite(dtype, raw), (at, bad)
            assert not wire.is_finite(proto.Tensor(dtype, (n,), raw))


@pytest.mark.parametrize("n", SIZES[1:])
@pytest.mark.parametrize("bits", [0x7FA00000, 0xFFC00001, 0x7F800001, 0xFF800000])
def test_finite_catches_float32_nan_payloads_and_signalling_nans(n: int, bits: int) -> None:
    words = np.ones(n, np.float32).view(np.uint32)
    words[n // 2] = bits
    assert not fast.finite("float32", words.tobytes())


@pytest.mark.parametrize("value", [3.4e38, -3.4e38, 1e30, 2e19, 1e-45, -0.0, 65504.0])
@pytest.mark.parametrize("n", [1, 8192, 8193])
def test_finite_accepts_huge_and_tiny_float32_without_warnings(value: float, n: int) -> None:
    # The sum of squares overflows to Inf here: the exact check must decide (and, as
    # pytest turns warnings into errors, nothing may warn).
    assert fast.finite("float32", np.full(n, value, np.float32).tobytes())


def test_finite_float16_and_bfloat16_extremes() -> None:
    assert fast.finite("float16", np.array([65504, -65504, 6e-8], np.float16).tobytes())
    assert fast.finite("bfloat16", np.array([0x7F7F, 0xFF7F, 0x0001], "<u2").tobytes())
    assert not fast.finite("bfloat16", np.array([0x3F80, 0x7F81], "<u2").tobytes())


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_embeddings_are_rejected_non_finite(dtype: str) -> None:
    values = np.ones((2, 3))
    values[1, 2] = np.nan
    frames = [msgpack.packb({"v": 1, "k": "EMB", "seq": 0, "expert_id": 0, "phase": "train",
                             "t": [[dtype, [2, 3]]]}), raw_values(dtype, values)]  # fmt: skip
    assert verdict(fast.decode, frames) == ("rejected", "non_finite")
    assert fast.decode(frames, check_finite=False).tensor.shape == (2, 3)
