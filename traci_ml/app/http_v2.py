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
``value`` FP32 ``[R, 1]``. Errors: ``{"error": "..."}`` with 400 (the request), 404 (an
unknown model), 503 (cannot answer now), 504 (timeout) or 500.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from traci_ml.app.client import Client, ServeError
from traci_ml.app.http_tensors import (
    BadTensor,
    decode_request,
    encode_response,
    read_inputs,
)
from traci_ml.core.config import Config
from traci_ml.core.rundir import RunDir

log = logging.getLogger(__name__)
HTTP_CODE = {
    "bad_request": 400,
    "oversize": 400,
    "missing_columns": 400,
    "busy": 429,
    "no_reducer": 503,
    "no_expert": 503,
    "shutdown": 503,
    "timeout": 504,
}  # fmt: skip  (expert_error, reducer_error and anything else: 500)
READY_CACHE = 0.25  # seconds a readiness answer is reused


class Translator:
    """What the endpoints need: the model's description, a Client per thread, readiness."""

    def __init__(self, config: Config, endpoint: str, *, curve: Any = None) -> None:
        self.config, self.endpoint, self.curve = config, endpoint, curve
        self.name = config.run_id
        prep = _preprocess(config)
        self.task = prep.get("task")
        self.columns = tuple(prep.get("columns", ()))
        self.classes = tuple(str(c) for c in prep.get("classes", ()))
        self._local = threading.local()
        self._ready = (float("-inf"), False)

    def client(self) -> Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = Client(
                self.endpoint, timeout=self.config.serve.timeout * 2 + 1, curve=self.curve
            )
        return c

    def ready(self) -> bool:
        """The broker's ``traci_broker_serve_ready`` (what ``traci health broker --ready``
        asks); with its metrics off, whether a one-row query of zeros is answered."""
        at, was = self._ready
        if time.monotonic() - at < READY_CACHE:
            return was
        m = self.config.metrics
        if m.broker_port:
            now = _scrape_ready(m.bind, m.broker_port)
        elif self.columns:
            try:
                self.client().predict([[0.0] * len(self.columns)], self.columns, timeout=1.0)
                now = True
            except ServeError:
                now = False
        else:
            now = False
        self._ready = (time.monotonic(), now)
        return now

    def metadata(self) -> dict[str, Any]:
        inputs = [{"name": c, "datatype": "FP32", "shape": [-1]} for c in self.columns]
        inputs.append({"name": "id", "datatype": "INT64", "shape": [-1]})
        if self.task == "regression":
            outputs = [{"name": "value", "datatype": "FP32", "shape": [-1, 1]}]
        else:
            outputs = [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.classes)]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
            ]
        params = {"task": self.task or "", "classes": json.dumps(self.classes)}
        return {"name": self.name, "versions": ["1"], "platform": "traci",
                "inputs": inputs, "outputs": outputs, "parameters": params}  # fmt: skip

    def infer(self, body: bytes, header_length: int | None) -> tuple[bytes, dict[str, str]]:
        """One inference request's body to the response body and its headers."""
        request, blobs = decode_request(body, header_length)
        rows, ids = read_inputs(request, blobs)
        if ids is not None:
            pred = self.client().predict_ids(ids)
        else:
            pred = self.client().predict(rows)
        if pred.task == "regression":
            outputs = {"value": pred.outputs.astype("float32").reshape(-1, 1)}
        else:
            outputs = {"probabilities": pred.outputs.astype("float32"),
                       "label": [str(v) for v in pred.labels]}  # fmt: skip
        params = {"experts": ",".join(str(e) for e in pred.experts),
                  "classes": json.dumps(list(pred.classes))}  # fmt: skip
        return encode_response(self.name, request, outputs, params)


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

    async def infer(request: Request) -> Response:
        if (bad := known(request)) is not None:
            return bad
        body = await request.body()
        length = request.headers.get("inference-header-content-length")
        from starlette.concurrency import run_in_threadpool

        try:
            size = int(length) if length is not None else None
            out, headers = await run_in_threadpool(tr.infer, body, size)
        except ValueError as exc:  # BadTensor too
            return error(str(exc), 400)
        except ServeError as exc:
            return error(f"{exc.status}: {exc.detail}", HTTP_CODE.get(exc.status, 500))
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
    """``traci http``: serve the protocol on ``serve.http_bind:serve.http_port`` until stopped."""
    import socket

    import uvicorn

    from traci_ml.core.errors import ConfigError
    from traci_ml.core.security import peer_keys, tcp_endpoint

    s = config.serve
    if not s.http_port or not config.network.serve_port:
        raise ConfigError("traci http needs serve.http_port and network.serve_port (one is 0)")
    endpoint = tcp_endpoint(config.network.broker_host, config.network.serve_port)
    tr = Translator(config, endpoint, curve=peer_keys(config, "client"))
    family = socket.AF_INET6 if ":" in s.http_bind else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that name it, and
    # without it every response waited ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((s.http_bind, s.http_port))
    except OSError as exc:
        raise ConfigError(f"serve.http_port {s.http_bind}:{s.http_port}: {exc.strerror}") from None
    log.info("http ready: Open Inference Protocol on http://%s:%d/v2 (model '%s') -> %s",
             s.http_bind, s.http_port, tr.name, endpoint)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(build_app(tr), log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0


def _preprocess(config: Config) -> dict[str, Any]:
    """The run's preprocess.json as JSON (no torch): {} for a run without one (parties)."""
    path = RunDir(config.run_path).path / RunDir.PREPROCESS
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _scrape_ready(bind: str, port: int) -> bool:
    host = "127.0.0.1" if bind in ("0.0.0.0", "") else "::1" if bind == "::" else bind
    host = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=1.0) as resp:
            text = resp.read().decode()
    except Exception:
        return False
    return any(line.split(" ")[:2] == ["traci_broker_serve_ready", "1.0"]
               for line in text.splitlines())  # fmt: skip


__all__ = ["BadTensor", "Translator", "build_app", "run"]
