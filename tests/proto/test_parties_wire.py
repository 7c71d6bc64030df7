"""Issue 10 on the wire: row bitmaps (EMB/BATCH/QEMB/QBATCH/REPLY ``rows``), queries by id
(QUERY ``ids``) and ALIGN with its blob dtypes. Messages without the new fields must stay
byte for byte what they were; every malformed new field is a named rejection."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from traci_ml import proto
from traci_ml.core.errors import ProtocolError
from traci_ml.proto import wire

F32_3x2 = bytes(24)  # float32 [3, 2] zeros
SPEC = ["float32", [3, 2]]


def frames(kind: str, *tensors: bytes, **fields: Any) -> list[bytes]:
    return [msgpack.packb({"v": 1, "k": kind, **fields}, use_bin_type=True), *tensors]


def reason_of(frames_: list[Any], **kw: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        proto.decode(frames_, **kw)
    assert info.value.reason in proto.REJECT_REASONS
    return info.value.reason


def f32(rows: int, cols: int = 2, value: float = 1.0) -> proto.Tensor:
    return proto.Tensor.from_numpy(np.full((rows, cols), value, np.float32))


# ---- pack_rows / unpack_rows ----------------------------------------------------------------


@pytest.mark.parametrize("n", [*range(0, 20), 63, 64, 65, 1000])
def test_pack_and_unpack_rows_round_trip(n: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(5):
        mask = rng.random(n) < 0.6
        bits = proto.pack_rows(mask)
        if mask.all():
            assert bits == b""
        else:
            assert bits == np.packbits(mask, bitorder="little").tobytes()
            assert len(bits) == (n + 7) // 8 and wire.rows_problem(bits, n) is None
        got = proto.unpack_rows(bits, n)
        assert got.dtype == bool and got.shape == (n,) and np.array_equal(got, mask)


def test_all_present_is_the_empty_bitmap_and_none_present_is_valid() -> None:
    assert proto.pack_rows(np.ones(11, bool)) == b""
    assert proto.unpack_rows(b"", 11).all()
    none = proto.pack_rows(np.zeros(11, bool))
    assert none == b"\x00\x00" and not proto.unpack_rows(none, 11).any()
    assert proto.pack_rows(np.array([True, False, True])) == b"\x05"  # bit i = row i


@pytest.mark.parametrize(
    ("bits", "n", "words"),
    [
        (b"\x01", 9, "needs 2"),  # too short
        (b"\x01\x00", 8, "needs 1"),  # too long
        (b"\x01", 0, "needs 0"),  # nothing to cover
        (b"\x09", 3, "padding"),  # bit 3 set beyond 3 rows
        (b"\xff\x80", 15, "padding"),
    ],
)
def test_unpack_rows_refuses_wrong_length_and_padding(bits: bytes, n: int, words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        proto.unpack_rows(bits, n)
    assert info.value.reason == "bad_field" and words in str(info.value)


@pytest.mark.parametrize("mask", [np.ones((2, 2), bool), np.array([1, 0, 1]), [True, "x"]])
def test_pack_rows_wants_a_1d_bool_mask(mask: Any) -> None:
    with pytest.raises(ValueError, match="1-D bool"):
        proto.pack_rows(mask)


# ---- byte identity: without the new fields, the frames are today's ------------------------


def old_header(kind: str, **fields: Any) -> bytes:
    """The header as encode made it before issue 10 (same keys, same order)."""
    return msgpack.packb({"v": 1, "k": kind, **fields}, use_bin_type=True)


@pytest.mark.parametrize("encode", [proto.encode, wire.encode], ids=["fast", "wire"])
def test_messages_without_the_new_fields_encode_as_before(encode: Any) -> None:
    t = f32(3)
    cases = [
        (proto.Emb(4, 1, "train", t), old_header("EMB", seq=4, expert_id=1, phase="train",
                                                 t=[SPEC])),
        (proto.Batch(4, "eval", (True, False, True), (t, t)),
         old_header("BATCH", seq=4, phase="eval", present=[True, False, True], t=[SPEC, SPEC])),
        (proto.Query(2, ("a", "b"), (t,)), old_header("QUERY", qid=2, columns=["a", "b"],
                                                      t=[SPEC])),
        (proto.QEmb(2, 0, "ok", "", (t,)), old_header("QEMB", qid=2, expert_id=0, status="ok",
                                                      detail="", t=[SPEC])),
        (proto.QBatch(2, (True,), (t,)), old_header("QBATCH", qid=2, present=[True], t=[SPEC])),
        (proto.Reply(2, "ok", "", "regression", (), (1,), ("v1",), 3, (t,)),
         old_header("REPLY", qid=2, status="ok", detail="", task="regression", classes=[],
                    experts=[1], expert_names=["v1"], batch_rows=3, t=[SPEC])),
    ]  # fmt: skip
    for msg, header in cases:
        got = encode(msg)
        assert bytes(got[0]) == header, msg.KIND
        assert proto.decode(got) == msg


def test_explicit_empty_new_fields_mean_the_same() -> None:
    emb = proto.decode(frames("EMB", F32_3x2, seq=1, expert_id=0, phase="train", rows=b"",
                              t=[SPEC]))  # fmt: skip
    assert emb.rows == b"" and emb == proto.Emb(1, 0, "train", emb.tensor)
    query = proto.decode(frames("QUERY", F32_3x2, qid=1, columns=["a", "b"], ids=[], t=[SPEC]))
    assert query.ids == () and query.columns == ("a", "b")
    batch = proto.decode(frames("BATCH", F32_3x2, seq=1, phase="train", present=[True], rows=[],
                                t=[SPEC]))  # fmt: skip
    assert batch.rows == ()


# ---- round trips of the new fields ---------------------------------------------------------


def test_new_fields_round_trip_through_both_encoders() -> None:
    rows3 = proto.pack_rows(np.array([True, False, True]))
    t = f32(3)
    messages = [
        proto.Emb(4, 1, "train", t, rows3),
        proto.Emb(4, 1, "train", t, b"\x00"),  # lacks every row of the step: valid
        proto.Batch(4, "train", (True, False, True), (t, t), (rows3, b"")),
        proto.Query(9, (), (), (1, 2, 3)),
        proto.Query(9, (), (), ("x", "y")),
        proto.QEmb(9, 0, "ok", "", (t,), rows3),
        proto.QBatch(9, (True, True), (t, t), (b"", rows3)),
        proto.Reply(
            9, "ok", "", "classification", ("a",), (0, 1), ("v0", "v1"), 3, (t,), (rows3, b"\x00")
        ),  # fmt: skip
        proto.Align(
            2,
            "plain",
            "int",
            (3, 0, -1),
            (proto.Tensor.from_numpy(np.array([5, -7, 2**62], "<i8")),),
        ),  # fmt: skip
    ]
    for msg in messages:
        for encode in (proto.encode, wire.encode):
            assert proto.decode(encode(msg)) == msg, msg
        assert [bytes(memoryview(f)) for f in proto.encode(msg)] == [
            bytes(memoryview(f)) for f in wire.encode(msg)
        ]


# ---- rejections ------------------------------------------------------------------------------


def emb(**fields: Any) -> list[bytes]:
    return frames("EMB", F32_3x2, **{"seq": 1, "expert_id": 0, "phase": "train", **fields,
                                     "t": [SPEC]})  # fmt: skip


def batch(**fields: Any) -> list[bytes]:
    return frames("BATCH", F32_3x2, F32_3x2, **{"seq": 1, "phase": "train",
                                                "present": [True, True], **fields,
                                                "t": [SPEC, SPEC]})  # fmt: skip


def query(*tensors: bytes, **fields: Any) -> list[bytes]:
    base = {"qid": 1, "columns": [], **fields}
    if tensors:
        base["t"] = [SPEC]
    return frames("QUERY", *tensors, **base)


def qemb(status: str = "ok", **fields: Any) -> list[bytes]:
    base = {"qid": 1, "expert_id": 0, "status": status, "detail": "", **fields}
    if status == "ok":
        return frames("QEMB", F32_3x2, **base, t=[SPEC])
    return frames("QEMB", **base)


def reply(status: str = "ok", **fields: Any) -> list[bytes]:
    base = {"qid": 1, "status": status, "detail": "", "task": "", "classes": [],
            "experts": [0, 1], "expert_names": ["a", "b"], "batch_rows": 3, **fields}  # fmt: skip
    if status == "ok":
        return frames("REPLY", F32_3x2, **base, t=[SPEC])
    return frames("REPLY", **base)


def align(*tensors: bytes, t: Any = None, **fields: Any) -> list[bytes]:
    base = {"expert_id": 0, "stage": "plain", **fields}
    if t is not None:
        base["t"] = t
    return frames("ALIGN", *tensors, **base)


REJECTED = [
    # row bitmaps
    ("emb/rows_long", emb(rows=b"\x01\x00"), "bad_field"),  # 2 bytes for 3 rows
    ("emb/rows_padding", emb(rows=b"\x08"), "bad_field"),
    ("emb/rows_str", emb(rows="\x01"), "bad_field"),
    ("emb/rows_list", emb(rows=[1]), "bad_field"),
    ("batch/rows_count", batch(rows=[b"\x01"]), "bad_field"),
    ("batch/rows_not_bytes", batch(rows=[b"\x01", 3]), "bad_field"),
    ("batch/rows_padding", batch(rows=[b"", b"\xf0"]), "bad_field"),
    ("batch/rows_not_list", batch(rows=b"\x01\x01"), "bad_field"),
    ("qemb/rows_bad", qemb(rows=b"\x01\x01"), "bad_field"),
    ("qemb/rows_without_ok", qemb("internal", rows=b"\x01"), "bad_field"),
    (
        "qbatch/rows_count",
        frames("QBATCH", F32_3x2, qid=1, present=[True], rows=[b"", b""], t=[SPEC]),
        "bad_field",
    ),  # fmt: skip
    ("reply/rows_count", reply(rows=[b"\x01"]), "bad_field"),
    ("reply/rows_padding", reply(rows=[b"\x01", b"\x10"]), "bad_field"),
    ("reply/rows_on_error", reply("timeout", rows=[b"\x01", b"\x01"]), "bad_field"),
    # queries by id
    ("ids/mixed", query(ids=[1, "a"]), "bad_field"),
    ("ids/mixed_str_first", query(ids=["a", 1]), "bad_field"),
    ("ids/bool", query(ids=[True]), "bad_field"),
    ("ids/bool_among_ints", query(ids=[1, False]), "bad_field"),
    ("ids/empty_str", query(ids=["a", ""]), "bad_field"),
    ("ids/long_str", query(ids=["x" * (wire.MAX_STR + 1)]), "bad_field"),
    ("ids/duplicate_int", query(ids=[3, 4, 3]), "bad_field"),
    ("ids/duplicate_str", query(ids=["a", "a"]), "bad_field"),
    ("ids/float", query(ids=[1.0]), "bad_field"),
    ("ids/nil", query(ids=[None]), "bad_field"),
    ("ids/bytes", query(ids=[b"a"]), "bad_field"),
    ("ids/nested", query(ids=[[1]]), "bad_field"),
    ("ids/beyond_int64", query(ids=[2**63]), "bad_field"),
    ("ids/not_a_list", query(ids=5), "bad_field"),
    ("ids/with_columns", query(ids=[1], columns=["a"]), "bad_field"),
    ("ids/with_tensor", query(F32_3x2, ids=[1, 2, 3]), "frame_count"),
    ("ids/none_and_no_tensor", query(), "frame_count"),
    (
        "ids/too_many_for_a_header",
        query(ids=list(range(2**40, 2**40 + wire.MAX_HEADER_BYTES // 9 + 1))),
        "header_size",
    ),
    # ALIGN
    ("align/stage", align(stage="hello"), "bad_field"),
    ("align/stage_missing", align(stage=wire.MAX_SEQ), "bad_field"),
    ("align/expert_id_negative", align(expert_id=-1), "bad_field"),
    ("align/expert_id_too_big", align(expert_id=proto.MAX_EXPERTS), "bad_field"),
    ("align/expert_id_missing", frames("ALIGN", stage="plain"), "bad_field"),
    ("align/counts_too_many", align(counts=list(range(wire.MAX_ALIGN_COUNTS + 1))), "bad_field"),
    ("align/counts_below", align(counts=[-2]), "bad_field"),
    ("align/counts_above", align(counts=[wire.MAX_SEQ + 1]), "bad_field"),
    ("align/counts_bool", align(counts=[True]), "bad_field"),
    ("align/counts_str", align(counts=["1"]), "bad_field"),
    ("align/counts_not_list", align(counts=3), "bad_field"),
    ("align/detail_long", align(detail="x" * (wire.MAX_STR + 1)), "bad_field"),
    ("align/unknown_field", align(seq=1), "bad_field"),
    ("align/five_tensors", align(*[bytes(8)] * 5, t=[["int64", [1]]] * 5), "frame_count"),
    ("align/float64", align(bytes(8), t=[["float64", [1]]]), "dtype"),
    ("align/int32", align(bytes(8), t=[["int32", [2]]]), "dtype"),
    ("align/size", align(bytes(7), t=[["int64", [1]]]), "size_mismatch"),
    ("align/rank", align(bytes(1), t=[["uint8", [1, 1, 1, 1, 1]]]), "bad_shape"),
    # the blob dtypes are ALIGN's only
    (
        "blob/emb_int64",
        frames("EMB", bytes(48), seq=1, expert_id=0, phase="train", t=[["int64", [3, 2]]]),
        "dtype",
    ),  # fmt: skip
    (
        "blob/query_uint8",
        frames("QUERY", bytes(6), qid=1, columns=["a", "b"], t=[["uint8", [3, 2]]]),
        "dtype",
    ),  # fmt: skip
    (
        "blob/grad_int64",
        frames("GRAD", bytes(8), seq=1, expert_id=0, t=[["int64", [1, 1]]]),
        "dtype",
    ),  # fmt: skip
    (
        "blob/batch_uint8",
        frames("BATCH", bytes(6), seq=1, phase="train", present=[True], t=[["uint8", [3, 2]]]),
        "dtype",
    ),  # fmt: skip
    (
        "blob/qout_int64",
        frames(
            "QOUT",
            bytes(8),
            qid=1,
            status="ok",
            detail="",
            task="",
            classes=[],
            t=[["int64", [1, 1]]],
        ),
        "dtype",
    ),  # fmt: skip
    ("blob/heartbeat_uint8", frames("HEARTBEAT", bytes(1), t=[["uint8", [1]]]), "dtype"),
]


@pytest.mark.parametrize(("frames_", "reason"), [r[1:] for r in REJECTED],
                         ids=[r[0] for r in REJECTED])  # fmt: skip
def test_malformed_new_fields_are_named_rejections(frames_: list[bytes], reason: str) -> None:
    assert reason_of(frames_) == reason
    assert reason_of(frames_, check_finite=False) == reason


def test_an_align_rejection_names_its_kind_and_expert() -> None:
    with pytest.raises(ProtocolError) as info:
        proto.decode(align(expert_id=3, stage="nope"))
    assert (info.value.kind, info.value.expert_id, info.value.seq) == ("ALIGN", 3, None)


# ---- ALIGN tensors: blobs, never values -------------------------------------------------------


def test_align_carries_blobs_and_floats_unchecked() -> None:
    ids = np.array([1, -2, 2**63 - 1], "<i8")
    raw = np.frombuffer(b"\x00\xffhash", np.uint8)
    nan = np.array([np.nan, np.inf], np.float32)
    tensors = tuple(proto.Tensor.from_numpy(a) for a in (ids, raw, nan))
    msg = proto.Align(5, "held", "", (3,), tensors)
    got = proto.decode(proto.encode(msg))  # check_finite=True: ALIGN is never value-checked
    assert got == msg
    assert got.tensors[0].numpy().tolist() == ids.tolist()
    assert got.tensors[1].numpy().tobytes() == raw.tobytes()
    assert (got.tensors[0].dtype, got.tensors[1].dtype) == ("int64", "uint8")
    assert proto.tensors_of(got) == got.tensors
    assert got.tensors[0].nbytes == 24 and got.tensors[1].nbytes == 6


def test_blob_tensors_are_no_values() -> None:
    blob = proto.Tensor.from_numpy(np.array([2**62, -(2**62)], "<i8"))
    assert proto.is_finite(blob) and proto.is_finite(proto.Tensor.from_numpy(np.ones(3, np.uint8)))
    assert proto.value_problem((blob,), 1.0) is None
    bad = f32(1, 1, np.nan)
    assert proto.value_problem((blob, bad), 1.0)[0] == "non_finite"  # type: ignore[index]
    assert set(proto.DTYPES) == {"float32", "float16", "bfloat16"}  # floats only
    assert set(proto.BLOB_DTYPES) == {"int64", "uint8"}


def test_hello_may_not_name_a_blob_dtype() -> None:
    hello = frames("HELLO", role="expert", run_id="r", embed_dim=4, dtype="int64", expert_id=0)
    assert reason_of(hello) == "dtype"


def test_align_stages_are_the_documented_ones() -> None:
    assert proto.ALIGN_EXPERT_STAGES == ("plain", "psi", "held")
    assert proto.ALIGN_REDUCER_STAGES == ("answer", "error")
    assert proto.ALIGN_WAIT == "wait"
    for stage in proto.ALIGN_STAGES:
        assert proto.decode(proto.encode(proto.Align(0, stage))).stage == stage
    assert proto.decode(align()) == proto.Align(0, "plain")  # detail and counts: optional
