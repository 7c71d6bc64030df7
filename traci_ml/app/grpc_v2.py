"""The Open Inference Protocol's gRPC side (KServe v2 ``inference.GRPCInferenceService``) in
front of the broker's front door: what ``http_v2`` does over REST, with the same model, the
same inputs and outputs and the same rules (``oip``), in the same process (``traci http
--grpc-port``; docs/serving.md#grpc).

    ServerLive, ServerReady, ServerMetadata     the process; the front door can answer now
    ModelReady, ModelMetadata                   the run's model (name: its run_id; version 1)
    ModelInfer                                  ``contents`` or ``raw_input_contents`` in,
                                                ``raw_output_contents`` out (as Triton)
    ModelStreamInfer                            the same, requests and answers on one
                                                stream, in order (Triton's streaming API)

The message and service stubs are tritonclient's (``tritonclient.grpc.service_pb2``,
generated from Triton's grpc_service.proto, a superset of KServe's): Triton-only RPCs (model
repository, statistics, shared memory, ...) answer UNIMPLEMENTED, the servicer base's answer.
Errors are status codes with a message naming the problem: INVALID_ARGUMENT (the request;
bad_request, oversize, missing_columns), NOT_FOUND (an unknown model or version),
RESOURCE_EXHAUSTED (busy), UNAVAILABLE (no_reducer, no_expert, shutdown), DEADLINE_EXCEEDED
(timeout), INTERNAL (expert_error, reducer_error, anything else). On a stream, a request
that fails is answered in its place with ``error_message`` ("CODE: message", and the
request's id) and the stream goes on; an open stream holds one of the ``WORKERS`` threads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from traci_ml.app.client import ServeError
from traci_ml.app.http_auth import Access, grpc_interceptor
from traci_ml.app.oip import (
    NUMERIC,
    BadTensor,
    Translator,
    check_outputs,
    column_length,
    failure,
    from_raw,
    max_body,
    raw_output,
    rows_or_ids,
)

log = logging.getLogger(__name__)
CODE = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "timeout": grpc.StatusCode.DEADLINE_EXCEEDED,
    "internal": grpc.StatusCode.INTERNAL,
}
# where a datatype's values travel in InferTensorContents, and that field's numpy type;
# FP16 has none (raw_input_contents only)
CONTENTS = {
    "INT8": ("int_contents", np.int32), "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32), "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32), "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32), "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32), "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", object),
}  # fmt: skip
WORKERS = 16  # requests answered at once, each thread with its own Client
# calls in the server at once, answered or waiting for a worker: one more is refused at once
# with RESOURCE_EXHAUSTED (gRPC's own queue is unbounded: a flood would grow it without end)
MAX_CALLS = 4 * WORKERS


def read_request(request: pb.ModelInferRequest) -> tuple[dict | None, list | None]:
    """``(columns -> (R,) values, None)`` for feature rows, ``(None, ids)`` for rows by id."""
    inputs, raw = request.inputs, request.raw_input_contents
    if not inputs:
        raise BadTensor("'inputs' is a non-empty list of tensors")
    if raw and len(raw) != len(inputs):
        raise BadTensor(f"raw_input_contents holds {len(raw)} entries for {len(inputs)} "
                        "inputs: one per input, in their order")  # fmt: skip
    tensors: dict[str, np.ndarray] = {}
    for i, t in enumerate(inputs):
        if not t.name:
            raise BadTensor("every input has a 'name'")
        if t.name in tensors:
            raise BadTensor(f"input '{t.name}' is given twice")
        shape = list(t.shape)
        n = column_length(t.name, t.datatype, shape)
        if raw and t.contents.ListFields():
            raise BadTensor(f"input '{t.name}' has contents beside raw_input_contents: one or "
                            "the other for all inputs")  # fmt: skip
        value = from_raw(raw[i], t.datatype, t.name) if raw else _contents(t)
        if value.size != n:
            raise BadTensor(f"input '{t.name}' has shape {shape} but {value.size} values")
        tensors[t.name] = value.reshape(n)
    return rows_or_ids(tensors)


def _contents(t: Any) -> np.ndarray:
    """One input's values from its typed ``contents`` field."""
    if t.datatype not in CONTENTS:  # FP16: column_length let only it through
        raise BadTensor(f"input '{t.name}' is {t.datatype}: its values travel only in "
                        "raw_input_contents")  # fmt: skip
    field, wire = CONTENTS[t.datatype]
    for given, _ in t.contents.ListFields():
        if given.name != field:
            raise BadTensor(f"input '{t.name}' is {t.datatype}: its values go in "
                            f"contents.{field}, not contents.{given.name}")  # fmt: skip
    values = getattr(t.contents, field)
    if wire is object:
        return np.array(list(values), dtype=object)
    wide = np.array(values, dtype=wire)
    value = wide.astype(NUMERIC[t.datatype])
    if value.dtype != wide.dtype and not np.array_equal(value, wide):
        raise BadTensor(f"input '{t.name}': its data are not {t.datatype} values")
    return value


def encode_response(
    model: str, request: pb.ModelInferRequest, outputs: Mapping[str, Any], params: dict[str, str]
) -> pb.ModelInferResponse:
    """The outputs asked (all by default) in ``raw_output_contents``, as Triton answers."""
    asked = [o.name for o in request.outputs] or list(outputs)
    check_outputs(asked, outputs)
    response = pb.ModelInferResponse(model_name=model, model_version="1", id=request.id)
    for name in asked:
        datatype, shape, raw = raw_output(outputs[name])
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    for key, value in params.items():
        response.parameters[key].string_param = value
    return response


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The protocol's RPCs over one ``Translator``; each call runs in a pool thread."""

    def __init__(self, tr: Translator) -> None:
        self.tr = tr

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.tr.ready())

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(name="traci", version=_version())

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._known(request.name, request.version, context)
        return pb.ModelReadyResponse(ready=self.tr.ready())

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._known(request.name, request.version, context)
        meta = self.tr.metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )  # fmt: skip

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._known(request.model_name, request.model_version, context)
        answer = self._infer(request, context)
        if isinstance(answer, tuple):
            context.abort(*answer)
        return answer

    def ModelStreamInfer(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """Each request of the stream answered in order, as ModelInfer would; one that fails
        gets ``error_message`` ("CODE: message (request id ...)") and the stream goes on."""
        for request in requests:
            unknown = self._unknown(request.model_name, request.model_version)
            answer = self._infer(request, context) if unknown is None else (
                grpc.StatusCode.NOT_FOUND, unknown)  # fmt: skip
            if not isinstance(answer, tuple):
                yield pb.ModelStreamInferResponse(infer_response=answer)
                continue
            code, message = answer
            about = f" (request id {request.id!r})" if request.id else ""
            failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id,
                                           model_version=request.model_version)  # fmt: skip
            yield pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}{about}",
                                              infer_response=failed)  # fmt: skip

    def _infer(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The ModelInferResponse for ``request``, or the (status code, message) it fails
        with."""
        try:
            rows, ids = read_request(request)
            left = context.time_remaining()  # the caller's deadline, if it set one
            timeout = None if left is None else max(0.001, min(left, self.tr.timeout))
            outputs, params = self.tr.predict(rows, ids, timeout=timeout)
            return encode_response(self.tr.name, request, outputs, params)
        except ValueError as exc:  # BadTensor too
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except ServeError as exc:
            return CODE[failure(exc)], f"{exc.status}: {exc.detail}"
        except Exception as exc:  # a bug here: answered, never the server's end
            log.exception("grpc ModelInfer failed")
            return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"

    def _unknown(self, name: str, version: str) -> str | None:
        """Why ``name``/``version`` is not this server's model (None: it is)."""
        if name != self.tr.name:
            return f"unknown model '{name}': this server serves '{self.tr.name}'"
        if version not in ("", "1"):
            return f"model '{name}' has version '1' only, not '{version}'"
        return None

    def _known(self, name: str, version: str, context: grpc.ServicerContext) -> None:
        if (problem := self._unknown(name, version)) is not None:
            context.abort(grpc.StatusCode.NOT_FOUND, problem)


def start(tr: Translator, bind: str, port: int, *, workers: int = WORKERS,
          max_calls: int = MAX_CALLS, access: Access | None = None) -> tuple[Any, int]:  # fmt: skip
    """A started gRPC server on ``bind:port`` (0: any free port) and the port it bound;
    ``workers`` calls answered at once, at most ``max_calls`` in it at once; ``access``:
    its TLS and tokens (``http_auth``; None: neither)."""
    from traci_ml.core.errors import ConfigError

    access = access or Access()
    # so_reuseport 0: a port in use is an error, not silently shared with another server;
    # serve.http_read_timeout bounds a connection that never finishes its TLS/HTTP2 handshake
    # (grpc-core's default: 120 s) and one that stays open with no call in it (default: never),
    # as it bounds REST's (app/http_conn.py); a client reconnects on the GOAWAY by itself
    wait_ms = int(tr.config.serve.http_read_timeout * 1000)
    options = [("grpc.max_receive_message_length", max_body(tr.config)),
               ("grpc.so_reuseport", 0), ("grpc.server_handshake_timeout_ms", wait_ms),
               ("grpc.max_connection_idle_ms", wait_ms)]  # fmt: skip
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc-v2")
    tokens = grpc_interceptor(access)
    server = grpc.server(pool, options=options, maximum_concurrent_rpcs=max_calls,
                         interceptors=[tokens] if tokens is not None else None)  # fmt: skip
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(tr), server)
    address = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
    try:
        if access.tls:
            bound = server.add_secure_port(address, access.server_credentials())
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio >= 1.53 raises where older ones answered 0
        bound = 0
    if not bound:
        raise ConfigError(f"serve.grpc_port: cannot listen on {address} (in use, or not an "
                          "address of this host)")  # fmt: skip
    server.start()
    return server, bound


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("traci-ml")
    except PackageNotFoundError:
        return "0"
