"""The broker's front door (services/broker/serve.py): batching, the serve join, masking,
errors and bounds, as pure logic; then the same through a real BrokerService over loopback TCP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import msgpack
import numpy as np
import pytest

from tests.helpers.broker_net import BrokerNet, recv
from traci_ml import proto
from traci_ml.services.broker.metrics import BrokerMetrics
from traci_ml.services.broker.outcomes import EXPERT, REDUCER
from traci_ml.services.broker.serve import CLIENT, ServeDesk

pytestmark = pytest.mark.timeout(30)
D, N = 4, 3
COLUMNS = ("a", "b", "c")  # expert i reads column i
EXPERTS = {i: f"e{i}".encode() for i in range(N)}
REDUCER_ID = b"red"
PEERS = (EXPERTS, REDUCER_ID)


def rows(n: int, start: float = 0.0, columns: tuple[str, ...] = COLUMNS) -> proto.Tensor:
    values = np.arange(n * len(columns), dtype=np.float32).reshape(n, len(columns)) + start
    return proto.Tensor.from_numpy(values)


def make_desk(**kw) -> tuple[ServeDesk, BrokerMetrics]:
    metrics = BrokerMetrics(N)
    settings = dict(max_batch_rows=8, max_wait=0.01, max_request_rows=16, timeout=1.0)
    settings.update(kw)
    desk = ServeDesk(view_names=[f"v{i}" for i in range(N)],
                     view_columns=[(c,) for c in COLUMNS], embed_dim=D, dtype="float32",
                     metrics=metrics.serve, **settings)  # fmt: skip
    return desk, metrics


def count(metrics: BrokerMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "traci_broker_serve_requests_total", {"outcome": outcome}
    )
    return value or 0.0


def sends(outcome, socket: str) -> list:
    return [s for s in outcome.sends if s.socket == socket]


def answer_experts(desk: ServeDesk, query: proto.Query, now: float, skip: tuple[int, ...] = ()):
    """Every expert (but ``skip``) answers ``query`` with embeddings of value id+1."""
    out = None
    for eid, rid in EXPERTS.items():
        if eid in skip:
            continue
        emb = proto.Tensor.from_numpy(np.full((query.tensors[0].shape[0], D), eid + 1, np.float32))
        out = desk.qemb(rid, proto.QEmb(query.qid, eid, proto.SERVE_OK, "", (emb,)), now, PEERS)
    return out


def occupy(desk: ServeDesk, now: float = 0.0) -> proto.Query:
    """Keep the experts busy with a one-row query from client ``busy`` (its own column
    order, so it groups with nobody): while it is out, new requests wait for company."""
    out = desk.request(b"busy", proto.Query(99, COLUMNS[::-1], (rows(1),)), now, PEERS)
    return sends(out, EXPERT)[0].message


def outputs_for(batch: proto.QBatch, columns: int = 2) -> proto.QOut:
    rows_ = batch.tensors[0].shape[0]
    values = np.arange(rows_ * columns, dtype=np.float32).reshape(rows_, columns)
    return proto.QOut(batch.qid, proto.SERVE_OK, "", "classification", ("x", "y"),
                (proto.Tensor.from_numpy(values),))  # fmt: skip


# ---- batching ----------------------------------------------------------------------------


def test_concurrent_requests_travel_together_and_split_back() -> None:
    desk, metrics = make_desk()
    occupy(desk)  # the experts are busy: requests wait for company
    for k, n in enumerate((2, 3, 1)):
        out = desk.request(
            f"c{k}".encode(), proto.Query(100 + k, COLUMNS, (rows(n, 10 * k),)), 0.0, PEERS
        )
        assert not out.sends  # waiting for company
    assert desk.next_deadline() == pytest.approx(0.01)
    out = desk.tick(0.011, PEERS)
    queries = sends(out, EXPERT)
    assert [s.routing_id for s in queries] == list(EXPERTS.values())
    query = queries[0].message
    together = np.concatenate([rows(n, 10 * k).numpy() for k, n in enumerate((2, 3, 1))])
    for eid, send in enumerate(queries):  # each expert: its own column of all 6 rows
        mine = send.message
        assert mine.qid == query.qid and mine.columns == (COLUMNS[eid],)
        assert mine.tensors[0].shape == (6, 1)
        assert np.array_equal(mine.tensors[0].numpy()[:, 0], together[:, eid])
    out = answer_experts(desk, query, 0.02)
    (batch_send,) = sends(out, REDUCER)
    batch = batch_send.message
    assert batch.present == (True, True, True) and len(batch.tensors) == N
    out = desk.qout(REDUCER_ID, outputs_for(batch), 0.03, PEERS)
    replies = {s.routing_id: s.message for s in sends(out, CLIENT)}
    assert set(replies) == {b"c0", b"c1", b"c2"}
    assert [replies[f"c{k}".encode()].qid for k in range(3)] == [100, 101, 102]
    assert all(r.status == proto.SERVE_OK and r.batch_rows == 6 for r in replies.values())
    assert replies[b"c1"].tensors[0].numpy().tolist() == [[4, 5], [6, 7], [8, 9]]
    assert replies[b"c0"].experts == (0, 1, 2) and replies[b"c0"].expert_names == ("v0", "v1", "v2")
    assert count(metrics, "ok") == 3
    assert metrics.registry.get_sample_value("traci_broker_serve_batch_rows_sum") == 1 + 6
    assert metrics.registry.get_sample_value("traci_broker_serve_latency_seconds_count") == 3


def test_an_idle_cluster_sends_a_lone_request_at_once() -> None:
    desk, _ = make_desk(max_wait=0.5)
    tensor = rows(2)
    out = desk.request(b"c0", proto.Query(1, COLUMNS, (tensor,)), 0.0, PEERS)
    queries = sends(out, EXPERT)  # no window: nobody else is being served
    assert len(queries) == N and queries[0].message.tensors[0].shape == (2, 1)
    assert desk.queued == 0 and desk.next_deadline() == pytest.approx(1.0)  # its timeout only


def test_requests_wait_only_while_the_experts_are_busy() -> None:
    desk, _ = make_desk(max_wait=0.5)
    busy = occupy(desk)
    for k in range(2):
        assert not desk.request(f"c{k}".encode(), proto.Query(k, COLUMNS, (rows(1),)), 0.001,
                                PEERS).sends  # fmt: skip
    assert desk.queued == 2
    # the last expert answers the busy query long before max_wait: the group leaves with it
    out = answer_experts(desk, busy, 0.002)
    assert len(sends(out, REDUCER)) == 1
    queries = sends(out, EXPERT)
    assert len(queries) == N and queries[0].message.tensors[0].shape == (2, 1)  # its own column
    assert desk.queued == 0


def test_reply_hops_split_the_time_in_the_broker() -> None:
    clock = iter([0.0205])  # when the reply leaves
    desk, metrics = make_desk(clock=lambda: next(clock))
    busy = occupy(desk, 0.0)
    desk.request(b"c0", proto.Query(1, COLUMNS, (rows(1),)), 0.001, PEERS)
    out = answer_experts(desk, busy, 0.003)  # c0 waited 2 ms, then went to the experts
    query = sends(out, EXPERT)[0].message
    for eid, rid in EXPERTS.items():  # the last one to answer (at 7 ms) computed for 1.5 ms
        emb = proto.Tensor.from_numpy(np.ones((1, D), np.float32))
        qemb = proto.QEmb(query.qid, eid, proto.SERVE_OK, "", (emb,), compute_us=500 + 500 * eid)
        out = desk.qemb(rid, qemb, 0.005 + eid * 0.001, PEERS)
    (batch,) = sends(out, REDUCER)
    answer = replace(outputs_for(batch.message), compute_us=9000)
    (reply,) = sends(desk.qout(REDUCER_ID, answer, 0.02, PEERS), CLIENT)
    assert reply.message.hops == (2000, 4000, 1500, 13000, 9000, 500)
    assert dict(zip(proto.SERVE_HOPS, reply.message.hops, strict=True))["reducer"] == 13000
    value = metrics.registry.get_sample_value
    assert value("traci_broker_serve_hop_seconds_sum", {"hop": "experts"}) == pytest.approx(0.004)
    assert value("traci_broker_serve_hop_seconds_count", {"hop": "queue"}) == 1  # c0's alone


def test_a_full_group_leaves_at_once_and_the_next_request_opens_another() -> None:
    desk, _ = make_desk(max_batch_rows=4)
    occupy(desk)
    assert not desk.request(b"c0", proto.Query(1, COLUMNS, (rows(3),)), 0.0, PEERS).sends
    out = desk.request(b"c1", proto.Query(2, COLUMNS, (rows(2),)), 0.0, PEERS)  # 5 > 4: c0 leaves
    assert [s.message.tensors[0].shape for s in sends(out, EXPERT)][0] == (3, 1)
    out = desk.request(b"c2", proto.Query(3, COLUMNS, (rows(2),)), 0.0, PEERS)  # 2 + 2 = 4: full
    assert sends(out, EXPERT)[0].message.tensors[0].shape == (4, 1)


def test_no_batching_sends_each_request_alone_zero_copy() -> None:
    # a view that is the whole request: the client's frame itself, forwarded (zero-copy)
    whole = ServeDesk(view_names=[f"v{i}" for i in range(N)], view_columns=[COLUMNS] * N,
                      embed_dim=D, dtype="float32", max_wait=0.0)  # fmt: skip
    tensor = rows(2)
    out = whole.request(b"c0", proto.Query(1, COLUMNS, (tensor,)), 0.0, PEERS)
    assert all(s.message.tensors[0] is tensor for s in sends(out, EXPERT))


def test_column_lists_batch_separately_and_each_expert_gets_only_its_view() -> None:
    """Whatever the request's column order and extra columns, expert i receives its own
    view's columns, in the view's order, and nothing else (need to know)."""
    desk, _ = make_desk(max_wait=0.0)
    out1 = desk.request(b"c0", proto.Query(1, COLUMNS, (rows(1),)), 0.0, PEERS)
    columns = ("c", "b", "a", "z")
    out2 = desk.request(b"c1", proto.Query(2, columns, (rows(2, 0, columns),)), 0.0, PEERS)
    assert [s.message.columns for s in sends(out1, EXPERT)] == [("a",), ("b",), ("c",)]
    sent = rows(2, 0, columns).numpy()
    for eid, send in enumerate(sends(out2, EXPERT)):
        assert send.message.columns == (COLUMNS[eid],)
        at = columns.index(COLUMNS[eid])
        assert send.message.tensors[0].numpy().tolist() == sent[:, at : at + 1].tolist()
    assert sends(out1, EXPERT)[0].message.qid != sends(out2, EXPERT)[0].message.qid


def test_each_expert_sees_only_its_own_columns_of_wide_views() -> None:
    """Views of several columns, interleaved in the request: each expert's QUERY holds
    exactly its view, in view order, with the values the client sent for those columns."""
    views = [("x3", "x0"), ("x1",), ("x2", "x4")]
    desk = ServeDesk(view_names=["p", "q", "r"], view_columns=views, embed_dim=D,
                     dtype="float32", max_wait=0.0)  # fmt: skip
    columns = ("x0", "x1", "x2", "x3", "x4", "extra")
    values = np.arange(12, dtype=np.float32).reshape(2, 6)
    out = desk.request(b"c", proto.Query(5, columns, (proto.Tensor.from_numpy(values),)), 0.0,
                       PEERS)  # fmt: skip
    for eid, send in enumerate(sends(out, EXPERT)):
        assert send.message.columns == views[eid]
        want = values[:, [columns.index(c) for c in views[eid]]]
        assert np.array_equal(send.message.tensors[0].numpy(), want)
        assert "extra" not in send.message.columns


def test_inflight_queries_are_bounded_and_launch_as_others_finish() -> None:
    desk, _ = make_desk(max_wait=0.0, max_inflight=1)
    first = sends(desk.request(b"c0", proto.Query(1, COLUMNS, (rows(1),)), 0.0, PEERS), EXPERT)
    assert first and not desk.request(b"c1", proto.Query(2, COLUMNS, (rows(1),)), 0.0, PEERS).sends
    assert desk.inflight == 1 and desk.queued == 1
    batch = sends(answer_experts(desk, first[0].message, 0.0), REDUCER)[0].message
    out = desk.qout(REDUCER_ID, outputs_for(batch), 0.0, PEERS)
    assert len(sends(out, CLIENT)) == 1 and len(sends(out, EXPERT)) == N  # the next one left


# ---- masking -----------------------------------------------------------------------------


def test_an_expert_that_does_not_answer_in_time_is_masked() -> None:
    desk, metrics = make_desk(max_wait=0.0)
    query = sends(desk.request(b"c0", proto.Query(7, COLUMNS, (rows(2),)), 0.0, PEERS), EXPERT)[0]
    assert not sends(answer_experts(desk, query.message, 0.1, skip=(1,)), REDUCER)
    assert desk.next_deadline() == pytest.approx(1.0)
    (batch,) = sends(desk.tick(1.0, PEERS), REDUCER)
    assert batch.message.present == (True, False, True)
    assert [t.numpy()[0, 0] for t in batch.message.tensors] == [1.0, 3.0]
    (reply,) = sends(desk.qout(REDUCER_ID, outputs_for(batch.message), 1.1, PEERS), CLIENT)
    assert reply.message.experts == (0, 2) and reply.message.expert_names == ("v0", "v2")
    assert metrics.registry.get_sample_value("traci_broker_serve_masked_total", {"expert": "1"})
    late = proto.QEmb(
        7, 1, proto.SERVE_OK, "", (proto.Tensor.from_numpy(np.ones((2, D), np.float32)),)
    )
    assert desk.qemb(EXPERTS[1], late, 1.2, PEERS).rejected == "unknown_query"


def test_an_expert_gone_from_the_book_is_masked_at_the_next_tick() -> None:
    desk, _ = make_desk(max_wait=0.0)
    query = sends(desk.request(b"c0", proto.Query(7, COLUMNS, (rows(2),)), 0.0, PEERS), EXPERT)[0]
    answer_experts(desk, query.message, 0.1, skip=(2,))
    fewer = ({0: EXPERTS[0], 1: EXPERTS[1]}, REDUCER_ID)
    (batch,) = sends(desk.tick(0.2, fewer), REDUCER)  # long before the timeout
    assert batch.message.present == (True, True, False)


def test_answers_only_count_from_the_expert_asked() -> None:
    desk, _ = make_desk(max_wait=0.0)
    query = sends(desk.request(b"c0", proto.Query(7, COLUMNS, (rows(2),)), 0.0, PEERS), EXPERT)[0]
    emb = proto.Tensor.from_numpy(np.ones((2, D), np.float32))
    assert desk.qemb(
        b"intruder", proto.QEmb(query.message.qid, 0, proto.SERVE_OK, "", (emb,)), 0, PEERS
    ).rejected
    wrong = proto.Tensor.from_numpy(np.ones((3, D), np.float32))  # rows of another query
    out = desk.qemb(
        EXPERTS[0], proto.QEmb(query.message.qid, 0, proto.SERVE_OK, "", (wrong,)), 0, PEERS
    )
    assert out.rejected == "conflict"  # and expert 0 is masked for this query
    (batch,) = sends(answer_experts(desk, query.message, 0.1, skip=(0,)), REDUCER)
    assert batch.message.present == (False, True, True)


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "peers", "status", "words"),
    [
        (proto.Query(1, COLUMNS, (rows(17),)), PEERS, "oversize", "17 rows"),
        (proto.Query(1, ("a", "b"), (rows(2, 0, ("a", "b")),)), PEERS, "missing_columns", "v2"),
        (proto.Query(1, COLUMNS, (rows(2),)), (EXPERTS, None), "no_reducer", "reducer"),
        (proto.Query(1, COLUMNS, (rows(2),)), ({}, REDUCER_ID), "no_expert", "expert"),
    ],
)
def test_refused_requests_get_an_error_reply_and_are_counted(query, peers, status, words) -> None:
    desk, metrics = make_desk()
    out = desk.request(b"c0", query, 0.0, peers)
    (reply,) = sends(out, CLIENT)
    assert reply.routing_id == b"c0" and reply.message.qid == 1
    assert reply.message.status == status and words in reply.message.detail
    assert not reply.message.tensors and count(metrics, status) == 1
    assert desk.queued == 0 and desk.inflight == 0


def test_a_full_queue_answers_busy() -> None:
    desk, metrics = make_desk(max_queued=2)
    occupy(desk)
    for k in range(2):
        desk.request(b"c", proto.Query(k, COLUMNS, (rows(1),)), 0.0, PEERS)
    (reply,) = sends(desk.request(b"c", proto.Query(9, COLUMNS, (rows(1),)), 0.0, PEERS), CLIENT)
    assert reply.message.status == "busy" and count(metrics, "busy") == 1


def test_missing_columns_at_an_expert_fails_the_query() -> None:
    desk, metrics = make_desk(max_wait=0.0)
    query = sends(desk.request(b"c0", proto.Query(7, COLUMNS, (rows(2),)), 0.0, PEERS), EXPERT)[0]
    refusal = proto.QEmb(query.message.qid, 1, "missing_columns", "expert-1 lacks column(s) b", ())
    desk.qemb(EXPERTS[1], refusal, 0.1, PEERS)
    (reply,) = sends(answer_experts(desk, query.message, 0.1, skip=(1,)), CLIENT)
    assert reply.message.status == "missing_columns" and "lacks" in reply.message.detail


@pytest.mark.parametrize("answered", [False, True])
def test_no_usable_expert_answer_is_an_error(answered: bool) -> None:
    desk, _ = make_desk(max_wait=0.0)
    query = sends(desk.request(b"c0", proto.Query(7, COLUMNS, (rows(2),)), 0.0, PEERS), EXPERT)[0]
    if answered:
        for eid, rid in EXPERTS.items():
            out = desk.qemb(
                rid, proto.QEmb(query.message.qid, eid, "internal", "boom", ()), 0.1, PEERS
            )
    else:
        out = desk.tick(1.0, PEERS)
    (reply,) = sends(out, CLIENT)
    assert reply.message.status == ("expert_error" if answered else "timeout")


def test_reducer_silence_loss_and_refusal_are_errors() -> None:
    desk, _ = make_desk(max_wait=0.0)
    batches = []
    for k in range(3):
        query = sends(desk.request(b"c", proto.Query(k, COLUMNS, (rows(1),)), 0.0, PEERS), EXPERT)[
            0
        ]
        batches.append(sends(answer_experts(desk, query.message, 0.0), REDUCER)[0].message)
    refused = proto.QOut(batches[0].qid, "conflict", "bad tokens", "classification", (), ())
    (reply,) = sends(desk.qout(REDUCER_ID, refused, 0.1, PEERS), CLIENT)
    assert reply.message.status == "reducer_error" and "bad tokens" in reply.message.detail
    wrong_rows = outputs_for(proto.QBatch(batches[1].qid, (True,), (rows(5),)))
    (reply,) = sends(desk.qout(REDUCER_ID, wrong_rows, 0.1, PEERS), CLIENT)
    assert reply.message.status == "reducer_error"
    (reply,) = sends(desk.tick(0.2, (EXPERTS, b"another")), CLIENT)
    assert reply.message.status == "no_reducer"
    assert desk.inflight == 0


def test_close_answers_everything_waiting_with_shutdown() -> None:
    desk, metrics = make_desk(max_inflight=1)
    desk.request(b"c0", proto.Query(1, COLUMNS, (rows(8),)), 0.0, PEERS)  # full: in flight
    desk.request(b"c1", proto.Query(2, COLUMNS, (rows(1),)), 0.0, PEERS)  # waiting
    replies = sends(desk.close(0.1), CLIENT)
    assert sorted(r.message.qid for r in replies) == [1, 2]
    assert count(metrics, "shutdown") == 2 and desk.queued == desk.inflight == 0


# ---- through a real BrokerService ----------------------------------------------------------------


@pytest.fixture
def running() -> Iterator[BrokerNet]:
    views = ", ".join(f"{{name: v{i}, columns: [{c}]}}" for i, c in enumerate(COLUMNS))
    net = BrokerNet({
        "run_id": "serve-test", "embed_dim": str(D), "reducer.heads": "1",
        "data.views": f"[{views}]", "network.heartbeat_interval": "0.05",
        "metrics.broker_port": "0", "serve.max_wait_ms": "2000",
    })  # fmt: skip
    yield net
    net.close()


def test_front_door_round_trip_and_bad_requests(running) -> None:
    broker, dealer = running.broker, running.dealer
    experts = [dealer(broker.expert_endpoint) for _ in range(N)]
    for i, sock in enumerate(experts):
        sock.send_multipart(
            proto.encode(proto.Hello("expert", "serve-test", D, "float32", expert_id=i))
        )
    for sock in experts:
        assert isinstance(recv(sock), proto.Welcome)
    reducer = dealer(broker.reducer_endpoint)
    reducer.send_multipart(
        proto.encode(proto.Hello("reducer", "serve-test", D, "float32", n_experts=N))
    )
    assert isinstance(recv(reducer), proto.Welcome)
    clients = [dealer(broker.client_endpoint) for _ in range(3)]
    # the first request finds the cluster idle and goes at once; the next two arrive while
    # the experts hold it and travel together as soon as the experts are free
    for k, client in enumerate(clients):
        client.send_multipart(proto.encode(proto.Query(k, COLUMNS, (rows(k + 1),))))
        time.sleep(0.05)  # the first is out before the others arrive; all are in
    for shape in ((1, 1), (5, 1)):  # each expert: its own column of the rows
        for i, sock in enumerate(experts):
            query = recv(sock)
            assert isinstance(query, proto.Query) and query.tensors[0].shape == shape
            assert query.columns == (COLUMNS[i],)
            emb = proto.Tensor.from_numpy(np.full((shape[0], D), i, np.float32))
            sock.send_multipart(
                proto.encode(proto.QEmb(query.qid, i, proto.SERVE_OK, "", (emb,))), copy=False
            )
        batch = recv(reducer)
        assert isinstance(batch, proto.QBatch) and batch.present == (True,) * N
        reducer.send_multipart(proto.encode(outputs_for(batch)), copy=False)
    for k, client in enumerate(clients):
        reply = recv(client)
        assert isinstance(reply, proto.Reply) and reply.qid == k and reply.status == proto.SERVE_OK
        assert reply.batch_rows == (1 if k == 0 else 5) and reply.tensors[0].shape == (k + 1, 2)
        assert len(reply.hops) == len(proto.SERVE_HOPS)
    clients[0].send_multipart([b"not msgpack", b"x"])
    reply = recv(clients[0])
    assert reply.status == "bad_request" and reply.qid == -1
    nan = proto.Tensor.from_numpy(np.full((1, 3), np.nan, np.float32))
    clients[0].send_multipart(proto.encode(proto.Query(5, COLUMNS, (nan,))))
    assert recv(clients[0]).status == "bad_request"
    header = msgpack.packb({"v": 1, "k": "ACK", "seq": 1})
    clients[1].send_multipart([header])  # a valid kind, but not for the front door
    assert recv(clients[1]).status == "bad_request"
    sample = broker.metrics.registry.get_sample_value
    assert sample("traci_broker_serve_requests_total", {"outcome": "bad_request"}) == 3
    assert sample("traci_broker_serve_requests_total", {"outcome": "ok"}) == 3
    assert sample("traci_broker_rejections_total", {"reason": "non_finite"}) == 1


def test_an_expert_id_without_a_view_is_never_sent_rows() -> None:
    """Defence in depth: the peer registry admits no expert id outside the run's views, but
    should one reach the desk, it gets no QUERY (no columns to give it) and is not waited
    for: the others answer and the request is served."""
    desk, _ = make_desk(max_wait=0.0)
    peers = ({**EXPERTS, N: b"stranger"}, REDUCER_ID)
    out = desk.request(b"c0", proto.Query(1, COLUMNS, (rows(1),)), 0.0, peers)
    assert [s.routing_id for s in sends(out, EXPERT)] == list(EXPERTS.values())
    query = sends(out, EXPERT)[0].message
    assert len(sends(answer_experts(desk, query, 0.001), REDUCER)) == 1  # nobody else awaited
