"""The Open Inference Protocol over REST (app/http_v2.py), in process: the Starlette app on
uvicorn in a thread in front of the fake front door that tests/test_grpc_v2.py uses. What the
two sides share (``oip``) answers alike: the same rows give the same probabilities, and the
front door's statuses become their HTTP codes."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest

from tests.helpers.front_door import MODEL, FrontDoor, dog
from traci_ml.app.oip import Translator

pytestmark = pytest.mark.timeout(60)


@contextlib.contextmanager
def running(tr: Translator) -> Iterator[int]:
    """The REST app for ``tr`` on uvicorn in a thread; its port."""
    import uvicorn

    from traci_ml.app.http_v2 import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(tr), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def port(translator: Translator) -> Iterator[int]:
    with running(translator) as bound:
        yield bound


def call(port: int, path: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def rows(x: np.ndarray) -> dict:
    return {"inputs": [{"name": c, "datatype": "FP32", "shape": [len(x)], "data": x[:, j].tolist()}
                       for j, c in enumerate("ab")]}  # fmt: skip


def test_metadata_and_rows(port: int) -> None:
    assert call(port, "/v2/health/ready") == (200, {"ready": True})
    code, meta = call(port, f"/v2/models/{MODEL}")
    assert code == 200 and [i["name"] for i in meta["inputs"]] == ["a", "b", "id"]
    x = np.array([[0.5, -1.0], [2.0, 3.0]], np.float32)
    code, answer = call(port, f"/v2/models/{MODEL}/infer", rows(x))
    assert code == 200 and answer["parameters"]["experts"] == "0,1"
    probs = np.array(answer["outputs"][0]["data"], np.float32).reshape(2, 2)
    np.testing.assert_array_equal(probs, dog(x))
    assert answer["outputs"][1]["data"] == ["cat", "dog"]


# a request whose top-level parameters are a list: answered 500 (AttributeError) before
PARAMS = json.dumps({"inputs": [{"name": c, "datatype": "FP32", "shape": [1], "data": [0]}
                                for c in "ab"], "parameters": [1]}).encode()  # fmt: skip


@pytest.mark.parametrize(
    ("status", "code"),
    [("busy", 429), ("no_expert", 503), ("oversize", 400), ("timeout", 504),
     ("expert_error", 500), (None, 404), (b"{", 400), (b"[" * 100_000, 400), (PARAMS, 400)],
)  # fmt: skip
def test_errors(port: int, door: FrontDoor, status, code: int) -> None:
    x = np.zeros((1, 2), np.float32)
    if status == "timeout":
        door.silent = True
    elif isinstance(status, str):
        door.status = status
    model = "nope" if status is None else MODEL
    body = status if isinstance(status, bytes) else rows(x)
    got, answer = call(port, f"/v2/models/{model}/infer", body)
    words = {None: "unknown model", b"{": "not JSON", "timeout": "timeout: no reply",
             b"[" * 100_000: "nested too deeply",
             PARAMS: "'parameters' is not a JSON object"}  # fmt: skip
    assert got == code and words.get(status, f"{status}: the fake says") in answer["error"]


def test_a_body_over_the_limit_is_refused_before_it_is_held(translator: Translator) -> None:
    """serve.http_max_body_mb: 413 naming the key, whether the Content-Length says so or a
    chunked body grows past it; the server answers the next request as before."""
    serve = translator.config.serve.model_copy(update={"http_max_body_mb": 0.01})  # 10 KiB
    translator.config = translator.config.model_copy(update={"serve": serve})
    x = np.array([[0.5, -1.0]], np.float32)
    with running(translator) as bound:
        path = f"/v2/models/{MODEL}/infer"
        big = json.dumps({"inputs": [{"name": "a", "datatype": "FP32", "shape": [3000],
                                      "data": [0.0] * 3000}]}).encode()  # fmt: skip
        assert len(big) > 10 * 1024
        conn = http.client.HTTPConnection("127.0.0.1", bound, timeout=10)
        try:
            conn.request("POST", path, big, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            assert reply.status == 413
            assert "serve.http_max_body_mb" in json.loads(reply.read())["error"]
        finally:
            conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", bound, timeout=10)
        try:  # no Content-Length: the stream is counted as it comes
            chunks = (big[i : i + 1024] for i in range(0, len(big), 1024))
            conn.request("POST", path, chunks, {"Content-Type": "application/json"},
                         encode_chunked=True)  # fmt: skip
            reply = conn.getresponse()
            assert reply.status == 413
            assert "serve.http_max_body_mb" in json.loads(reply.read())["error"]
        finally:
            conn.close()
        code, answer = call(bound, path, rows(x))
        assert code == 200, answer
        np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(1, 2), dog(x),
                                   rtol=1e-6)  # fmt: skip
