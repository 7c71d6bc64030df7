"""The broker relays model selection's decision (docs/protocol.md "Model selection"): the
reducer's ACK reaches the step's experts as it is, and the broker's heartbeats to experts
carry the latest decision it saw -- from those ACKs, or from a reducer's HELLO (a restarted
broker) -- so an expert that missed it learns it within one heartbeat interval."""

from __future__ import annotations

import msgpack
import pytest

from tests.broker.test_join import RED, emb, make_book, reducer_hello, rid, sent, started
from traci_ml import proto
from traci_ml.core.errors import ProtocolError
from traci_ml.proto import Ack, Heartbeat
from traci_ml.services.broker.outcomes import EXPERT, REDUCER

pytestmark = pytest.mark.timeout(10)


def test_acks_carry_the_decision_and_the_heartbeats_repeat_the_latest() -> None:
    book = started(2)
    assert book.expert_heartbeat == Heartbeat()  # nothing decided: the plain heartbeat
    for i in range(2):
        book.emb(rid(i), emb(0, i, phase="eval"), 0.0)
    decided = Ack(0, decided=0, best=0)
    out = book.ack(RED, decided, 0.1)
    assert sent(out, Ack) == [(rid(0), decided), (rid(1), decided)]
    assert book.expert_heartbeat == Heartbeat(decided=0, best=0)
    for i in range(2):
        book.emb(rid(i), emb(1, i, phase="eval"), 0.2)
    book.ack(RED, Ack(1, decided=3, best=2, stopped=3), 0.3)
    assert book.expert_heartbeat == Heartbeat(3, 2, 3)
    assert book.ack(b"not-the-reducer", Ack(1, decided=9, best=9), 0.4).rejected
    assert book.expert_heartbeat == Heartbeat(3, 2, 3)  # only the registered reducer decides


def test_a_restarted_broker_learns_the_decision_from_the_reducers_hello() -> None:
    book = make_book(2)
    book.hello(REDUCER, RED, reducer_hello(decided=4, best=1), 0.0)
    assert book.expert_heartbeat == Heartbeat(decided=4, best=1)
    book.hello(EXPERT, rid(0), reducer_hello(), 0.0)  # nothing an expert says changes it
    assert book.expert_heartbeat == Heartbeat(decided=4, best=1)


def test_the_decision_fields_are_left_out_while_unset() -> None:
    assert proto.encode(Ack(7)) == proto.encode(Ack(7, -1, -1, -1))
    assert len(proto.encode(Ack(7, decided=0))[0]) > len(proto.encode(Ack(7))[0])
    for msg in (Ack(7, 2, 1, -1), Heartbeat(0, 0, 0), reducer_hello(decided=5, best=5)):
        assert proto.decode(proto.encode(msg)) == msg
    bad = [msgpack.packb({"v": 1, "k": "ACK", "seq": 7, "best": -5})]
    with pytest.raises(ProtocolError, match="out of range"):
        proto.decode(bad)
