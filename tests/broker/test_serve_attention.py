"""The front door and attention (issue 14, services/broker/serve.py): a request that asks gets
its own rows of the reducer's attention, one that does not gets exactly the REPLY it got
before, in the same batch; the experts are never told; a QOUT lacking the attention asked
for is a reducer error."""

from __future__ import annotations

import numpy as np
import pytest

from tests.broker.test_front_door import (
    COLUMNS,
    PEERS,
    REDUCER_ID,
    answer_experts,
    make_desk,
    occupy,
    rows,
    sends,
)
from traci_ml import proto
from traci_ml.services.broker.outcomes import EXPERT, REDUCER
from traci_ml.services.broker.serve import CLIENT

pytestmark = pytest.mark.timeout(30)


def qout(batch: proto.QBatch, attention: bool = True) -> proto.QOut:
    """Outputs [R, 2] and, when asked, attention [R, 1 + present] with distinct values."""
    r, present = batch.tensors[0].shape[0], sum(batch.present)
    out = np.arange(r * 2, dtype=np.float32).reshape(r, 2)
    att = np.arange(r * (1 + present), dtype=np.float32).reshape(r, 1 + present) / 100
    tensors = (proto.Tensor.from_numpy(out),)
    if attention:
        tensors += (proto.Tensor.from_numpy(att),)
    return proto.QOut(batch.qid, proto.SERVE_OK, "", "classification", ("x", "y"), tensors)


def batch_of(desk, asks: tuple[bool, ...], skip: tuple[int, ...] = ()) -> proto.QBatch:  # noqa: ANN001
    """Requests c0, c1, ... of 2 rows each, ``asks[k]``: whether ck asks for attention; all
    in one batch, answered by every expert but ``skip``: the QBATCH."""
    occupy(desk)  # the experts are busy: the requests wait for company
    for k, ask in enumerate(asks):
        query = proto.Query(100 + k, COLUMNS, (rows(2, 10 * k),), attention=ask)
        assert not desk.request(f"c{k}".encode(), query, 0.0, PEERS).sends
    (first, *_) = sends(desk.tick(0.011, PEERS), EXPERT)
    assert not first.message.attention  # the experts are never asked for it
    assert (
        proto.encode(first.message)[0]
        == proto.encode(
            proto.Query(first.message.qid, first.message.columns, first.message.tensors)
        )[0]  # fmt: skip
    )
    out = answer_experts(desk, first.message, 0.02, skip)
    if skip:  # the skipped experts never answer: masked at the serve timeout
        out = desk.tick(5.0, PEERS)
    (sent,) = sends(out, REDUCER)
    return sent.message


def test_only_the_request_that_asks_gets_attention_and_the_others_are_unchanged() -> None:
    desk, _ = make_desk()
    batch = batch_of(desk, (False, True, False))
    assert batch.attention  # one request asked: the reducer computes it for the batch
    answer = qout(batch)
    replies = {s.routing_id: s.message for s in sends(desk.qout(REDUCER_ID, answer, 0.03, PEERS),
                                                       CLIENT)}  # fmt: skip
    att = answer.tensors[1].numpy()
    asked = replies[b"c1"]
    assert len(asked.tensors) == 2 and np.array_equal(asked.tensors[1].numpy(), att[2:4])
    assert asked.tensors[1].shape == (2, 1 + len(asked.experts))
    for k in (0, 2):
        reply = replies[f"c{k}".encode()]
        mine = proto.Tensor.from_numpy(answer.tensors[0].numpy()[2 * k : 2 * k + 2])
        before = proto.Reply(100 + k, proto.SERVE_OK, "", "classification", ("x", "y"),
                             (0, 1, 2), ("v0", "v1", "v2"), 6, (mine,),
                             hops=reply.hops)  # fmt: skip
        frames = proto.encode(reply)
        assert len(frames) == 2 and frames[0] == proto.encode(before)[0]
        assert bytes(frames[1]) == bytes(proto.encode(before)[1])


def test_nobody_asks_no_attention_is_asked_of_the_reducer() -> None:
    desk, _ = make_desk()
    batch = batch_of(desk, (False, False))
    assert not batch.attention and "attention" not in proto.encode(batch)[0].decode("latin-1")


def test_a_masked_expert_has_no_column() -> None:
    desk, _ = make_desk()
    batch = batch_of(desk, (True,), skip=(1,))
    assert batch.present == (True, False, True) and batch.attention
    (reply,) = [s.message for s in sends(desk.qout(REDUCER_ID, qout(batch), 5.1, PEERS), CLIENT)]
    assert reply.experts == (0, 2) and reply.tensors[1].shape == (2, 3)


@pytest.mark.parametrize("attention", [False, "wrong"])
def test_a_qout_without_the_attention_asked_for_is_a_reducer_error(attention) -> None:
    desk, _ = make_desk()
    batch = batch_of(desk, (True, False))
    answer = qout(batch, attention=bool(attention))
    if attention == "wrong":  # one column short
        answer = proto.QOut(answer.qid, "ok", "", answer.task, answer.classes,
                            (answer.tensors[0], proto.Tensor.from_numpy(
                                answer.tensors[1].numpy()[:, :-1].copy())))  # fmt: skip
    out = desk.qout(REDUCER_ID, answer, 0.03, PEERS)
    replies = [s.message for s in sends(out, CLIENT)]
    assert [r.status for r in replies] == ["reducer_error"] * 2
    assert "reducer attention" in replies[0].detail and out.rejected == "conflict"
