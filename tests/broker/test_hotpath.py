"""The broker's hot-path shortcuts keep its contract: buffered metrics show every message and
step on the next scrape, the shared empty outcome cannot be written, and an EMB from the fast
decoder (built without ``Emb.__init__``) gets exactly what a constructed ``Emb`` gets."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from traci_ml import proto
from traci_ml.core.config import load_config
from traci_ml.services.broker.join import JoinBook
from traci_ml.services.broker.metrics import BrokerMetrics
from traci_ml.services.broker.outcomes import EXPERT, NOTHING, REDUCER
from traci_ml.services.broker.service import BrokerService

pytestmark = pytest.mark.timeout(20)


def sample(metrics: BrokerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_buffered_counts_and_observations_show_on_the_next_scrape() -> None:
    metrics = BrokerMetrics(2)
    for _ in range(5):
        metrics.message("EMB", "in")
    metrics.message("BATCH", "out")
    metrics.message("QEMB", "in")  # a kind made later still gets its series
    for wait in (0.001, 0.002):
        metrics.released(wait)
    metrics.dispatched(0.003)
    name = "traci_broker_messages_total"
    assert sample(metrics, name, kind="EMB", direction="in") == 5
    assert sample(metrics, name, kind="BATCH", direction="out") == 1
    assert sample(metrics, name, kind="QEMB", direction="in") == 1
    assert sample(metrics, "traci_broker_steps_released_total") == 2
    assert sample(metrics, "traci_broker_join_wait_seconds_count") == 2
    assert sample(metrics, "traci_broker_join_wait_seconds_sum") == pytest.approx(0.003)
    assert sample(metrics, "traci_broker_queue_latency_seconds_count") == 1
    # scraping again (or the tick's flush) counts nothing twice
    metrics.flush()
    assert sample(metrics, name, kind="EMB", direction="in") == 5
    assert sample(metrics, "traci_broker_queue_latency_seconds_count") == 1


def test_the_tick_flushes_without_a_scrape() -> None:
    metrics = BrokerMetrics(1)
    metrics.dispatched(0.25)
    metrics.set_state(pending=0, dispatched=0, registered=1, live=1, expert_up={0: True},
                      reducer_up=True)  # fmt: skip
    assert not metrics._queue_latencies  # moved into the histogram, nothing piles up
    assert metrics.queue_latency._sum.get() == pytest.approx(0.25)


def test_counting_while_scraping_loses_nothing() -> None:
    metrics = BrokerMetrics(1)
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            metrics.flush()

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for _ in range(20000):
            metrics.message("EMB", "in")
            metrics.dispatched(0.001)
    finally:
        done.set()
        scraper.join()
    assert sample(metrics, "traci_broker_messages_total", kind="EMB", direction="in") == 20000
    assert sample(metrics, "traci_broker_queue_latency_seconds_count") == 20000


def test_the_shared_empty_outcome_cannot_be_written() -> None:
    assert not NOTHING.sends and NOTHING.rejected is None and not NOTHING.skipped
    with pytest.raises(AttributeError):
        NOTHING.sends.append(None)  # type: ignore[attr-defined]


def book_with(n_experts: int) -> JoinBook:
    book = JoinBook(n_experts=n_experts, run_id="run", embed_dim=4, dtype="float32", window=4,
                    max_pending_steps=8, liveness=1.0, step_timeout=10.0)  # fmt: skip
    for i in range(n_experts):
        book.hello(
            EXPERT, f"e{i}".encode(), proto.Hello("expert", "run", 4, "float32", expert_id=i), 0
        )
    book.hello(REDUCER, b"red", proto.Hello("reducer", "run", 4, "float32", n_experts=n_experts), 0)
    return book


def emb(seq: int, expert_id: int, *, width: int = 4, phase: str = "train") -> proto.Emb:
    return proto.Emb(
        seq, expert_id, phase, proto.Tensor.from_numpy(np.ones((2, width), np.float32))
    )


EMBS = [  # (routing id, message) in order, with every kind of refusal along the way
    (b"e0", emb(0, 0)), (b"e1", emb(0, 1)), (b"e1", emb(0, 1)),  # the last: duplicate
    (b"e0", emb(2, 0)), (b"e0", emb(1, 0)), (b"e1", emb(2, 1, width=3)),  # conflict
    (b"e1", emb(1, 1, phase="eval")),  # conflict with the first EMB of step 1
    (b"e9", emb(3, 0)), (b"e0", emb(3, 1)),  # unregistered, impersonation
    (b"e0", emb(0, 0)), (b"e0", emb(50, 0)), (b"e1", emb(3, 1)),  # late, too far ahead
]  # fmt: skip


def test_a_fast_decoded_emb_decides_what_emb_decides() -> None:
    slow, quick = book_with(2), book_with(2)
    for routing_id, msg in EMBS:
        decoded = proto.fast.quick(proto.wire.encode(msg), False)  # the broker's decode of an EMB
        assert type(decoded) is proto.Emb and decoded == msg
        a = slow.emb(routing_id, msg, 1.0)
        b = quick.emb(routing_id, decoded, 1.0)
        assert (a.rejected, a.detail, a.skipped, list(a.dropped)) == (
            b.rejected, b.detail, b.skipped, list(b.dropped))  # fmt: skip
        assert [(s.socket, s.routing_id, s.message) for s in a.sends] == [
            (s.socket, s.routing_id, s.message) for s in b.sends
        ]
    assert (slow.next_seq, slow.pending_steps, slow.dispatched_steps) == (
        quick.next_seq, quick.pending_steps, quick.dispatched_steps)  # fmt: skip


def test_an_emb_that_releases_nothing_gets_the_shared_empty_outcome() -> None:
    book = book_with(2)
    out = book.emb(b"e0", emb(0, 0), 0.0)  # the head: a fresh outcome, nothing released yet
    assert out is not NOTHING and not out.sends
    assert book.emb(b"e0", emb(1, 0), 0.0) is NOTHING  # step 1 waits behind step 0
    out = book.emb(b"e1", emb(0, 1), 0.0)
    assert [s.message.seq for s in out.sends] == [0]  # type: ignore[attr-defined]
    out = book.emb(b"e1", emb(1, 1), 0.0)
    assert [s.message.seq for s in out.sends] == [1]  # type: ignore[attr-defined]


def test_every_kind_enters_through_one_table_and_emb_straight_to_the_book() -> None:
    config = load_config(overrides={"run_id": "run", "embed_dim": "4", "reducer.heads": "1",
                                    "data.views": "[{name: v0, columns: [c0]}]",
                                    "metrics.broker_port": "0"}, env={})  # fmt: skip
    broker = BrokerService(config, expert_endpoint="tcp://127.0.0.1:*",
                           reducer_endpoint="tcp://127.0.0.1:*")  # fmt: skip
    try:
        table = broker._handlers
        assert table[EXPERT][proto.Emb] == broker.book.emb  # no wrapper on the hot path
        expert_kinds = {proto.Emb, proto.Hello, proto.Heartbeat, proto.Goodbye, proto.Align,
                        proto.QEmb}  # fmt: skip
        assert set(table[EXPERT]) == expert_kinds
        reducer_kinds = {proto.Grad, proto.Ack, proto.Drop, proto.Hello, proto.Heartbeat,
                         proto.Goodbye, proto.Align, proto.QOut}  # fmt: skip
        assert set(table[REDUCER]) == reducer_kinds
        assert set(table["client"]) == {proto.Query}
    finally:
        broker.close()
