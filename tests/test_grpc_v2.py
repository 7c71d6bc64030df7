"""The Open Inference Protocol over gRPC (app/grpc_v2.py), in process: a real gRPC server on
loopback in front of a fake front door (a ZeroMQ ROUTER answering QUERYs as the broker's
front door does), driven by tritonclient.grpc and by the raw stub. Each translation (rows in
``contents`` or ``raw_input_contents``, ids, outputs asked) and each refusal: the right status
code, a message naming the problem, and the server still answering afterwards."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.helpers.front_door import CLASSES, MODEL, dog
from tests.helpers.support import free_ports
from traci_ml.app.oip import Translator
from traci_ml.core.config import Config
from traci_ml.core.errors import ConfigError

tc = pytest.importorskip("tritonclient.grpc")
grpc_v2 = pytest.importorskip("traci_ml.app.grpc_v2")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc  # noqa: E402

pytestmark = pytest.mark.timeout(60)
Code = grpc.StatusCode


@pytest.fixture
def port(translator: Translator) -> Iterator[int]:
    server, bound = grpc_v2.start(translator, "127.0.0.1", 0, workers=4)
    yield bound
    server.stop(grace=None).wait(5)


@pytest.fixture
def stub(port: int) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def client(port: int) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(f"127.0.0.1:{port}")
    yield c
    c.close()


def test_health_and_metadata(client, stub) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    meta = client.get_model_metadata(MODEL)
    assert meta.name == MODEL and list(meta.versions) == ["1"] and meta.platform == "traci"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("a", "FP32", [-1]), ("b", "FP32", [-1]), ("id", "INT64", [-1])]  # fmt: skip
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("probabilities", "FP32", [-1, 2]), ("label", "BYTES", [-1])]  # fmt: skip
    assert client.get_server_metadata().name == "traci"


def test_ready_is_false_while_the_front_door_cannot_answer(stub, door, translator) -> None:
    door.status = "no_expert"
    translator._ready = (float("-inf"), False)  # past the readiness cache
    assert not stub.ServerReady(pb.ServerReadyRequest()).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready


def test_rows_in_raw_input_contents(client, door) -> None:
    x = np.array([[0.5, -1.0], [2.0, 3.0], [0.0, 0.0]])
    a = tc.InferInput("a", [3], "FP32")
    a.set_data_from_numpy(x[:, 0].astype(np.float32))
    b = tc.InferInput("b", [3, 1], "FP64")
    b.set_data_from_numpy(x[:, 1:])
    extra = tc.InferInput("z", [3], "INT64")  # extra columns are allowed, as in REST
    extra.set_data_from_numpy(np.array([1, 2, 3], np.int64))
    result = client.infer(MODEL, [b, a, extra], request_id="r7")
    # rows travel as float32, as Client sends them
    np.testing.assert_array_equal(result.as_numpy("probabilities"), dog(x.astype(np.float32)))
    labels = [v.decode() for v in result.as_numpy("label")]
    assert labels == ["cat", "dog", "dog" if dog(x)[2, 1] > 0.5 else "cat"]
    response = result.get_response()
    assert response.id == "r7" and response.model_version == "1"
    assert response.parameters["experts"].string_param == "0,1"
    assert json.loads(response.parameters["classes"].string_param) == list(CLASSES)
    assert door.asked[-1].columns == ("b", "a", "z")


def test_rows_in_typed_contents_and_outputs_asked(stub) -> None:
    t = pb.ModelInferRequest.InferInputTensor
    req = pb.ModelInferRequest(model_name=MODEL, inputs=[
        t(name="a", datatype="FP32", shape=[2], contents=pb.InferTensorContents(
            fp32_contents=[1.0, -2.0])),
        t(name="b", datatype="INT8", shape=[2, 1], contents=pb.InferTensorContents(
            int_contents=[3, -4])),
    ], outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="label")])  # fmt: skip
    answer = stub.ModelInfer(req)
    assert [o.name for o in answer.outputs] == ["label"]
    assert list(answer.outputs[0].shape) == [2]
    assert answer.raw_output_contents[0] == b"\x03\x00\x00\x00dog\x03\x00\x00\x00cat"


@pytest.mark.parametrize("datatype", ["INT64", "BYTES"])
def test_rows_by_id(client, door, stub, datatype: str) -> None:
    ids = tc.InferInput("id", [3], datatype)
    values = np.array([0, 5, 9], np.int64)
    ids.set_data_from_numpy(values if datatype == "INT64" else values.astype(str).astype(object))
    probs = client.infer(MODEL, [ids]).as_numpy("probabilities")
    assert probs.shape == (3, 2) and door.asked[-1].ids == (
        (0, 5, 9) if datatype == "INT64" else ("0", "5", "9"))  # fmt: skip
    t = pb.ModelInferRequest.InferInputTensor
    contents = (pb.InferTensorContents(int64_contents=[4, 2]) if datatype == "INT64"
                else pb.InferTensorContents(bytes_contents=[b"x4", b"x2"]))  # fmt: skip
    req = pb.ModelInferRequest(model_name=MODEL, inputs=[
        t(name="id", datatype=datatype, shape=[2], contents=contents)])  # fmt: skip
    stub.ModelInfer(req)
    assert door.asked[-1].ids == ((4, 2) if datatype == "INT64" else ("x4", "x2"))


def _t(name: str = "a", datatype: str = "FP32", shape=(2,), **contents):
    c = pb.InferTensorContents(**contents) if contents else None
    return pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=list(shape), contents=c
    )


def _rows(*more, raw=None, **kw) -> pb.ModelInferRequest:
    inputs = [_t("a", fp32_contents=[1, 2]), _t("b", fp32_contents=[3, 4]), *more]
    return pb.ModelInferRequest(model_name=MODEL, inputs=inputs, raw_input_contents=raw or [],
                                **kw)  # fmt: skip


F32 = np.array([1, 2], "<f4").tobytes()
BAD = [
    (pb.ModelInferRequest(model_name="nope", inputs=[_t(fp32_contents=[1, 2])]),
     Code.NOT_FOUND, "unknown model 'nope'"),
    (_rows(model_version="2"), Code.NOT_FOUND, "version '1' only"),
    (pb.ModelInferRequest(model_name=MODEL), Code.INVALID_ARGUMENT, "non-empty"),
    (_rows(_t("c", "FP8", fp32_contents=[1, 2])), Code.INVALID_ARGUMENT, "datatype 'FP8'"),
    (_rows(_t("c", shape=(1, 2), fp32_contents=[1, 2])), Code.INVALID_ARGUMENT, "[R, 1]"),
    (_rows(_t("c", shape=(3,), fp32_contents=[1, 2])), Code.INVALID_ARGUMENT, "but 2 values"),
    (_rows(_t("c", "BYTES", bytes_contents=[b"1", b"2"])), Code.INVALID_ARGUMENT, "numeric"),
    (_rows(_t("id", "INT64", int64_contents=[1, 2])), Code.INVALID_ARGUMENT, "alone"),
    (pb.ModelInferRequest(model_name=MODEL, inputs=[_t("id", fp32_contents=[1, 2])]),
     Code.INVALID_ARGUMENT, "INT64 or BYTES"),
    (_rows(_t("a", fp32_contents=[1, 2])), Code.INVALID_ARGUMENT, "given twice"),
    (_rows(_t("", fp32_contents=[1, 2])), Code.INVALID_ARGUMENT, "'name'"),
    (_rows(_t("c", shape=(3,), fp32_contents=[1, 2, 3])), Code.INVALID_ARGUMENT,
     "different numbers of rows"),
    (_rows(_t("c", int64_contents=[1, 2])), Code.INVALID_ARGUMENT,
     "go in contents.fp32_contents, not contents.int64_contents"),
    (_rows(_t("c", "FP16", fp32_contents=[1, 2])), Code.INVALID_ARGUMENT,
     "only in raw_input_contents"),
    (_rows(_t("c", "INT8", int_contents=[1, 300])), Code.INVALID_ARGUMENT, "not INT8 values"),
    (pb.ModelInferRequest(model_name=MODEL, inputs=[_t("a"), _t("b")], raw_input_contents=[F32]),
     Code.INVALID_ARGUMENT, "raw_input_contents holds 1 entries for 2 inputs"),
    (pb.ModelInferRequest(model_name=MODEL, inputs=[_t("a"), _t("b", fp32_contents=[1, 2])],
                          raw_input_contents=[F32, F32]),
     Code.INVALID_ARGUMENT, "input 'b' has contents beside raw_input_contents"),
    (pb.ModelInferRequest(model_name=MODEL, inputs=[_t("a"), _t("b")],
                          raw_input_contents=[F32, F32[:7]]),
     Code.INVALID_ARGUMENT, "7 bytes are not whole FP32 values"),
    (pb.ModelInferRequest(model_name=MODEL, inputs=[_t("id", "BYTES")],
                          raw_input_contents=[b"\x09\x00\x00\x00ab"]),
     Code.INVALID_ARGUMENT, "runs past the data"),
    (pb.ModelInferRequest(model_name=MODEL, inputs=[_t("id", "BYTES", shape=(1,))],
                          raw_input_contents=[b"\x01\x00\x00\x00\xff"]),
     Code.INVALID_ARGUMENT, "not UTF-8"),
    (_rows(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
     Code.INVALID_ARGUMENT, "unknown output 'logits'"),
    (pb.ModelInferRequest(model_name=MODEL, inputs=[_t("a", fp32_contents=[1, 2])]),
     Code.INVALID_ARGUMENT, "missing_columns: an expert reads a and b"),
]  # fmt: skip


@pytest.mark.parametrize(("request_", "code", "words"), BAD)
def test_refusals_name_the_problem(stub, request_, code, words: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_)
    assert caught.value.code() == code and words in caught.value.details()
    assert len(stub.ModelInfer(_rows()).outputs) == 2  # still serving


@pytest.mark.parametrize(
    ("status", "code"),
    [("busy", Code.RESOURCE_EXHAUSTED), ("no_expert", Code.UNAVAILABLE),
     ("no_reducer", Code.UNAVAILABLE), ("shutdown", Code.UNAVAILABLE),
     ("oversize", Code.INVALID_ARGUMENT), ("bad_request", Code.INVALID_ARGUMENT),
     ("expert_error", Code.INTERNAL)],
)  # fmt: skip
def test_front_door_statuses_as_grpc_codes(stub, door, status: str, code) -> None:
    door.status = status
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_rows())
    assert caught.value.code() == code
    assert caught.value.details() == f"{status}: the fake says {status}"


def test_no_answer_is_deadline_exceeded_and_the_callers_deadline_is_kept(stub, door) -> None:
    door.silent = True
    with pytest.raises(grpc.RpcError) as caught:  # the translator's own limit: 1.4 s
        stub.ModelInfer(_rows())
    assert caught.value.code() == Code.DEADLINE_EXCEEDED and "timeout: no reply" in (
        caught.value.details())  # fmt: skip
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(_rows(), timeout=0.3)
    assert caught.value.code() == Code.DEADLINE_EXCEEDED
    door.silent = False
    assert len(stub.ModelInfer(_rows()).outputs) == 2


def test_unknown_model_elsewhere_and_triton_only_rpcs(stub) -> None:
    for call, req in [(stub.ModelReady, pb.ModelReadyRequest(name="nope")),
                      (stub.ModelMetadata, pb.ModelMetadataRequest(name="nope"))]:  # fmt: skip
        with pytest.raises(grpc.RpcError) as caught:
            call(req)
        assert caught.value.code() == Code.NOT_FOUND and "unknown model 'nope'" in (
            caught.value.details())  # fmt: skip
    with pytest.raises(grpc.RpcError) as caught:
        stub.RepositoryIndex(pb.RepositoryIndexRequest())
    assert caught.value.code() == Code.UNIMPLEMENTED


def test_a_port_in_use_is_a_config_error(translator: Translator, port: int) -> None:
    with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
        grpc_v2.start(translator, "127.0.0.1", port)


def test_calls_beyond_the_limit_are_refused_at_once(translator: Translator, door) -> None:
    """A flood is not queued without end: with one call held (the front door silent), the
    next is RESOURCE_EXHAUSTED at once, and the held one ends with its own deadline."""
    door.silent = True
    server, bound = grpc_v2.start(translator, "127.0.0.1", 0, workers=1, max_calls=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{bound}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            held = stub.ModelInfer.future(_rows(), timeout=2)
            deadline = time.monotonic() + 5
            while not door.asked and time.monotonic() < deadline:
                time.sleep(0.01)
            assert door.asked, "the first call never reached the front door"
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(_rows(), timeout=5)
            assert caught.value.code() == Code.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as first:
                held.result()
            assert first.value.code() == Code.DEADLINE_EXCEEDED
    finally:
        server.stop(grace=None).wait(5)


def test_traci_serve_passes_the_port_to_traci_http(tmp_path: Path) -> None:
    from traci_ml.app.supervisor import children

    on = Config.model_validate({"serve": {"http_port": 0, "grpc_port": 8001}})
    argv = {c.name: c.argv for c in children(on, tmp_path / "serve.yaml", serve=True)}
    assert argv["http"][3:6] == ["http", "--config", str(tmp_path / "serve.yaml")]
    off = Config.model_validate({"serve": {"http_port": 0}})
    assert "http" not in {c.name for c in children(off, tmp_path / "s.yaml", serve=True)}


def test_grpc_port_flag_sets_the_config_key(tmp_path: Path) -> None:
    """``--grpc-port`` is ``serve.grpc_port``: the config every process of the serve reads."""
    from traci_ml.app.cli import build_parser, config_from_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"run_dir": str(tmp_path / "run")}))
    args = build_parser().parse_args(["http", "--config", str(cfg), "--grpc-port", "8123"])
    assert config_from_args(args).serve.grpc_port == 8123
    args = build_parser().parse_args(["http", "--config", str(cfg)])
    assert config_from_args(args).serve.grpc_port == 0


def test_traci_http_needs_a_port(tmp_path: Path) -> None:
    from traci_ml.app.http_v2 import run

    config = Config.model_validate({"serve": {"http_port": 0}})
    with pytest.raises(ConfigError, match="serve.grpc_port"):
        run(config)


@pytest.mark.timeout(120)
def test_traci_http_serves_grpc_alone_and_stops_on_sigterm(tmp_path: Path, door) -> None:
    """The command as ``traci serve`` starts it, REST off: answers, then SIGTERM ends it (0)."""
    (port,) = free_ports(1)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(json.dumps({
        "run_id": MODEL, "run_dir": str(tmp_path / "run"), "metrics": {"broker_port": 0},
        "network": {"serve_port": int(door.endpoint.rsplit(":", 1)[1])},
        "serve": {"http_port": 0},
    }))  # fmt: skip
    argv = [sys.executable, "-m", "traci_ml.app.cli", "http", "--config", str(cfg),
            "--grpc-port", str(port), "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest()).live
            answer = stub.ModelInfer(_rows())
            assert [o.name for o in answer.outputs] == ["probabilities", "label"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_stream_answers_in_order_and_a_failure_does_not_end_it(client, door) -> None:
    """tritonclient's streaming API: good, bad (unknown output), busy front door, good."""
    got: list[tuple[object, object]] = []
    client.start_stream(callback=lambda result, error: got.append((result, error)))
    x = np.array([[0.5, -1.0], [2.0, 3.0]], np.float32)

    def inputs() -> list:
        a, b = tc.InferInput("a", [2], "FP32"), tc.InferInput("b", [2], "FP32")
        a.set_data_from_numpy(x[:, 0].copy())
        b.set_data_from_numpy(x[:, 1].copy())
        return [a, b]

    client.async_stream_infer(MODEL, inputs(), request_id="s1")
    client.async_stream_infer(MODEL, inputs(), request_id="s2",
                              outputs=[tc.InferRequestedOutput("logits")])  # fmt: skip
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    door.status = "busy"
    client.async_stream_infer(MODEL, inputs(), request_id="s3")
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    door.status = None
    client.async_stream_infer(MODEL, inputs(), request_id="s4")
    client.stop_stream()  # waits for the answers in flight
    assert len(got) == 4
    (first, e1), (_, e2), (_, e3), (last, e4) = got
    assert e1 is None and e4 is None
    assert first.get_response().id == "s1" and last.get_response().id == "s4"
    np.testing.assert_array_equal(first.as_numpy("probabilities"), dog(x))
    np.testing.assert_array_equal(last.as_numpy("probabilities"), dog(x))
    assert "INVALID_ARGUMENT: unknown output 'logits'" in e2.message() and "'s2'" in e2.message()
    assert e3.message() == "RESOURCE_EXHAUSTED: busy: the fake says busy (request id 's3')"


def test_a_stream_names_an_unknown_model_and_goes_on(stub) -> None:
    answers = list(stub.ModelStreamInfer(iter([
        _rows(id="a"), pb.ModelInferRequest(model_name="nope", id="b"),
        _rows(model_version="2"), _rows(id="d")])))  # fmt: skip
    assert [a.error_message for a in answers] == [
        "", "NOT_FOUND: unknown model 'nope': this server serves 'toy' (request id 'b')",
        f"NOT_FOUND: model '{MODEL}' has version '1' only, not '2'", ""]  # fmt: skip
    assert [a.infer_response.id for a in answers] == ["a", "b", "", "d"]
    assert len(answers[3].infer_response.outputs) == 2
    # and the server still answers plain calls
    assert len(stub.ModelInfer(_rows()).outputs) == 2


def test_a_message_over_the_limit_is_refused(translator: Translator, door) -> None:
    """serve.http_max_body_mb bounds a gRPC message as it bounds a REST body."""
    serve = translator.config.serve.model_copy(update={"http_max_body_mb": 0.01})  # 10 KiB
    translator.config = translator.config.model_copy(update={"serve": serve})
    server, bound = grpc_v2.start(translator, "127.0.0.1", 0, workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{bound}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            big = _rows(raw=[np.zeros(3000, np.float32).tobytes()] * 2)
            assert big.ByteSize() > 10 * 1024
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(big)
            assert refused.value.code() == Code.RESOURCE_EXHAUSTED
            assert [o.name for o in stub.ModelInfer(_rows()).outputs] == ["probabilities", "label"]
    finally:
        server.stop(grace=None).wait(5)
