"""The Open Inference Protocol over REST (app/http_v2.py), in process: the Starlette app on
uvicorn in a thread in front of the fake front door that tests/test_grpc_v2.py uses. What the
two sides share (``oip``) answers alike: the same rows give the same probabilities, and the
front door's statuses become their HTTP codes."""

from __future__ import annotations

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


@pytest.fixture
def port(translator: Translator) -> Iterator[int]:
    import uvicorn

    from traci_ml.app.http_v2 import build_app

    tr = translator
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(tr), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)
    sock.close()


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


@pytest.mark.parametrize(
    ("status", "code"),
    [("busy", 429), ("no_expert", 503), ("oversize", 400), ("timeout", 504),
     ("expert_error", 500), (None, 404), (b"{", 400)],
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
    words = {None: "unknown model", b"{": "not JSON", "timeout": "timeout: no reply"}
    assert got == code and words.get(status, f"{status}: the fake says") in answer["error"]
