"""Issue 14 on the wire: QUERY/QBATCH ``attention`` (a flag, left out while False) and the
second tensor of QOUT/REPLY (the rows' attention). Messages that do not ask are byte for byte
what they were before; every malformed use is a named rejection."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from traci_ml import proto
from traci_ml.core.errors import ProtocolError


def header(frames: list[Any]) -> dict[str, Any]:
    return msgpack.unpackb(bytes(frames[0]), raw=False)


def packed(kind: str, *tensors: proto.Tensor, **fields: Any) -> bytes:
    """The header as it was written before issue 14: fields in schema order, then "t"."""
    head: dict[str, Any] = {"v": 1, "k": kind, **fields}
    if tensors:
        head["t"] = [[t.dtype, list(t.shape)] for t in tensors]
    return msgpack.packb(head, use_bin_type=True)


def f32(rows: int, cols: int, value: float = 0.25) -> proto.Tensor:
    return proto.Tensor.from_numpy(np.full((rows, cols), value, np.float32))


def reason_of(frames: list[Any]) -> str:
    with pytest.raises(ProtocolError) as info:
        proto.decode(frames)
    assert info.value.reason in proto.REJECT_REASONS
    return info.value.reason


def test_messages_that_do_not_ask_are_byte_for_byte_the_old_ones() -> None:
    rows = f32(3, 2)
    query = proto.Query(7, ("a", "b"), (rows,))
    assert proto.encode(query)[0] == packed("QUERY", rows, qid=7, columns=["a", "b"])
    by_id = proto.Query(8, (), (), (1, 2))
    assert proto.encode(by_id)[0] == packed("QUERY", qid=8, columns=[], ids=[1, 2])
    batch = proto.QBatch(3, (True, False), (f32(3, 4),))
    assert proto.encode(batch)[0] == packed("QBATCH", f32(3, 4), qid=3, present=[True, False])
    out = f32(3, 10)
    reply = proto.Reply(7, "ok", "", "classification", tuple("0123456789"), (0, 1), ("l", "r"),
                        3, (out,))  # fmt: skip
    assert proto.encode(reply)[0] == packed(
        "REPLY", out, qid=7, status="ok", detail="", task="classification",
        classes=list("0123456789"), experts=[0, 1], expert_names=["l", "r"], batch_rows=3,
    )  # fmt: skip
    # a header that says attention: false explicitly means the same
    explicit = msgpack.packb({**header(proto.encode(query)), "attention": False})
    assert proto.decode([explicit, rows.data]) == query


@pytest.mark.parametrize(
    "msg",
    [
        proto.Query(7, ("a", "b"), (f32(3, 2),), attention=True),
        proto.Query(8, (), (), ("r1", "r2"), attention=True),
        proto.QBatch(3, (True, False, True), (f32(3, 4), f32(3, 4)), (), True),
        proto.QOut(3, "ok", "", "regression", (), (f32(3, 1), f32(3, 3))),
        proto.Reply(7, "ok", "", "regression", (), (0, 2), ("l", "r"), 5, (f32(3, 1), f32(3, 3))),
    ],
)
def test_attention_round_trips(msg: Any) -> None:
    frames = proto.encode(msg)
    got = proto.decode(frames)
    assert type(got) is type(msg) and proto.encode(got)[0] == frames[0]
    if isinstance(msg, (proto.Query, proto.QBatch)):
        assert header(frames)["attention"] is True and got.attention is True
    else:
        assert len(got.tensors) == 2 and got.tensors[1].shape == msg.tensors[1].shape


def frames_of(kind: str, tensors: list[proto.Tensor], **fields: Any) -> list[Any]:
    return [packed(kind, *tensors, **fields), *(t.data for t in tensors)]


REPLY = {"qid": 1, "status": "ok", "detail": "", "task": "regression", "classes": [],
         "experts": [0, 1], "expert_names": ["l", "r"], "batch_rows": 3}  # fmt: skip
QOUT = {"qid": 1, "status": "ok", "detail": "", "task": "regression", "classes": []}


@pytest.mark.parametrize(
    ("kind", "tensors", "fields", "reason"),
    [
        ("REPLY", [f32(3, 1), f32(3, 2)], REPLY, "bad_shape"),  # not 1 + 2 experts columns
        ("REPLY", [f32(3, 1), f32(2, 3)], REPLY, "bad_shape"),  # not the outputs' rows
        ("REPLY", [f32(3, 1), f32(3, 3), f32(3, 3)], REPLY, "frame_count"),
        ("QOUT", [f32(3, 1), f32(3, 0)], QOUT, "bad_shape"),  # no [CLS] column
        ("QOUT", [f32(3, 1), proto.Tensor("float16", (3, 3), bytes(18))], QOUT, "dtype"),
        ("QOUT", [f32(3, 1), proto.Tensor("float32", (9,), bytes(36))], QOUT, "bad_shape"),
        ("QEMB", [f32(3, 4), f32(3, 3)],
         {"qid": 1, "expert_id": 0, "status": "ok", "detail": ""}, "frame_count"),
        ("QUERY", [f32(3, 2)], {"qid": 1, "columns": ["a", "b"], "attention": 1}, "bad_field"),
        ("QBATCH", [f32(3, 4)], {"qid": 1, "present": [True], "attention": "yes"}, "bad_field"),
    ],
)  # fmt: skip
def test_malformed_attention_is_refused(kind, tensors, fields, reason) -> None:
    assert reason_of(frames_of(kind, tensors, **fields)) == reason


def test_an_error_reply_still_carries_no_tensor() -> None:
    fields = {**REPLY, "status": "timeout", "experts": [], "expert_names": []}
    assert reason_of(frames_of("REPLY", [f32(3, 1), f32(3, 1)], **fields)) == "frame_count"
