"""Slow and many clients against the REST side's uvicorn (app/http_conn.py): real sockets,
a real uvicorn with the protocol ``traci http`` runs, short limits."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from tests.helpers.support import free_ports
from traci_ml.app.http_conn import Closed, protocol

TIMEOUT = 1.0  # serve.http_read_timeout here
MAX = 3  # serve.http_max_connections here


async def app(scope, receive, send) -> None:  # noqa: ANN001
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def served() -> Iterator[tuple[int, Closed]]:
    (port,) = free_ports(1)
    closed = Closed()
    conn = protocol(TIMEOUT, MAX, closed)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", http=conn,
                            limit_concurrency=MAX + 1)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn never started"
        time.sleep(0.05)
    yield port, closed
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def connect() -> Iterator:
    """Opens connections to a port; closes them all at the end."""
    opened: list[socket.socket] = []

    def open_one(port: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        opened.append(s)
        return s

    yield open_one
    for s in opened:
        s.close()


def ask(s: socket.socket) -> bytes:
    """One GET on ``s`` and its whole answer (the app's body is "ok")."""
    s.sendall(GET)
    s.settimeout(10)
    answer = b""
    while not answer.endswith(b"ok"):
        chunk = s.recv(4096)
        assert chunk, f"closed after {answer!r}"
        answer += chunk
    return answer


def closed_after(s: socket.socket, limit: float = 8.0) -> float:
    """Seconds until the server closes ``s`` (reading whatever it answers on the way)."""
    t = time.monotonic()
    s.settimeout(limit)
    while s.recv(4096):
        pass
    return time.monotonic() - t


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def test_an_idle_connection_is_closed_at_the_deadline(served, connect) -> None:
    port, closed = served
    s = connect(port)
    took = closed_after(s)
    assert TIMEOUT * 0.8 <= took < TIMEOUT + 3, took
    assert closed.slow == 1 and closed.over == 0


def test_trickled_headers_do_not_reset_it(served, connect) -> None:
    """A byte every 0.2 s keeps uvicorn's own keep-alive timer from firing; not this one."""
    port, closed = served
    s = connect(port)
    t = time.monotonic()
    s.settimeout(0.2)
    gone = False
    for byte in GET[:-2] * 10:  # never the blank line that ends the headers
        try:
            s.send(bytes([byte]))
            if s.recv(4096) == b"":
                gone = True
                break
        except TimeoutError:
            continue
        except OSError:
            gone = True
            break
    took = time.monotonic() - t
    assert gone and took < TIMEOUT + 3, took
    assert closed.slow == 1


def test_a_body_that_never_comes_whole_is_closed(served, connect) -> None:
    port, closed = served
    s = connect(port)
    s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    assert closed_after(s) < TIMEOUT + 3
    assert closed.slow == 1


def test_a_keep_alive_client_is_answered_each_time(served, connect) -> None:
    """The deadline runs from each wait: a client that asks, then asks again after more than
    half the timeout, is answered both times (the first wait's timer does not close it)."""
    port, closed = served
    s = connect(port)
    for _ in range(3):
        assert ask(s).startswith(b"HTTP/1.1 200")
        time.sleep(TIMEOUT * 0.7)
    assert closed.slow == 0
    assert closed_after(s) < TIMEOUT + 3  # and then, idle, it goes


def test_connections_beyond_the_cap_are_closed_as_they_open(served, connect) -> None:
    port, closed = served
    held = [connect(port) for _ in range(MAX)]
    time.sleep(0.2)
    extra = connect(port)
    assert closed_after(extra, limit=TIMEOUT * 0.8) < TIMEOUT * 0.8  # before the deadline
    assert closed.over == 1
    assert ask(held[0]).startswith(b"HTTP/1.1 200")  # the ones held are served
    for s in held:
        s.close()
    time.sleep(0.3)
    assert ask(connect(port)).startswith(b"HTTP/1.1 200")  # room again


def test_the_grpc_side_closes_a_connection_that_never_handshakes(tmp_path, door) -> None:
    """grpc-core keeps a connection that sends nothing (or half an HTTP/2 preface) for its
    120 s handshake timeout; traci http's gRPC side uses serve.http_read_timeout. A real
    call on a connection of its own still answers."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc

    from tests.helpers.front_door import make_translator
    from traci_ml.app import grpc_v2

    tr = make_translator(tmp_path / "run", door)
    serve = tr.config.serve.model_copy(update={"http_read_timeout": TIMEOUT})
    tr.config = tr.config.model_copy(update={"serve": serve})
    server, port = grpc_v2.start(tr, "127.0.0.1", 0, workers=2)
    try:
        for payload in (b"", b"PRI * HTTP/2.0\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(payload)
                assert closed_after(s) < TIMEOUT + 3, payload
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live
    finally:
        server.stop(grace=None).wait(5)
        tr.close()
