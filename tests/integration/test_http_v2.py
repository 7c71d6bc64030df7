"""The Open Inference Protocol (KServe v2 REST) beside the front door, over real HTTP, driven by
an off-the-shelf client of the protocol (tritonclient.http): `traci serve` on a finished short
digits run starts `traci http` (serve.http_port); answers equal `traci predict`'s (load_predictor
+ predict_array) on the same rows, by rows and by id, JSON and binary tensors; errors come in
the protocol's shape with their HTTP codes. The same served run, started with --grpc-port,
answers the protocol's gRPC side (tritonclient.grpc) with the same answers and status codes."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.serve_proc import traci_serve
from tests.helpers.support import free_ports
from tests.integration.test_serve_run import TRACI, trained  # noqa: F401 (the fixture)
from tests.test_http_auth import https_call, pki  # noqa: F401 (pki: the fixture)
from traci_ml.app.predict import load_predictor, predict_array, split_rows

pytestmark = pytest.mark.integration
http = pytest.importorskip("tritonclient.http")
MODEL = "serve-it"  # the run's run_id


def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def ports() -> list[int]:
    return free_ports(6)  # expert, reducer, serve, broker metrics, http, grpc


@pytest.fixture(scope="module")
def server(trained: Path, ports: list[int]):  # noqa: F811
    sets = {
        "network.expert_port": ports[0], "network.reducer_port": ports[1],
        "network.serve_port": ports[2], "metrics.broker_port": ports[3],
        "serve.http_port": ports[4], "serve.max_request_rows": 64,
    }  # fmt: skip
    port = ports[4]
    with traci_serve(trained, sets, "serve-http.out", ["--grpc-port", str(ports[5])]) as proc:
        deadline = time.monotonic() + 150
        while True:
            try:
                if call(port, "GET", "/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "never ready"
            time.sleep(0.5)
        yield port


@pytest.fixture(scope="module")
def offline(trained: Path):  # noqa: F811
    p = load_predictor(trained)
    x, _ = split_rows(p.config, p.preprocess, "test")
    x = x[:20]
    out = predict_array(p, x)
    probs = np.stack([out[f"prob_{c}"] for c in p.preprocess.classes], 1)
    return list(p.preprocess.columns), x, probs, [str(c) for c in out["prediction"]]


def infer_rows(client, columns: list[str], x: np.ndarray, binary: bool):
    inputs = []
    for j, c in enumerate(columns):
        t = http.InferInput(c, [len(x)], "FP32")
        t.set_data_from_numpy(np.ascontiguousarray(x[:, j]), binary_data=binary)
        inputs.append(t)
    outputs = [http.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
    return client.infer(MODEL, inputs, outputs=outputs)


@pytest.mark.timeout(400)
def test_tritonclient_answers_equal_traci_predict(server: int, offline) -> None:
    columns, x, probs, labels = offline
    client = http.InferenceServerClient(url=f"127.0.0.1:{server}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL)
    assert [i["name"] for i in meta["inputs"]] == [*columns, "id"]
    assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}
    for binary in (False, True):
        result = infer_rows(client, columns, x, binary)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=2e-6, rtol=0)
        got = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
        assert got == labels
    # no outputs named: all of them, binary (tritonclient's default)
    inputs = [http.InferInput(c, [len(x), 1], "FP64") for c in columns]
    for j, t in enumerate(inputs):
        t.set_data_from_numpy(x[:, j : j + 1].astype(np.float64))
    result = client.infer(MODEL, inputs)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=2e-6, rtol=0)
    # by id: in a one-table run, the row's number in the table (INT64 or BYTES)
    ids = http.InferInput("id", [3], "INT64")
    ids.set_data_from_numpy(np.array([0, 5, 9], np.int64))
    by_id = client.infer(MODEL, [ids]).as_numpy("probabilities")
    assert by_id.shape == (3, 10) and np.allclose(by_id.sum(1), 1, atol=1e-5)


@pytest.mark.timeout(100)
def test_no_delayed_ack_wait_per_response(server: int) -> None:
    """TCP_NODELAY on the accepted sockets: without it each answer on a kept-alive connection
    waited ~40 ms for a delayed ACK (20 answers took ~0.9 s; now a few ms each)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)
    conn.request("GET", f"/v2/models/{MODEL}")
    conn.getresponse().read()
    t0 = time.perf_counter()
    for _ in range(20):
        conn.request("GET", f"/v2/models/{MODEL}")
        conn.getresponse().read()
    assert time.perf_counter() - t0 < 0.5
    conn.close()


@pytest.mark.timeout(200)
def test_errors_in_the_protocols_shape(server: int, offline) -> None:
    columns, x, _, _ = offline

    def rows(cols, n=2, datatype="FP32", shape=None, data=None):
        data = data if data is not None else [0.5] * n
        return {"inputs": [{"name": c, "datatype": datatype, "shape": shape or [n],
                            "data": data} for c in cols]}  # fmt: skip

    cases = [
        ("GET", "/v2/models/nope", None, 404, "unknown model"),
        ("GET", "/v2/models/nope/ready", None, 404, "unknown model"),
        ("POST", "/v2/models/nope/infer", rows(columns), 404, "unknown model"),
        ("POST", f"/v2/models/{MODEL}/infer", rows(columns[1:]), 400, "missing_columns"),
        ("POST", f"/v2/models/{MODEL}/infer", rows(columns, shape=[2, 3]), 400, "shape"),
        ("POST", f"/v2/models/{MODEL}/infer", rows(columns, shape=[3]), 400, "values"),
        ("POST", f"/v2/models/{MODEL}/infer", rows(columns, datatype="BYTES"), 400, "numeric"),
        ("POST", f"/v2/models/{MODEL}/infer", rows(columns, datatype="FP8"), 400, "datatype"),
        ("POST", f"/v2/models/{MODEL}/infer", rows(columns, data=["a", "b"]), 400, "FP32"),
        ("POST", f"/v2/models/{MODEL}/infer", rows(columns, n=65), 400, "oversize"),
        ("POST", f"/v2/models/{MODEL}/infer", {"inputs": []}, 400, "inputs"),
        ("POST", f"/v2/models/{MODEL}/infer",
         {**rows(columns), "outputs": [{"name": "logits"}]}, 400, "unknown output"),
    ]  # fmt: skip
    for method, path, body, code, words in cases:
        got, answer = call(server, method, path, body)
        assert got == code, (path, answer)
        assert set(answer) == {"error"} and words in answer["error"], answer
    got, answer = call(server, "POST", f"/v2/models/{MODEL}/infer", rows(columns))
    assert got == 200 and answer["outputs"][0]["shape"] == [2, 10]


@pytest.mark.timeout(300)
def test_grpc_answers_equal_traci_predict_and_rest(server: int, ports: list[int], offline) -> None:
    """tritonclient.grpc against `traci serve --grpc-port`: rows as traci predict answers them,
    ids as the REST side answers them, and the front door's refusals as status codes; the
    same over the streaming API."""
    import tritonclient.grpc as tgrpc  # a dependency: never skipped
    from tritonclient.utils import InferenceServerException

    columns, x, probs, labels = offline
    client = tgrpc.InferenceServerClient(url=f"127.0.0.1:{ports[5]}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL)
    assert [i.name for i in meta.inputs] == [*columns, "id"]
    assert (meta.outputs[0].name, list(meta.outputs[0].shape)) == ("probabilities", [-1, 10])

    def columns_as(rows: np.ndarray, cols: list[str]) -> list:
        inputs = []
        for j, c in enumerate(cols):
            t = tgrpc.InferInput(c, [len(rows)], "FP32")
            t.set_data_from_numpy(np.ascontiguousarray(rows[:, j], np.float32))
            inputs.append(t)
        return inputs

    result = client.infer(MODEL, columns_as(x, columns))
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=2e-6, rtol=0)
    assert [v.decode() for v in result.as_numpy("label")] == labels
    ids = tgrpc.InferInput("id", [3], "INT64")
    ids.set_data_from_numpy(np.array([0, 5, 9], np.int64))
    by_id = client.infer(MODEL, [ids]).as_numpy("probabilities")
    rest_ids = http.InferInput("id", [3], "INT64")
    rest_ids.set_data_from_numpy(np.array([0, 5, 9], np.int64))
    rest = http.InferenceServerClient(url=f"127.0.0.1:{server}").infer(MODEL, [rest_ids])
    np.testing.assert_allclose(by_id, rest.as_numpy("probabilities"), atol=2e-6, rtol=0)
    cases = [
        (lambda: client.get_model_metadata("nope"), "NOT_FOUND", "unknown model"),
        (lambda: client.infer(MODEL, columns_as(x[:2, 1:], columns[1:])), "INVALID_ARGUMENT",
         "missing_columns"),
        (lambda: client.infer(MODEL, columns_as(np.zeros((65, len(columns))), columns)),
         "INVALID_ARGUMENT", "oversize"),
    ]  # fmt: skip
    for call, code, words in cases:
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == f"StatusCode.{code}" and words in caught.value.message()
    # the streaming API: the same answers, in order, a refusal in its place
    streamed: list = []
    client.start_stream(callback=lambda result, error: streamed.append((result, error)))
    client.async_stream_infer(MODEL, columns_as(x, columns), request_id="one")
    client.async_stream_infer(MODEL, columns_as(x[:2, 1:], columns[1:]), request_id="two")
    client.async_stream_infer(MODEL, [ids], request_id="three")
    client.stop_stream()  # after the answers in flight
    assert [(r is None, e is None) for r, e in streamed] == [(False, True), (True, False),
                                                             (False, True)]  # fmt: skip
    np.testing.assert_allclose(streamed[0][0].as_numpy("probabilities"), probs, atol=2e-6, rtol=0)
    assert "INVALID_ARGUMENT: missing_columns" in streamed[1][1].message()
    np.testing.assert_allclose(streamed[2][0].as_numpy("probabilities"), by_id, atol=0, rtol=0)
    client.close()


@pytest.mark.timeout(240)
def test_tls_and_tokens_on_a_served_run(trained: Path, offline, pki, tmp_path: Path) -> None:  # noqa: F811
    """`traci serve` with serve.http_tls_cert/key and serve.http_token_file (a copy of the
    run, its own ports): over HTTPS the health check answers without a token, inference
    without a listed one is 401 and never reaches the cluster, with one it equals traci
    predict; the gRPC side likewise over TLS (tritonclient.grpc)."""
    import shutil

    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    cert, key = pki
    tokens = tmp_path / "tokens"
    tokens.write_text("# one line per client\nclient-one-" + "x" * 24 + "\n")
    token = tokens.read_text().splitlines()[1]
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    expert, reducer, front, http_port, grpc_port = free_ports(5)
    sets = {"network.expert_port": expert, "network.reducer_port": reducer,
            "network.serve_port": front, "metrics.broker_port": 0, "serve.http_port": http_port,
            "serve.http_tls_cert": cert, "serve.http_tls_key": key,
            "serve.http_token_file": tokens}  # fmt: skip
    columns, x, probs, labels = offline
    body = {"inputs": [{"name": c, "datatype": "FP32", "shape": [len(x)],
                        "data": x[:, j].astype(np.float32).tolist()}
                       for j, c in enumerate(columns)]}  # fmt: skip

    def https(path: str, auth: str | None = None, data: dict | None = None) -> tuple[int, dict]:
        return https_call(http_port, path, cert, auth, data)[:2]

    with traci_serve(run, sets, "serve-tls.out", ["--grpc-port", str(grpc_port)]) as proc:
        deadline = time.monotonic() + 150
        while True:
            try:
                if https("/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "never ready"
            time.sleep(0.5)
        infer = f"/v2/models/{MODEL}/infer"
        for auth in (None, "Bearer wrong-token-of-some-length", f"Basic {token}"):
            code, answer = https(infer, auth, body)
            assert code == 401 and "unauthorized" in answer["error"], (auth, answer)
        code, answer = https(infer, f"Bearer {token}", body)
        assert code == 200, answer
        got = {o["name"]: o for o in answer["outputs"]}
        np.testing.assert_allclose(np.array(got["probabilities"]["data"]).reshape(probs.shape),
                                   probs, atol=2e-6, rtol=0)  # fmt: skip
        assert got["label"]["data"] == labels

        client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}", ssl=True,
                                             root_certificates=str(cert))  # fmt: skip
        try:
            assert client.is_server_ready()  # no token needed
            inputs = [tgrpc.InferInput(c, [len(x)], "FP32") for c in columns]
            for j, t in enumerate(inputs):
                t.set_data_from_numpy(np.ascontiguousarray(x[:, j], np.float32))
            with pytest.raises(InferenceServerException, match="unauthorized"):
                client.infer(MODEL, inputs)
            result = client.infer(MODEL, inputs, headers={"authorization": f"Bearer {token}"})
            np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=2e-6, rtol=0)
        finally:
            client.close()
    log = (tmp_path / "serve-tls.out").read_text()
    assert "Traceback" not in log
