"""Unit tests of the wire protocol: round trips of every kind and every rejection reason."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from traci_ml import proto
from traci_ml.core.errors import ProtocolError, TraciError

wire = proto.wire  # the limits that traci_ml.proto does not re-export
DTYPE_NAMES = tuple(proto.DTYPES)


def make_tensor(dtype: str, shape: tuple[int, ...], *, seed: int = 0) -> proto.Tensor:
    """A finite tensor of random values whose frame is plain ``bytes``."""
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if dtype == "bfloat16":  # the top 16 bits of a float32 are its bfloat16 (truncated)
        raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
        raw = values.astype(proto.DTYPES[dtype][1]).tobytes()
    return proto.Tensor(dtype, shape, raw)


def sample_messages(dtype: str) -> dict[str, Any]:
    """One message of every kind (and both GRAD directions), tensors of ``dtype``."""

    def t(seed: int) -> proto.Tensor:
        return make_tensor(dtype, (3, 8), seed=seed)

    return {
        "hello_expert": proto.Hello(
            role="expert", run_id="run-1", embed_dim=8, dtype=dtype, expert_id=2, window=4
        ),
        "hello_reducer": proto.Hello(
            role="reducer", run_id="run-1", embed_dim=8, dtype=dtype, n_experts=4
        ),
        "welcome_ok": proto.Welcome(ok=True, start_seq=17),
        "welcome_refused": proto.Welcome(ok=False, reason="run_id differs"),
        "emb": proto.Emb(seq=5, expert_id=1, phase="train", tensor=t(1)),
        "batch": proto.Batch(
            seq=5, phase="eval", present=(True, False, True), tensors=(t(2), t(3))
        ),
        "grad_from_reducer": proto.Grad(seq=5, expert_id=-1, tensors=(t(4), t(5))),
        "grad_to_expert": proto.Grad(seq=5, expert_id=2, tensors=(t(6),)),
        "ack": proto.Ack(seq=9),
        "drop": proto.Drop(seq=9, reason="late"),
        "heartbeat": proto.Heartbeat(),
        "goodbye": proto.Goodbye(reason="done"),
        # served prediction (docs/serving.md): rows and outputs are float32 whatever dtype
        "query": proto.Query(qid=4, columns=tuple(f"c{i}" for i in range(8)),
                             tensors=(make_tensor("float32", (3, 8), seed=7),)),
        "qemb": proto.QEmb(qid=4, expert_id=1, status="ok", detail="", tensors=(t(8),)),
        "qemb_refused": proto.QEmb(qid=4, expert_id=0, status="missing_columns",
                                   detail="lacks c9", tensors=()),
        "qbatch": proto.QBatch(qid=4, present=(True, False, True), tensors=(t(9), t(10))),
        "qout": proto.QOut(qid=4, status="ok", detail="", task="classification",
                           classes=("a", "b"), tensors=(make_tensor("float32", (3, 2)),)),
        "reply": proto.Reply(qid=11, status="ok", task="regression", experts=(0, 2),
                             expert_names=("left", "right"), batch_rows=7,
                             tensors=(make_tensor("float32", (3, 1)),)),
        "reply_error": proto.Reply(qid=-1, status="bad_request", detail="not msgpack"),
        # issue 10: row bitmaps (rows 1 and 2 of 3 absent: bits 0b001), queries by id, ALIGN
        "emb_rows": proto.Emb(seq=5, expert_id=1, phase="train", tensor=t(11), rows=b"\x01"),
        "batch_rows": proto.Batch(seq=5, phase="train", present=(True, True),
                                  tensors=(t(12), t(13)), rows=(b"", b"\x00")),
        "query_ids": proto.Query(qid=4, columns=(), ids=(7, -(2**63), 2**63 - 1)),
        "query_str_ids": proto.Query(qid=4, columns=(), ids=("a", "b" * wire.MAX_STR)),
        "qemb_rows": proto.QEmb(qid=4, expert_id=1, status="ok", detail="", tensors=(t(14),),
                                rows=b"\x06"),
        "qbatch_rows": proto.QBatch(qid=4, present=(True, True), tensors=(t(15), t(16)),
                                    rows=(b"\x05", b"")),
        "reply_rows": proto.Reply(qid=11, status="ok", task="regression", experts=(0, 2),
                                  expert_names=("left", "right"), batch_rows=7,
                                  tensors=(make_tensor("float32", (3, 1)),),
                                  rows=(b"\x00", b"\x03")),
        "align": proto.Align(expert_id=3, stage="psi", detail="str", counts=(5, -1),
                             tensors=(proto.Tensor.from_numpy(np.arange(5, dtype="<i8")),
                                      proto.Tensor.from_numpy(np.arange(7, dtype=np.uint8)),
                                      t(17))),
        "align_bare": proto.Align(expert_id=0, stage="wait"),
    }  # fmt: skip


def tensors_of(msg: Any) -> tuple[proto.Tensor, ...]:
    if isinstance(msg, proto.Emb):
        return (msg.tensor,)
    return getattr(msg, "tensors", ())


def comparable(msg: Any) -> dict[str, Any]:
    """Fields of ``msg`` with each tensor replaced by (dtype, shape, bytes)."""

    def plain(value: Any) -> Any:
        if isinstance(value, proto.Tensor):
            return (value.dtype, value.shape, bytes(value.buffer))
        if isinstance(value, tuple):
            return tuple(plain(v) for v in value)
        return value

    fields = {f.name: plain(getattr(msg, f.name)) for f in dataclasses.fields(msg)}
    return {"kind": msg.KIND, **fields}


def test_samples_cover_every_kind() -> None:
    assert {m.KIND for m in sample_messages("float32").values()} == set(proto.KINDS)


# --------------------------------------------------------------------------------------
# Encode (independent of decode)
# --------------------------------------------------------------------------------------


def test_encode_header_schema_and_tensor_frames_uncopied() -> None:
    batch = sample_messages("float16")["batch"]
    frames = proto.encode(batch)
    header = msgpack.unpackb(frames[0], raw=False)
    assert header == {
        "v": proto.VERSION,
        "k": "BATCH",
        "seq": 5,
        "phase": "eval",
        "present": [True, False, True],
        "t": [["float16", [3, 8]], ["float16", [3, 8]]],
    }
    assert len(frames) == 3
    assert frames[1] is batch.tensors[0].data  # handed on as is, not copied
    assert frames[2] is batch.tensors[1].data


def test_encode_without_tensors_has_no_tensor_list() -> None:
    (frame,) = proto.encode(proto.Heartbeat())
    assert msgpack.unpackb(frame, raw=False) == {"v": proto.VERSION, "k": "HEARTBEAT"}


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("frame_type", ["bytes", "zmq.Frame"])
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("name", list(sample_messages("float32")))
def test_round_trip(name: str, dtype: str, frame_type: str) -> None:
    msg = sample_messages(dtype)[name]
    frames = proto.encode(msg)
    if frame_type == "zmq.Frame":
        frames = [zmq.Frame(f) for f in frames]

    decoded = proto.decode(frames)

    assert type(decoded) is type(msg)
    assert comparable(decoded) == comparable(msg)
    for got, frame in zip(tensors_of(decoded), frames[1:], strict=True):
        assert got.data is frame  # the very frame object: no copy on decode


def test_round_trip_of_bytes_frames_is_equal_message() -> None:
    msg = sample_messages("bfloat16")["grad_from_reducer"]
    assert proto.decode(proto.encode(msg)) == msg


def test_decoded_tensor_numpy_views_the_frame() -> None:
    values = np.arange(6, dtype="<f4").reshape(2, 3)
    frame = zmq.Frame(values.tobytes())
    header = msgpack.packb(
        {"v": 1, "k": "EMB", "seq": 0, "expert_id": 0, "phase": "eval", "t": [["float32", [2, 3]]]}
    )
    emb = proto.decode([header, frame])
    assert emb.tensor.data is frame
    np.testing.assert_array_equal(emb.tensor.numpy(), values)
    assert np.shares_memory(emb.tensor.numpy(), np.frombuffer(frame.buffer, dtype=np.uint8))


def test_hello_optional_fields_take_their_defaults() -> None:
    header = {"v": 1, "k": "HELLO", "role": "reducer", "run_id": "r", "embed_dim": 4}
    header |= {"dtype": "float32", "n_experts": 2}
    hello = proto.decode([msgpack.packb(header)])
    assert hello == proto.Hello(
        role="reducer",
        run_id="r",
        embed_dim=4,
        dtype="float32",
        expert_id=-1,
        n_experts=2,
        window=1,
    )


# --------------------------------------------------------------------------------------
# Tensor helpers (independent of decode)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("np_dtype,name", [("<f4", "float32"), ("<f2", "float16")])
def test_tensor_from_numpy_shares_memory(np_dtype: str, name: str) -> None:
    array = np.arange(12, dtype=np_dtype).reshape(3, 4)
    tensor = proto.Tensor.from_numpy(array)
    assert (tensor.dtype, tensor.shape, tensor.nbytes) == (name, (3, 4), array.nbytes)
    np.testing.assert_array_equal(tensor.numpy(), array)
    assert np.shares_memory(tensor.numpy(), array)


def test_tensor_from_numpy_makes_strided_arrays_contiguous() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    np.testing.assert_array_equal(proto.Tensor.from_numpy(array).numpy(), array)


def test_tensor_from_numpy_rejects_dtypes_without_a_wire_dtype() -> None:
    with pytest.raises(ProtocolError) as info:
        proto.Tensor.from_numpy(np.zeros((2, 2), dtype=np.float64))
    assert info.value.reason == "dtype"


def test_tensor_from_numpy_accepts_an_empty_batch() -> None:
    tensor = proto.Tensor.from_numpy(np.zeros((0, 4), dtype=np.float32))
    assert (tensor.shape, tensor.nbytes) == ((0, 4), 0)


def test_bfloat16_tensor_numpy_is_raw_uint16() -> None:
    tensor = proto.Tensor("bfloat16", (2,), np.array([0x3F80, 0xC000], dtype="<u2").tobytes())
    assert tensor.numpy().dtype == np.dtype("<u2")
    assert tensor.numpy().tolist() == [0x3F80, 0xC000]  # 1.0, -2.0


# --------------------------------------------------------------------------------------
# Rejections
# --------------------------------------------------------------------------------------

NAN_INF_F32 = [float("nan"), float("inf"), float("-inf")]
BF16_BAD = {"nan": 0x7FC0, "inf": 0x7F80, "-inf": 0xFF80, "nan_payload": 0x7F81}
MISSING = object()


def header(kind: str, **fields: Any) -> bytes:
    base: dict[str, Any] = {"v": proto.VERSION, "k": kind}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not MISSING}, use_bin_type=True)


def emb(*frames: Any, t: Any = None, **fields: Any) -> list[Any]:
    """An EMB header (fields overridable, MISSING drops one) followed by ``frames``.

    ``t`` is the tensor list as it goes into the header; by default one float32 [2, 3].
    """
    base = {"seq": 0, "expert_id": 0, "phase": "train"}
    base["t"] = [["float32", [2, 3]]] if t is None else t
    base.update(fields)
    return [header("EMB", **base), *frames]


def hello(**fields: Any) -> list[bytes]:
    base = {"role": "expert", "run_id": "r", "embed_dim": 8, "dtype": "float32", "expert_id": 0}
    base.update(fields)
    return [header("HELLO", **base)]


F32_2x3 = bytes(24)
F16_2x3 = bytes(12)
ACK = header("ACK", seq=1)


def case(name: str, frames: list[Any], reason: str) -> Any:
    return pytest.param(frames, reason, id=name)


BAD_MESSAGES = [
    case("empty", [], "empty"),
    case("too_many_frames", [ACK] + [b""] * (wire.MAX_TENSORS + 1), "too_many_frames"),
    case("header_size", [b"\x80" + bytes(proto.MAX_HEADER_BYTES)], "header_size"),
    case("bad_header/random_bytes", [b"\xc1\xff\x00\x13"], "bad_header"),
    case("bad_header/truncated", [ACK[:-1]], "bad_header"),
    case("bad_header/trailing_bytes", [ACK + b"\x00"], "bad_header"),
    case("bad_header/not_utf8", [b"\x81\xa1\xff\x01"], "bad_header"),
    case("bad_header/not_a_map", [msgpack.packb([1, "ACK", 3])], "bad_header"),
    case("bad_header/int_key", [msgpack.packb({1: 1})], "bad_header"),
    case("bad_header/t_not_a_list", emb(F32_2x3, t="float32"), "bad_header"),
    case("bad_header/spec_not_a_pair", emb(F32_2x3, t=[["float32"]]), "bad_header"),
    case("bad_header/shape_not_a_list", emb(F32_2x3, t=[["float32", 6]]), "bad_header"),
    case("version/2", [header("ACK", seq=1, v=2)], "version"),
    case("version/missing", [header("ACK", seq=1, v=MISSING)], "version"),
    case("version/string", [header("ACK", seq=1, v="1")], "version"),
    case("unknown_kind/name", [header("NOPE", seq=1)], "unknown_kind"),
    case("unknown_kind/missing", [header("ACK", seq=1, k=MISSING)], "unknown_kind"),
    case("unknown_kind/lowercase", [header("ack", seq=1)], "unknown_kind"),
    case("unknown_kind/int", [header("ACK", seq=1, k=3)], "unknown_kind"),
    case("bad_field/missing_seq", [header("ACK")], "bad_field"),
    case("bad_field/missing_phase", emb(F32_2x3, phase=MISSING), "bad_field"),
    case(
        "bad_field/missing_welcome_start_seq", [header("WELCOME", ok=True, reason="")], "bad_field"
    ),
    case("bad_field/missing_hello_role", hello(role=MISSING), "bad_field"),
    case("bad_field/seq_str", [header("ACK", seq="1")], "bad_field"),
    case("bad_field/seq_float", [header("ACK", seq=1.0)], "bad_field"),
    case("bad_field/seq_bool", [header("ACK", seq=True)], "bad_field"),
    case("bad_field/expert_id_bool", emb(F32_2x3, expert_id=False), "bad_field"),
    case("bad_field/expert_id_nil", emb(F32_2x3, expert_id=None), "bad_field"),
    case("bad_field/ok_int", [header("WELCOME", ok=1, reason="", start_seq=0)], "bad_field"),
    case("bad_field/reason_int", [header("DROP", seq=1, reason=3)], "bad_field"),
    case(
        "bad_field/reason_too_long",
        [header("GOODBYE", reason="x" * (wire.MAX_STR + 1))],
        "bad_field",
    ),
    case("bad_field/negative_seq", [header("ACK", seq=-1)], "bad_field"),
    case("bad_field/very_negative_seq", [header("ACK", seq=-5)], "bad_field"),
    case("bad_field/seq_over_max", [header("ACK", seq=wire.MAX_SEQ + 1)], "bad_field"),
    case("bad_field/unknown_field", [header("ACK", seq=1, extra=0)], "bad_field"),
    case("bad_field/heartbeat_with_field", [header("HEARTBEAT", seq=1)], "bad_field"),
    case("bad_field/phase", emb(F32_2x3, phase="test"), "bad_field"),
    case("bad_field/hello_role", hello(role="observer"), "bad_field"),
    case("bad_field/hello_expert_id_missing", hello(expert_id=MISSING), "bad_field"),
    case("bad_field/hello_expert_id_negative", hello(expert_id=-1), "bad_field"),
    case("bad_field/hello_expert_id_too_big", hello(expert_id=proto.MAX_EXPERTS), "bad_field"),
    case(
        "bad_field/hello_reducer_no_n_experts",
        hello(role="reducer", expert_id=MISSING),
        "bad_field",
    ),
    case(
        "bad_field/hello_reducer_too_many",
        hello(role="reducer", n_experts=proto.MAX_EXPERTS + 1),
        "bad_field",
    ),
    case("bad_field/hello_embed_dim_zero", hello(embed_dim=0), "bad_field"),
    case(
        "bad_field/batch_present_empty",
        [header("BATCH", seq=1, phase="train", present=[])],
        "bad_field",
    ),
    case(
        "bad_field/batch_nobody_present",
        [header("BATCH", seq=1, phase="train", present=[False, False])],
        "bad_field",
    ),
    case(
        "bad_field/batch_present_ints",
        [header("BATCH", seq=1, phase="train", present=[1, 0], t=[["float32", [2, 3]]]), F32_2x3],
        "bad_field",
    ),
    case(
        "bad_field/batch_present_not_list",
        [header("BATCH", seq=1, phase="train", present=True)],
        "bad_field",
    ),
    case("dtype/float64", emb(bytes(48), t=[["float64", [2, 3]]]), "dtype"),
    case("dtype/int", emb(F32_2x3, t=[[4, [2, 3]]]), "dtype"),
    case("dtype/hello", hello(dtype="int4"), "dtype"),
    case("bad_shape/rank_5", emb(bytes(4), t=[["float32", [1, 1, 1, 1, 1]]]), "bad_shape"),
    case("bad_shape/negative_dim", emb(F32_2x3, t=[["float32", [-2, -3]]]), "bad_shape"),
    case("bad_shape/float_dim", emb(F32_2x3, t=[["float32", [2.0, 3]]]), "bad_shape"),
    case("bad_shape/bool_dim", emb(F32_2x3, t=[["float32", [True, 6]]]), "bad_shape"),
    case("bad_shape/dim_over_max", emb(b"", t=[["float32", [wire.MAX_DIM + 1, 0]]]), "bad_shape"),
    case("bad_shape/emb_rank_1", emb(F32_2x3, t=[["float32", [6]]]), "bad_shape"),
    case(
        "bad_shape/batch_shapes_differ",
        [
            header(
                "BATCH",
                seq=1,
                phase="train",
                present=[True, True],
                t=[["float32", [2, 3]], ["float32", [3, 2]]],
            ),
            F32_2x3,
            F32_2x3,
        ],
        "bad_shape",
    ),
    case(
        "bad_shape/grad_dtypes_differ",
        [
            header("GRAD", seq=1, expert_id=-1, t=[["float32", [2, 3]], ["float16", [2, 3]]]),
            F32_2x3,
            F16_2x3,
        ],
        "bad_shape",
    ),
    case("size_mismatch/truncated", emb(F32_2x3[:-1]), "size_mismatch"),
    case("size_mismatch/too_long", emb(F32_2x3 + b"\x00"), "size_mismatch"),
    case("size_mismatch/half_size_dtype", emb(F32_2x3, t=[["float16", [2, 3]]]), "size_mismatch"),
    case("size_mismatch/zmq_frame", emb(zmq.Frame(F32_2x3[:12])), "size_mismatch"),
    # Declared sizes far beyond the frame: must be refused on the header alone (the frame
    # is empty, so anything that tried to allocate or read the tensor would show).
    case("oversize/huge", emb(b"", t=[["float32", [1 << 20, 1 << 20]]]), "oversize"),
    case(
        "oversize/just_over",
        emb(b"", t=[["float16", [1, proto.MAX_TENSOR_BYTES // 2 + 1]]]),
        "oversize",
    ),
    case("frame_count/missing_frame", emb(), "frame_count"),
    case("frame_count/stray_frame", [ACK, F32_2x3], "frame_count"),
    case(
        "frame_count/emb_two_tensors",
        emb(F32_2x3, F32_2x3, t=[["float32", [2, 3]], ["float32", [2, 3]]]),
        "frame_count",
    ),
    case(
        "frame_count/batch_fewer_than_present",
        [
            header(
                "BATCH", seq=1, phase="train", present=[True, True, False], t=[["float32", [2, 3]]]
            ),
            F32_2x3,
        ],
        "frame_count",
    ),
    case(
        "frame_count/batch_more_than_present",
        [
            header(
                "BATCH",
                seq=1,
                phase="train",
                present=[True],
                t=[["float32", [2, 3]], ["float32", [2, 3]]],
            ),
            F32_2x3,
            F32_2x3,
        ],
        "frame_count",
    ),
    case(
        "frame_count/grad_to_expert_two_tensors",
        [
            header("GRAD", seq=1, expert_id=2, t=[["float32", [2, 3]], ["float32", [2, 3]]]),
            F32_2x3,
            F32_2x3,
        ],
        "frame_count",
    ),
    case("frame_count/grad_without_tensor", [header("GRAD", seq=1, expert_id=-1)], "frame_count"),
    case(
        "frame_count/heartbeat_with_tensor",
        [header("HEARTBEAT", t=[["float32", [2, 3]]]), F32_2x3],
        "frame_count",
    ),
    *[
        case(
            f"non_finite/{dtype}_{value}",
            emb(np.array([1.0, value, 2.0], dtype=np_dtype).tobytes(), t=[[dtype, [1, 3]]]),
            "non_finite",
        )
        for dtype, np_dtype in (("float32", "<f4"), ("float16", "<f2"))
        for value in NAN_INF_F32
    ],
    *[
        case(
            f"non_finite/bfloat16_{name}",
            emb(np.array([0x3F80, bits], dtype="<u2").tobytes(), t=[["bfloat16", [1, 2]]]),
            "non_finite",
        )
        for name, bits in BF16_BAD.items()
    ],
    # the compressed dtype int8 (docs/compression.md): 2 float32 scales, then 2*3 int8 values
    *[
        case(
            f"non_finite/int8_scale_{value}",
            emb(np.array([0.5, value], "<f4").tobytes() + bytes(6), t=[["int8", [2, 3]]]),
            "non_finite",
        )
        for value in NAN_INF_F32
    ],
    case(
        "bad_scale/int8_negative",
        emb(np.array([0.5, -0.5], "<f4").tobytes() + bytes(6), t=[["int8", [2, 3]]]),
        "bad_scale",
    ),
    case(
        "size_mismatch/int8_without_scales", emb(bytes(6), t=[["int8", [2, 3]]]), "size_mismatch"
    ),  # fmt: skip
    case("size_mismatch/int8_as_float32", emb(F32_2x3, t=[["int8", [2, 3]]]), "size_mismatch"),
]


def test_bad_messages_cover_every_reject_reason() -> None:
    assert {p.values[1] for p in BAD_MESSAGES} == set(proto.REJECT_REASONS)


@pytest.mark.parametrize("frames,reason", BAD_MESSAGES)
def test_decode_rejects(frames: list[Any], reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        proto.decode(frames)
    assert info.value.reason == reason
    assert reason in proto.REJECT_REASONS
    assert str(info.value).startswith(f"{reason}: ")
    assert isinstance(info.value, TraciError)


@pytest.mark.parametrize("dtype,np_dtype", [("float32", "<f4"), ("float16", "<f2")])
def test_check_finite_false_lets_nan_through(dtype: str, np_dtype: str) -> None:
    frames = emb(
        np.array([1.0, float("nan"), float("inf")], dtype=np_dtype).tobytes(), t=[[dtype, [1, 3]]]
    )
    msg = proto.decode(frames, check_finite=False)
    assert np.isnan(msg.tensor.numpy()).any()


def test_check_finite_false_lets_bfloat16_nan_through() -> None:
    frames = emb(np.array([BF16_BAD["nan"]], dtype="<u2").tobytes(), t=[["bfloat16", [1, 1]]])
    assert proto.decode(frames, check_finite=False).tensor.shape == (1, 1)


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_one(version: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        proto.decode([header("ACK", seq=1, v=version)])
    assert info.value.reason == "version"


def test_unknown_keys_of_mixed_types_are_bad_field() -> None:
    frame = msgpack.packb({"v": 1, "k": "ACK", "seq": 1, "x": 0, b"y": 0}, use_bin_type=True)
    with pytest.raises(ProtocolError) as info:
        proto.decode([frame])
    assert info.value.reason == "bad_field"


# --------------------------------------------------------------------------------------
# is_finite (independent of decode)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,np_dtype", [("float32", "<f4"), ("float16", "<f2")])
@pytest.mark.parametrize("value", NAN_INF_F32)
def test_is_finite_false_for_nan_and_inf(dtype: str, np_dtype: str, value: float) -> None:
    raw = np.array([0.0, value], dtype=np_dtype).tobytes()
    assert not proto.is_finite(proto.Tensor(dtype, (2,), raw))


@pytest.mark.parametrize("bits", BF16_BAD.values(), ids=BF16_BAD.keys())
def test_is_finite_false_for_bfloat16_nan_and_inf(bits: int) -> None:
    raw = np.array([0x3F80, bits], dtype="<u2").tobytes()
    assert not proto.is_finite(proto.Tensor("bfloat16", (2,), raw))


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_is_finite_true_for_finite_values(dtype: str) -> None:
    assert proto.is_finite(make_tensor(dtype, (4, 5), seed=3))


def test_is_finite_true_for_bfloat16_extremes() -> None:
    # largest finite, smallest subnormal, negative zero, lowest finite
    raw = np.array([0x7F7F, 0x0001, 0x8000, 0xFF7F], dtype="<u2").tobytes()
    assert proto.is_finite(proto.Tensor("bfloat16", (4,), raw))
