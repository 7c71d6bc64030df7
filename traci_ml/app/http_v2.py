"""The Open Inference Protocol (KServe v2 REST) in front of the broker's front door.

A thin translator (docs/serving.md#http-open-inference-protocol): each HTTP request becomes a
``traci_ml.Client`` request to the ZeroMQ front door and its REPLY becomes the protocol's
answer. No model code here: the columns and classes it describes come from the run's
``preprocess.json``; readiness is the broker's ``traci_broker_serve_ready``.

    GET  /v2/health/live            200 while this process runs
    GET  /v2/health/ready           200 while the front door can answer, else 503
    GET  /v2/models/{name}          metadata: one input per feature column, and ``id``
    GET  /v2/models/{name}/ready    as /v2/health/ready, for the run's model name
    POST /v2/models/{name}/infer    JSON tensors, or the binary tensor extension

Inputs are the feature columns, one tensor each, shape ``[R]`` or ``[R, 1]`` (any numeric
datatype), or a single tensor ``id`` (INT64 or BYTES, shape ``[R]``): rows by id. Outputs:
classification ``probabilities`` FP32 ``[R, C]`` and ``label`` BYTES ``[R]``; regression
``value`` FP32 ``[R, 1]``. Errors: ``{"error": "..."}`` with 400 (the request), 401 (no
listed token, ``http_auth``), 404 (an unknown model), 413 (a body over
``serve.http_max_body_mb``), 429 (busy), 503 (cannot answer now), 504 (timeout) or 500.
What this shares with the protocol's gRPC side (``grpc_v2``, served by the same process
with ``traci http --grpc-port``) is in ``oip``.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

from traci_ml.app.client import ServeError
from traci_ml.app.http_auth import Access, access_for, guard
from traci_ml.app.http_tensors import decode_request, encode_response, read_inputs
from traci_ml.app.oip import BadTensor, Translator, failure, max_body
from traci_ml.core.config import Config

log = logging.getLogger(__name__)
# a front-door status's kind (oip.FAILURE) as an HTTP code
STATUS = {"invalid": 400, "busy": 429, "unavailable": 503, "timeout": 504, "internal": 500}


def infer_body(
    tr: Translator, body: bytes, header_length: int | None
) -> tuple[bytes, dict[str, str]]:
    """One inference request's body to the response body and its headers."""
    request, blobs = decode_request(body, header_length)
    rows, ids = read_inputs(request, blobs)
    outputs, params = tr.predict(rows, ids)
    return encode_response(tr.name, request, outputs, params)


def build_app(tr: Translator):  # -> starlette.applications.Starlette
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def error(message: str, code: int) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=code)

    def known(request: Request) -> JSONResponse | None:
        name = request.path_params["name"]
        if name != tr.name:
            return error(f"unknown model '{name}': this server serves '{tr.name}'", 404)
        return None

    def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    def ready(request: Request) -> Response:
        ok = tr.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    def model(request: Request) -> Response:
        return known(request) or JSONResponse(tr.metadata())

    def model_ready(request: Request) -> Response:
        if (bad := known(request)) is not None:
            return bad
        ok = tr.ready()
        return JSONResponse({"name": tr.name, "ready": ok}, status_code=200 if ok else 503)

    limit = max_body(tr.config)

    def too_large(size: int | str) -> JSONResponse:
        return error(f"the request body ({size} bytes) exceeds serve.http_max_body_mb "
                     f"({limit} bytes)", 413)  # fmt: skip

    async def infer(request: Request) -> Response:
        if (bad := known(request)) is not None:
            return bad
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused before it is read
            return too_large(declared)
        chunks, size = [], 0
        async for chunk in request.stream():  # chunked, or a Content-Length that lies
            size += len(chunk)
            if size > limit:
                return too_large(f"over {limit}")
            chunks.append(chunk)
        body = b"".join(chunks)
        length = request.headers.get("inference-header-content-length")
        from starlette.concurrency import run_in_threadpool

        try:
            size = None if length is None else int(length) if length.isdigit() else -1
            out, headers = await run_in_threadpool(infer_body, tr, body, size)
        except ValueError as exc:  # BadTensor too
            return error(str(exc), 400)
        except ServeError as exc:
            return error(f"{exc.status}: {exc.detail}", STATUS[failure(exc)])
        except Exception as exc:  # a bug here: answered in the protocol's shape, logged
            log.exception("http: inference failed")
            return error(f"internal: {type(exc).__name__}: {exc}", 500)
        return Response(out, headers=headers)

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/{name}", model),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def run(config: Config) -> int:
    """``traci http``: serve the protocol's REST side on ``serve.http_bind:serve.http_port``
    and its gRPC side (``grpc_v2``) on ``serve.http_bind:serve.grpc_port``, both in this
    process, until stopped. Either may be off (port 0), not both."""
    import uvicorn

    from traci_ml.app.http_conn import Closed, protocol
    from traci_ml.core.errors import ConfigError
    from traci_ml.core.security import peer_keys, tcp_endpoint

    s = config.serve
    if not (s.http_port or s.grpc_port) or not config.network.serve_port:
        raise ConfigError("traci http needs network.serve_port and serve.http_port or "
                          "serve.grpc_port (--grpc-port; 0 is off)")  # fmt: skip
    access = access_for(config)  # before anything listens: TLS, tokens, the bind rule
    endpoint = tcp_endpoint(config.network.broker_host, config.network.serve_port)
    tr = Translator(config, endpoint, curve=peer_keys(config, "client"))
    sock = _listen(s.http_bind, s.http_port) if s.http_port else None
    scheme = "https" if access.tls else "http"
    where = [f"{scheme}://{_host(s.http_bind)}:{s.http_port}/v2"] if sock is not None else []
    grpc_server = None
    if s.grpc_port:
        from traci_ml.app.grpc_v2 import start

        grpc_server, _ = start(tr, s.http_bind, s.grpc_port, access=access)
        where.append(f"grpc{'s' * access.tls} {_host(s.http_bind)}:{s.grpc_port}")
        signal.signal(signal.SIGTERM, _exit)  # so that the finally below stops it
    tokens = f", {len(access.tokens)} token(s) asked" if access.tokens else ""
    tokens += ", client certificates asked" if access.client_ca else ""
    log.info("http ready: Open Inference Protocol on %s (model '%s'%s) -> %s",
             " and ".join(where), tr.name, tokens, endpoint)  # fmt: skip
    try:
        if sock is not None:  # uvicorn raises the SIGINT/SIGTERM it stopped for again
            conn = protocol(s.http_read_timeout, s.http_max_connections, Closed())
            app = uvicorn.Config(guard(build_app(tr), access), log_level="warning",
                                 access_log=False, http=conn, **access.uvicorn_ssl(),
                                 limit_concurrency=s.http_max_connections + 1)  # fmt: skip
            _server_class()(app, access).run(sockets=[sock])
        else:
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        if grpc_server is None:
            raise
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=1.0).wait(2.0)
        tr.close()
    return 0


def _server_class():  # -> type[uvicorn.Server]
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, taking rotated TLS files without a restart: once a second, on
        the event loop's thread, changed files are loaded into its SSL context (new
        handshakes use them)."""

        def __init__(self, config: uvicorn.Config, access: Access) -> None:
            super().__init__(config)
            self.access = access
            self.watch = access.tls_files() if access.tls else None

        async def on_tick(self, counter: int) -> bool:
            if self.watch is not None and counter % 10 == 0 and self.config.ssl is not None:
                self.access.reload_tls(self.config.ssl, self.watch)
            return await super().on_tick(counter)

    return Server


def _listen(bind: str, port: int):  # -> socket.socket
    import socket

    from traci_ml.core.errors import ConfigError

    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that name it, and
    # without it every response waited ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind, port))
    except OSError as exc:
        raise ConfigError(f"serve.http_port {bind}:{port}: {exc.strerror}") from None
    return sock


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _host(bind: str) -> str:
    return f"[{bind}]" if ":" in bind else bind


__all__ = ["BadTensor", "Translator", "build_app", "run"]
