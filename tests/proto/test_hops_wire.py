"""Issue 15 on the wire: QEMB/QOUT ``compute_us`` and REPLY ``hops`` (the per-hop latency of a
served request), optional fields left out while empty, so a message without them is byte for
byte what it was; every malformed use is a named rejection."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from traci_ml import proto
from traci_ml.core.errors import ProtocolError


def f32(rows: int, cols: int) -> proto.Tensor:
    return proto.Tensor.from_numpy(np.full((rows, cols), 0.5, np.float32))


def reply(**kw: Any) -> proto.Reply:
    return proto.Reply(7, proto.SERVE_OK, "", "regression", (), (0, 1), ("a", "b"), 1,
                       (f32(1, 1),), **kw)  # fmt: skip


def with_header(msg: Any, **changes: Any) -> list[Any]:
    frames = proto.encode(msg)
    head = msgpack.unpackb(bytes(frames[0]), raw=False)
    head.update(changes)
    return [msgpack.packb(head, use_bin_type=True), *frames[1:]]


@pytest.mark.parametrize(
    "msg",
    [
        proto.QEmb(1, 2, proto.SERVE_OK, "", (f32(3, 4),), compute_us=250),
        proto.QEmb(1, 2, "missing_columns", "lacks x", (), compute_us=0),
        proto.QOut(1, proto.SERVE_OK, "", "regression", (), (f32(3, 1),), compute_us=900),
        reply(hops=(0, 4000, 1500, 3000, 2000, 40)),
        reply(hops=(1, 2)),  # an older broker's shorter list
    ],
)
def test_timings_round_trip(msg: Any) -> None:
    assert proto.decode(proto.encode(msg)) == msg


def test_messages_without_timings_are_the_old_ones() -> None:
    for msg in (
        proto.QEmb(1, 2, proto.SERVE_OK, "", (f32(3, 4),)),
        proto.QOut(1, proto.SERVE_OK, "", "regression", (), (f32(3, 1),)),
        reply(),
    ):
        head = msgpack.unpackb(bytes(proto.encode(msg)[0]), raw=False)
        assert "compute_us" not in head and "hops" not in head


@pytest.mark.parametrize(
    ("frames", "words"),
    [
        (with_header(reply(), hops=[1, -5]), "REPLY.hops"),
        (with_header(reply(), hops=[1.5]), "REPLY.hops"),
        (with_header(reply(), hops=[1] * 7), "REPLY.hops"),
        (with_header(reply(), hops="fast"), "REPLY.hops is str"),
        (with_header(proto.Reply(7, "timeout", "late"), hops=[1]), "only with status ok"),
        (with_header(proto.QEmb(1, 2, proto.SERVE_OK, "", (f32(1, 4),)), compute_us=-3),
         "out of range"),
        (with_header(proto.QOut(1, proto.SERVE_OK, "", "regression", (), (f32(1, 1),)),
                     compute_us="slow"), "QOUT.compute_us is str"),
    ],
)  # fmt: skip
def test_malformed_timings_are_refused(frames: list[Any], words: str) -> None:
    with pytest.raises(ProtocolError, match=words) as info:
        proto.decode(frames)
    assert info.value.reason == "bad_field"
