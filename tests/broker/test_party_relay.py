"""Issue 10 at the broker ("data where it lives"): ALIGN relayed between an expert and the
reducer, row bitmaps joined from EMB into BATCH, and served queries by id: fanned out once
per batch, answered per request with its own rows and who took part in each. Pure logic on
the books first, then a real BrokerService over loopback TCP with DEALER peers and a Client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq

from tests.helpers.broker_net import BrokerNet, recv
from traci_ml import proto
from traci_ml.app.client import Client, Prediction, ServeError, _as_ids
from traci_ml.services.broker.join import JoinBook
from traci_ml.services.broker.outcomes import EXPERT, REDUCER, Outcome
from traci_ml.services.broker.serve import CLIENT, ServeDesk

pytestmark = pytest.mark.timeout(30)
D, N = 4, 3
RUN_ID = "parties-test"
COLUMNS = ("a", "b", "c")  # expert i reads column i
EXPERTS = {i: f"e{i}".encode() for i in range(N)}
RED = b"red"
PEERS = (EXPERTS, RED)


def mask(*present: int, n: int) -> bytes:
    """The bitmap of ``n`` rows where exactly the rows ``present`` are."""
    rows = np.zeros(n, bool)
    rows[list(present)] = True
    return proto.pack_rows(rows)


def emb_tensor(rows: int, value: float = 1.0) -> proto.Tensor:
    return proto.Tensor.from_numpy(np.full((rows, D), value, np.float32))


def sends(out: Outcome, socket: str | None = None, kind: type | None = None) -> list[Any]:
    return [
        (s.routing_id, s.message)
        for s in out.sends
        if (socket is None or s.socket == socket) and (kind is None or isinstance(s.message, kind))
    ]


# ---- the join book: ALIGN and row bitmaps ----------------------------------------------------


def make_book(n_experts: int = N, *, reducer: bool = True) -> JoinBook:
    book = JoinBook(n_experts=n_experts, run_id="run", embed_dim=D, dtype="float32", window=4,
                    max_pending_steps=8, liveness=100.0, step_timeout=10.0)  # fmt: skip
    for i in range(n_experts):
        book.hello(EXPERT, EXPERTS[i], proto.Hello("expert", "run", D, "float32", expert_id=i), 0.0)
    if reducer:
        book.hello(
            REDUCER, RED, proto.Hello("reducer", "run", D, "float32", n_experts=n_experts), 0.0
        )
    return book


def test_book_relays_align_and_answers_wait_without_a_reducer() -> None:
    book = make_book(reducer=False)
    ask = proto.Align(
        1, "plain", "int", (3,), (proto.Tensor.from_numpy(np.arange(3, dtype="<i8")),)
    )
    out = book.peers.align(EXPERT, EXPERTS[1], ask, 0.0)
    assert out.rejected is None
    assert sends(out) == [(EXPERTS[1], proto.Align(1, "wait", "no reducer is registered yet"))]
    book.hello(REDUCER, RED, proto.Hello("reducer", "run", D, "float32", n_experts=N), 0.0)
    out = book.peers.align(EXPERT, EXPERTS[1], ask, 0.0)
    [(to, relayed)] = sends(out, REDUCER)
    assert to == RED and relayed is ask  # the very message: its frames go on as they came
    answer = proto.Align(1, "answer", "", (2,), ask.tensors)
    out = book.peers.align(REDUCER, RED, answer, 0.0)
    assert sends(out) == [(EXPERTS[1], answer)] and out.rejected is None


@pytest.mark.parametrize(
    ("socket", "routing_id", "msg", "reason", "goodbye"),
    [
        (EXPERT, b"stranger", proto.Align(0, "plain"), "unregistered", True),
        (EXPERT, EXPERTS[0], proto.Align(1, "plain"), "impersonation", False),
        (EXPERT, EXPERTS[0], proto.Align(0, "answer"), "unexpected_kind", False),
        (EXPERT, EXPERTS[0], proto.Align(0, "wait"), "unexpected_kind", False),
        (REDUCER, b"stranger", proto.Align(0, "answer"), "unregistered", True),
        (REDUCER, RED, proto.Align(0, "psi"), "unexpected_kind", False),
        (REDUCER, RED, proto.Align(7, "answer"), "align_undeliverable", False),
    ],
)
def test_book_refuses_align_with_a_named_reason(socket, routing_id, msg, reason, goodbye) -> None:
    out = make_book().peers.align(socket, routing_id, msg, 0.0)
    assert out.rejected == reason
    assert sends(out) == ([(routing_id, proto.Goodbye("unregistered"))] if goodbye else [])


def test_book_sends_no_align_to_a_gone_expert() -> None:
    book = make_book()
    book.goodbye(EXPERT, EXPERTS[2], proto.Goodbye("shutdown"), 0.1)
    out = book.peers.align(REDUCER, RED, proto.Align(2, "error", "no labels"), 0.0)
    assert out.rejected == "align_undeliverable" and not out.sends


def test_batch_rows_carry_each_present_experts_bitmap() -> None:
    book = make_book()
    bits0, none = mask(0, 2, n=3), mask(n=3)  # expert 2 lacks every row of step 0: valid
    book.emb(EXPERTS[0], proto.Emb(0, 0, "train", emb_tensor(3), bits0), 0.0)
    book.emb(EXPERTS[1], proto.Emb(0, 1, "train", emb_tensor(3)), 0.0)
    out = book.emb(EXPERTS[2], proto.Emb(0, 2, "train", emb_tensor(3), none), 0.0)
    [(_, batch)] = sends(out, REDUCER, proto.Batch)
    assert batch.present == (True, True, True) and batch.rows == (bits0, b"", none)
    for i in range(N):  # nobody sends a bitmap: rows is (), the BATCH is today's
        out = book.emb(EXPERTS[i], proto.Emb(1, i, "train", emb_tensor(3)), 0.0)
    [(_, batch)] = sends(out, REDUCER, proto.Batch)
    assert batch.rows == ()


def test_batch_rows_follow_the_present_experts_when_one_is_masked() -> None:
    book = make_book()
    book.emb(EXPERTS[0], proto.Emb(0, 0, "eval", emb_tensor(3)), 0.0)
    book.emb(EXPERTS[2], proto.Emb(0, 2, "eval", emb_tensor(3), mask(1, n=3)), 0.0)
    [(_, batch)] = sends(book.tick(11.0), REDUCER, proto.Batch)  # expert 1 overdue: masked
    assert batch.present == (True, False, True) and batch.rows == (b"", mask(1, n=3))
    assert proto.decode(proto.encode(batch)) == batch


def test_bitmaps_too_large_for_one_header_drop_the_step() -> None:
    book = make_book()
    rows = 8 * (proto.MAX_HEADER_BYTES // 3) + 8  # three bitmaps of more than a third each
    bits = mask(0, n=rows)
    tensor = proto.Tensor.from_numpy(np.zeros((rows, D), np.float32))
    for i in range(N):
        out = book.emb(EXPERTS[i], proto.Emb(0, i, "train", tensor, bits), 0.0)
    assert not sends(out, REDUCER)
    assert sorted(sends(out, EXPERT, proto.Drop)) == [
        (EXPERTS[i], proto.Drop(0, "oversize")) for i in range(N)
    ]
    assert out.dropped == ["oversize"] and book.dispatched_steps == book.pending_steps == 0


# ---- the serve desk: queries by id -----------------------------------------------------------


def make_desk(**kw: Any) -> ServeDesk:
    settings = dict(max_batch_rows=8, max_wait=0.01, max_request_rows=6, timeout=1.0)
    settings.update(kw)
    return ServeDesk(view_names=[f"v{i}" for i in range(N)],
                     view_columns=[(c,) for c in COLUMNS], embed_dim=D, dtype="float32",
                     **settings)  # fmt: skip


def occupy(desk: ServeDesk) -> None:
    """Keep the experts busy with a one-row query that groups with nobody (its own column
    order): while it is out, new requests wait for company."""
    rows = proto.Tensor.from_numpy(np.ones((1, len(COLUMNS)), np.float32))
    assert sends(desk.request(b"busy", proto.Query(99, COLUMNS[::-1], (rows,)), 0.0, PEERS),
                 EXPERT)  # fmt: skip


def by_ids(qid: int, *ids: Any) -> proto.Query:
    return proto.Query(qid, (), (), ids)


def outputs(qid: int, rows: int) -> proto.QOut:
    """The reducer's answer: row k's value is 10 k."""
    values = np.arange(rows, dtype=np.float32).reshape(rows, 1) * 10
    return proto.QOut(qid, proto.SERVE_OK, "", "regression", (), (proto.Tensor.from_numpy(values),))


def test_id_requests_batch_apart_from_columns_and_by_id_type() -> None:
    desk = make_desk()
    occupy(desk)
    rows = proto.Tensor.from_numpy(np.ones((1, 3), np.float32))
    desk.request(b"c0", proto.Query(1, COLUMNS, (rows,)), 0.0, PEERS)
    desk.request(b"c1", by_ids(2, 5, 6), 0.0, PEERS)
    desk.request(b"c2", by_ids(3, "5", "x"), 0.0, PEERS)  # "5" is no 5: another group
    desk.request(b"c3", by_ids(4, 6, 7), 0.0, PEERS)  # 6 again: one row for both
    queries = [m for _, m in sends(desk.tick(0.02, PEERS), EXPERT)]
    assert len(queries) == 3 * N
    by_kind = {(q.columns, q.ids) for q in queries}
    views = {((c,), ()) for c in COLUMNS}  # by rows: each expert its own column
    assert by_kind == views | {((), (5, 6, 7)), ((), ("5", "x"))}
    assert all(not q.tensors for q in queries if q.ids)
    assert desk.inflight == 1 + 3 and desk.queued == 0


def answer(
    desk: ServeDesk, query: proto.Query, rows: dict[int, bytes], now: float = 0.0
) -> Outcome:
    """Every expert answers ``query``; ``rows``: the bitmap of each expert that sends one."""
    n = len(query.ids) if query.ids else query.tensors[0].shape[0]
    out = Outcome()
    for eid, rid in EXPERTS.items():
        qemb = proto.QEmb(
            query.qid, eid, proto.SERVE_OK, "", (emb_tensor(n, eid),), rows.get(eid, b"")
        )
        out = desk.qemb(rid, qemb, now, PEERS)
    return out


def test_id_query_rows_go_to_the_reducer_and_back_per_request() -> None:
    desk = make_desk()
    occupy(desk)
    desk.request(b"c0", by_ids(10, 5, 6), 0.0, PEERS)
    desk.request(b"c1", by_ids(11, 7, 5, 8), 0.0, PEERS)  # 5 is asked by both
    [query] = {m for _, m in sends(desk.tick(0.02, PEERS), EXPERT)}
    assert query.ids == (5, 6, 7, 8)
    # expert 0 holds 5 and 7; expert 1 every row; expert 2 none of them (still listed)
    held = {0: mask(0, 2, n=4), 2: mask(n=4)}
    [(_, batch)] = sends(answer(desk, query, held), REDUCER)
    assert isinstance(batch, proto.QBatch) and batch.rows == (held[0], b"", held[2])
    assert proto.decode(proto.encode(batch)) == batch
    replies = dict(sends(desk.qout(RED, outputs(batch.qid, 4), 0.1, PEERS), CLIENT))
    first, second = replies[b"c0"], replies[b"c1"]
    assert first.experts == second.experts == (0, 1, 2) and first.batch_rows == 4
    assert first.tensors[0].numpy().ravel().tolist() == [0.0, 10.0]  # ids 5, 6
    assert second.tensors[0].numpy().ravel().tolist() == [20.0, 0.0, 30.0]  # ids 7, 5, 8
    # rows of the request: expert 0 took part in 5 (not 6); in 7 and 5 (not 8)
    assert first.rows == (mask(0, n=2), b"", mask(n=2))
    assert second.rows == (mask(0, 1, n=3), b"", mask(n=3))
    for reply in (first, second):
        assert proto.decode(proto.encode(reply)) == reply


def test_replies_carry_no_rows_when_every_expert_held_every_row() -> None:
    desk = make_desk(max_wait=0.0)
    [(_, query), *_] = sends(desk.request(b"c0", by_ids(1, "a", "b"), 0.0, PEERS), EXPERT)
    out = answer(desk, query, {1: b""})
    [(_, batch)] = sends(out, REDUCER)
    assert batch.rows == ()
    [(_, reply)] = sends(desk.qout(RED, outputs(batch.qid, 2), 0.1, PEERS), CLIENT)
    assert reply.status == proto.SERVE_OK and reply.rows == ()


def test_column_queries_carry_bitmaps_too() -> None:
    desk = make_desk()
    occupy(desk)
    for k, n in enumerate((2, 1)):
        rows = proto.Tensor.from_numpy(np.ones((n, 3), np.float32))
        desk.request(f"c{k}".encode(), proto.Query(k, COLUMNS, (rows,)), 0.0, PEERS)
    query = sends(desk.tick(0.02, PEERS), EXPERT)[0][1]
    [(_, batch)] = sends(answer(desk, query, {2: mask(0, 2, n=3)}), REDUCER)
    replies = dict(sends(desk.qout(RED, outputs(batch.qid, 3), 0.1, PEERS), CLIENT))
    assert replies[b"c0"].rows == (b"", b"", mask(0, n=2))
    assert replies[b"c1"].rows == ()  # its one row: every expert took part


@pytest.mark.parametrize(
    ("query", "words"),
    [
        (by_ids(1, *range(7)), "7 rows > serve.max_request_rows 6"),
        (by_ids(1, *(f"{k:0>1000}" for k in range(66))), "bytes > 65280 for one query"),
    ],
)
def test_id_requests_are_bounded(query: proto.Query, words: str) -> None:
    desk = make_desk()
    desk.max_request_rows = 6 if len(query.ids) == 7 else 100
    [(_, reply)] = sends(desk.request(b"c", query, 0.0, PEERS), CLIENT)
    assert reply.status == "oversize" and words in reply.detail
    assert desk.queued == desk.inflight == 0


def test_id_requests_need_no_columns() -> None:
    desk = make_desk(max_wait=0.0)  # every view reads a column; by id none is sent
    out = desk.request(b"c", by_ids(1, 3), 0.0, PEERS)
    assert len(sends(out, EXPERT)) == N and not sends(out, CLIENT)


def test_a_full_id_group_leaves_and_the_next_opens() -> None:
    desk = make_desk(max_batch_rows=4)
    occupy(desk)
    assert not desk.request(b"c0", by_ids(1, 1, 2, 3), 0.0, PEERS).sends
    assert not desk.request(b"c1", by_ids(2, 3, 2, 1), 0.0, PEERS).sends  # nothing new: joins
    out = desk.request(b"c2", by_ids(3, 4, 5), 0.0, PEERS)  # 3 + 2 > 4: the group leaves
    assert {m.ids for _, m in sends(out, EXPERT)} == {(1, 2, 3)}
    out = desk.tick(0.02, PEERS)
    assert {m.ids for _, m in sends(out, EXPERT)} == {(4, 5)}


# ---- through a real BrokerService ----------------------------------------------------------------


class Net(BrokerNet):
    """A broker on random loopback ports (its loop in a thread) and the test's DEALERs."""

    def __init__(self, n_experts: int = N) -> None:
        views = ", ".join(f"{{name: v{i}, columns: [{COLUMNS[i]}]}}" for i in range(n_experts))
        super().__init__({
            "run_id": RUN_ID, "embed_dim": str(D), "reducer.heads": "1",
            "data.views": f"[{views}]", "network.heartbeat_interval": "0.05",
            "network.liveness": "5.0", "metrics.broker_port": "0", "serve.max_wait_ms": "30",
        })  # fmt: skip

    def expert(self, expert_id: int) -> zmq.Socket:
        sock = self.dealer(self.broker.expert_endpoint)
        send(sock, proto.Hello("expert", RUN_ID, D, "float32", expert_id=expert_id))
        return sock

    def reducer(self) -> zmq.Socket:
        sock = self.dealer(self.broker.reducer_endpoint)
        send(sock, proto.Hello("reducer", RUN_ID, D, "float32", n_experts=N))
        assert isinstance(recv(sock), proto.Welcome)
        return sock

    def sample(self, name: str, **labels: str) -> float:
        return self.broker.metrics.registry.get_sample_value(name, labels) or 0.0

    def rejections(self, reason: str) -> float:
        return self.sample("traci_broker_rejections_total", reason=reason)


@pytest.fixture
def net() -> Iterator[Net]:
    network = Net()
    yield network
    network.close()


def send(sock: zmq.Socket, msg: proto.Message) -> None:
    sock.send_multipart(proto.encode(msg), copy=False)


def quiet(sock: zmq.Socket, wait: float = 0.2) -> None:
    with pytest.raises(AssertionError, match="nothing arrived"):
        raise RuntimeError(f"unexpected {recv(sock, wait)}")


def wait_for(condition: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def blobs() -> tuple[proto.Tensor, ...]:
    ids = np.array([3, -1, 2**63 - 1], "<i8")
    raw = np.frombuffer(bytes(range(256)), np.uint8)
    return proto.Tensor.from_numpy(ids), proto.Tensor.from_numpy(raw)


def same_tensors(a: tuple[proto.Tensor, ...], b: tuple[proto.Tensor, ...]) -> bool:
    return [(t.dtype, t.shape, bytes(t.buffer)) for t in a] == [
        (t.dtype, t.shape, bytes(t.buffer)) for t in b
    ]


def test_align_waits_for_a_reducer_then_travels_both_ways(net: Net) -> None:
    experts = [net.expert(i) for i in range(N - 1)]  # the start gate is still closed:
    ask = proto.Align(1, "psi", "str", (3, 256), blobs())  # alignment comes before training
    send(experts[1], ask)
    assert recv(experts[1]) == proto.Align(1, "wait", "no reducer is registered yet")
    experts.append(net.expert(N - 1))
    for sock in experts:  # every expert registered: the gate opens
        assert isinstance(recv(sock), proto.Welcome)
    reducer = net.reducer()
    send(experts[1], ask)
    got = recv(reducer)
    assert isinstance(got, proto.Align) and (got.expert_id, got.stage, got.detail, got.counts) == (
        1, "psi", "str", (3, 256))  # fmt: skip
    assert same_tensors(got.tensors, ask.tensors)
    answer = proto.Align(1, "answer", "", (2,), (proto.Tensor.from_numpy(np.array([0, 2], "<i8")),))
    send(reducer, answer)
    back = recv(experts[1])
    assert isinstance(back, proto.Align) and back.stage == "answer" and back.counts == (2,)
    assert same_tensors(back.tensors, answer.tensors)
    quiet(experts[0], 0.1)
    wait_for(lambda: net.sample("traci_broker_align_total", stage="answer") == 1)
    assert net.sample("traci_broker_align_total", stage="psi") == 1
    assert net.sample("traci_broker_align_total", stage="wait") == 1
    assert net.sample("traci_broker_messages_total", kind="ALIGN", direction="in") == 3
    assert net.sample("traci_broker_messages_total", kind="ALIGN", direction="out") == 3


def test_hostile_align_is_refused_counted_and_the_run_goes_on(net: Net) -> None:
    experts = [net.expert(i) for i in range(N)]
    reducer = net.reducer()
    for sock in experts:
        assert isinstance(recv(sock), proto.Welcome)
    send(experts[0], proto.Align(2, "plain"))  # impersonation
    send(experts[0], proto.Align(0, "answer"))  # a reducer's stage from an expert
    send(reducer, proto.Align(0, "plain"))  # an expert's stage from the reducer
    send(reducer, proto.Align(9, "answer"))  # nobody to deliver to (and no expert 9 at all)
    experts[0].send_multipart(
        proto.encode(proto.Align(0, "plain"))[:1] + [b"x"]
    )  # a frame too many
    stranger = net.dealer(net.broker.expert_endpoint)
    send(stranger, proto.Align(0, "plain"))
    assert recv(stranger) == proto.Goodbye("unregistered")
    fake_reducer = net.dealer(net.broker.reducer_endpoint)
    send(fake_reducer, proto.Align(0, "answer"))
    assert recv(fake_reducer) == proto.Goodbye("unregistered")
    client = net.dealer(net.broker.client_endpoint)
    send(client, proto.Align(0, "plain", tensors=blobs()))  # the front door takes QUERY only
    reply = recv(client)
    assert isinstance(reply, proto.Reply) and reply.status == "bad_request"
    assert "ALIGN is not expected" in reply.detail
    expected = {"impersonation": 1, "unexpected_kind": 3, "align_undeliverable": 1,
                "unregistered": 2, "frame_count": 1}  # fmt: skip
    wait_for(lambda: all(net.rejections(r) == n for r, n in expected.items()))
    quiet(reducer, 0.05)
    for sock in experts:
        quiet(sock, 0.05)
    for i, sock in enumerate(experts):  # training is untouched
        send(sock, proto.Emb(0, i, "train", emb_tensor(2, i)))
    batch = recv(reducer)
    assert isinstance(batch, proto.Batch) and batch.present == (True,) * N and batch.rows == ()
    assert net.broker.book.peers.live_experts == N and net.thread.is_alive()


def test_batch_carries_the_row_bitmaps_of_the_embs(net: Net) -> None:
    experts = [net.expert(i) for i in range(N)]
    reducer = net.reducer()
    for sock in experts:
        assert isinstance(recv(sock), proto.Welcome)
    held = [mask(0, 4, n=5), b"", mask(n=5)]
    for i, sock in enumerate(experts):
        send(sock, proto.Emb(0, i, "train", emb_tensor(5, i), held[i]))
    batch = recv(reducer)
    assert isinstance(batch, proto.Batch) and batch.rows == tuple(held)
    assert [proto.unpack_rows(b, 5).tolist() for b in batch.rows][0] == [
        True,
        False,
        False,
        False,
        True,
    ]
    send(reducer, proto.Grad(0, -1, tuple(emb_tensor(5) for _ in range(N))))
    for sock in experts:
        assert isinstance(recv(sock), proto.Grad)
    bad = proto.encode(
        proto.Emb(1, 0, "train", emb_tensor(5), b"\xff")
    )  # padding bits set: malformed
    experts[0].send_multipart(bad, copy=False)
    assert recv(experts[0]) == proto.Drop(1, "bad_field")
    wait_for(lambda: net.rejections("bad_field") == 1)


def serve_cluster(net: Net) -> tuple[list[zmq.Socket], zmq.Socket]:
    experts = [net.expert(i) for i in range(N)]
    reducer = net.reducer()
    for sock in experts:
        assert isinstance(recv(sock), proto.Welcome)
    return experts, reducer


def play_parties(
    experts: list[zmq.Socket], reducer: zmq.Socket, holds: dict[int, set], done: Any
) -> list[proto.QBatch]:
    """Fake parties until ``done()``: expert ``e`` answers each query by id with a bitmap of
    the ids in ``holds[e]`` (an expert 1 that holds every row sends none); the reducer
    answers each row with its id as the value. Returns the QBATCHes the reducer saw."""
    ids_of: dict[int, tuple] = {}
    batches: list[proto.QBatch] = []
    deadline = time.monotonic() + 10.0
    while not done():
        assert time.monotonic() < deadline, "the clients got no answer"
        for eid, sock in enumerate(experts):
            while sock.poll(0):
                query = proto.decode(sock.recv_multipart())
                if isinstance(query, proto.Query):
                    assert query.ids and not query.tensors and query.columns == ()
                    ids_of[query.qid] = query.ids
                    bits = proto.pack_rows(np.array([i in holds[eid] for i in query.ids]))
                    tensor = emb_tensor(len(query.ids), eid)
                    send(sock, proto.QEmb(query.qid, eid, proto.SERVE_OK, "", (tensor,), bits))
        if reducer.poll(5):
            batch = proto.decode(reducer.recv_multipart())
            if isinstance(batch, proto.QBatch):
                batches.append(batch)
                values = np.array([[float(i)] for i in ids_of[batch.qid]], np.float32)
                answer = proto.QOut(
                    batch.qid,
                    proto.SERVE_OK,
                    "",
                    "regression",
                    (),
                    (proto.Tensor.from_numpy(values),),
                )
                send(reducer, answer)
    return batches


def test_client_predicts_by_id_through_the_broker(net: Net) -> None:
    experts, reducer = serve_cluster(net)
    results: dict[str, Any] = {}

    def ask(name: str, ids: Any) -> None:
        with Client(net.broker.client_endpoint, timeout=10.0) as client:
            try:
                results[name] = client.predict_ids(ids)
            except ServeError as exc:  # shown by the assertions below
                results[name] = exc

    threads = [threading.Thread(target=ask, args=("ints", np.array([11, 12, 13]))),
               threading.Thread(target=ask, args=("more", [13, 14]))]  # fmt: skip
    for thread in threads:
        thread.start()
    holds = {0: {11, 13}, 1: {11, 12, 13, 14}, 2: set()}  # expert 2 holds none of them
    batches = play_parties(experts, reducer, holds, lambda: len(results) == 2)
    for thread in threads:
        thread.join(10)
    ints, more = results["ints"], results["more"]
    assert isinstance(ints, Prediction) and isinstance(more, Prediction)
    assert ints.values.tolist() == [11.0, 12.0, 13.0] and more.values.tolist() == [13.0, 14.0]
    assert ints.experts == more.experts == (0, 1, 2)  # expert 2 took part in no row: listed
    assert ints.row_experts == ((0, 1), (1,), (0, 1))
    assert more.row_experts == ((0, 1), (1,))
    for batch in batches:
        assert batch.present == (True,) * N and batch.rows[1] == b""
        assert not proto.unpack_rows(batch.rows[2], batch.tensors[0].shape[0]).any()
    if len(batches) == 1:  # within serve.max_wait_ms of each other: one query, 13 once
        assert ints.batch_rows == more.batch_rows == 4


def test_client_predict_by_str_id_and_errors_name_the_cause(net: Net) -> None:
    experts, reducer = serve_cluster(net)
    result: list[Any] = []

    def ask() -> None:
        with Client(net.broker.client_endpoint, timeout=10.0) as client:
            result.append(client.predict_ids(np.array(["x", "y"])))

    thread = threading.Thread(target=ask)
    thread.start()
    for eid, sock in enumerate(experts):
        query = recv(sock)
        assert isinstance(query, proto.Query) and query.ids == ("x", "y")
        send(sock, proto.QEmb(query.qid, eid, proto.SERVE_OK, "", (emb_tensor(2, eid),)))
    batch = recv(reducer)
    assert isinstance(batch, proto.QBatch) and batch.rows == ()
    probs = proto.Tensor.from_numpy(np.array([[0.2, 0.8], [0.6, 0.4]], np.float32))
    send(reducer, proto.QOut(batch.qid, proto.SERVE_OK, "", "classification", ("n", "p"), (probs,)))
    thread.join(10)
    [pred] = result
    assert pred.labels == ["p", "n"] and pred.row_experts == ((0, 1, 2), (0, 1, 2))
    with Client(net.broker.client_endpoint, timeout=5.0) as client:
        with pytest.raises(ServeError) as info:
            client.predict_ids(list(range(5000)))  # beyond serve.max_request_rows
        assert info.value.status == "oversize"


@pytest.mark.parametrize(
    ("ids", "words"),
    [
        ([], "at least one"),
        ("abc", "got str"),
        (7, "got int"),
        ([1, "a"], "all int or all str"),
        (["a", 1], "all int or all str"),
        ([True, False], "all int or all str"),
        ([1, True], "all int or all str"),
        ([1.5], "all int or all str"),
        (["a", ""], "empty"),
        ([3, 4, 3], "id 3 is asked twice"),
        ([2**63], "signed 64-bit"),
        (np.array([2**64 - 1], np.uint64), "signed 64-bit"),
        (np.array([1.0, 2.0]), "not float64"),
        (np.zeros((2, 2), np.int64), "1-D"),
        ([f"{k:0>1000}" for k in range(70)], "split them"),
    ],
)
def test_predict_ids_refuses_bad_ids_by_name(ids: Any, words: str) -> None:
    with pytest.raises(ServeError) as info:
        _as_ids(ids)
    assert info.value.status == "bad_request" and words in info.value.detail


def test_predict_ids_takes_numpy_and_python_ids() -> None:
    assert _as_ids(np.array([3, -4], np.int32)) == (3, -4)
    assert _as_ids(np.array([2**63 - 1], np.uint64)) == (2**63 - 1,)
    assert _as_ids((np.int64(5), 6)) == (5, 6)
    assert _as_ids(np.array(["a", "bc"])) == ("a", "bc")
    assert all(type(i) is int for i in _as_ids(np.arange(3)))
