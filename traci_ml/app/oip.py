"""The Open Inference Protocol (KServe v2), what its REST (``http_v2``) and gRPC (``grpc_v2``)
sides share: the model's description, readiness, one Client per thread, the rules that turn
input tensors into the front door's rows or ids, the outputs of a ``Prediction``, and what
each front-door status means to the protocol (docs/serving.md#http-open-inference-protocol).
Every refusal of a request is a ``BadTensor`` (a ValueError: HTTP 400, gRPC INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
import struct
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from traci_ml.app.client import Client, ServeError
from traci_ml.core.config import Config
from traci_ml.core.observe import metrics_url
from traci_ml.core.rundir import RunDir

NUMERIC = {
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip
ID_INPUT = "id"
# a front-door status (ServeError.status) as the protocol's kind of failure; anything else
# (expert_error, reducer_error, ...) is "internal"
FAILURE = {
    "bad_request": "invalid", "oversize": "invalid", "missing_columns": "invalid",
    "busy": "busy",
    "no_reducer": "unavailable", "no_expert": "unavailable", "shutdown": "unavailable",
    "timeout": "timeout",
}  # fmt: skip
READY_CACHE = 0.25  # seconds a readiness answer is reused


class BadTensor(ValueError):
    """A request the protocol's rules refuse (HTTP 400, gRPC INVALID_ARGUMENT)."""


def max_body(config: Config) -> int:
    """``serve.http_max_body_mb`` in bytes: the largest REST body or gRPC message read."""
    return int(config.serve.http_max_body_mb * 1024 * 1024)


def failure(exc: ServeError) -> str:
    """``exc``'s kind of failure (``FAILURE``)."""
    return FAILURE.get(exc.status, "internal")


class Translator:
    """What both sides need: the model's description, a Client per thread, readiness, and
    one prediction as the protocol's outputs."""

    def __init__(self, config: Config, endpoint: str, *, curve: Any = None) -> None:
        self.config, self.endpoint, self.curve = config, endpoint, curve
        self.name = config.run_id
        prep = _preprocess(config)
        self.task = prep.get("task")
        self.columns = tuple(prep.get("columns", ()))
        self.classes = tuple(str(c) for c in prep.get("classes", ()))
        self.timeout = config.serve.timeout * 2 + 1  # seconds a request waits, at most
        self._local = threading.local()
        self._clients: list[Client] = []
        self._ready = (float("-inf"), False)

    def client(self) -> Client:
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = Client(self.endpoint, timeout=self.timeout, curve=self.curve)
            self._clients.append(c)  # list.append: atomic
        return c

    def close(self) -> None:
        """Close every thread's Client (once no request is being answered)."""
        while self._clients:
            self._clients.pop().close()

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
        inputs.append({"name": ID_INPUT, "datatype": "INT64", "shape": [-1]})
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

    def predict(
        self, rows: dict | None, ids: list | None, *, timeout: float | None = None
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Rows (column -> values) or ids to the outputs (name -> an FP32 array or a list of
        str: BYTES) and the response's parameters. Raises ``ServeError``."""
        if ids is not None:
            pred = self.client().predict_ids(ids, timeout=timeout)
        else:
            pred = self.client().predict(rows, timeout=timeout)
        if pred.task == "regression":
            outputs = {"value": pred.outputs.astype("float32").reshape(-1, 1)}
        else:
            outputs = {"probabilities": pred.outputs.astype("float32"),
                       "label": [str(v) for v in pred.labels]}  # fmt: skip
        params = {"experts": ",".join(str(e) for e in pred.experts),
                  "classes": json.dumps(list(pred.classes))}  # fmt: skip
        return outputs, params


# -- input tensors ---------------------------------------------------------------------------


def column_length(name: str, datatype: Any, shape: Any) -> int:
    """R of one input of shape [R] or [R, 1] whose datatype the protocol allows here."""
    if datatype != "BYTES" and datatype not in NUMERIC:
        raise BadTensor(f"input '{name}' has datatype {datatype!r}: BYTES or a numeric type")
    ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
    if not ok or len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise BadTensor(f"input '{name}' has shape {shape}: one column is [R] or [R, 1]")
    return shape[0]


def from_raw(raw: bytes, datatype: str, name: str) -> np.ndarray:
    """An input's elements from its raw bytes: little-endian numbers, or BYTES elements
    each a 4-byte little-endian length and then its bytes."""
    if datatype == "BYTES":
        return _bytes_elements(raw, name)
    dtype = np.dtype(NUMERIC[datatype]).newbyteorder("<")
    if len(raw) % dtype.itemsize:
        raise BadTensor(f"input '{name}': {len(raw)} bytes are not whole {datatype} values")
    return np.frombuffer(raw, dtype=dtype)


def _bytes_elements(raw: bytes, name: str) -> np.ndarray:
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise BadTensor(f"input '{name}': a BYTES element's length is cut off")
        (k,) = struct.unpack_from("<I", raw, at)
        if at + 4 + k > len(raw):
            raise BadTensor(f"input '{name}': a BYTES element runs past the data")
        out.append(raw[at + 4 : at + 4 + k])
        at += 4 + k
    return np.array(out, dtype=object)


def rows_or_ids(tensors: Mapping[str, np.ndarray]) -> tuple[dict | None, list | None]:
    """Named 1-D inputs to ``(columns -> float64 values, None)`` for feature rows or
    ``(None, ids)`` for rows by id (a single input ``id``, integers or BYTES)."""
    if ID_INPUT in tensors:
        if len(tensors) > 1:
            raise BadTensor(f"input '{ID_INPUT}' asks rows by id: send it alone")
        ids = tensors[ID_INPUT]
        if ids.dtype.kind not in "iuO":
            raise BadTensor(f"input '{ID_INPUT}' is INT64 or BYTES, not {ids.dtype}")
        try:
            return None, [v.decode() if isinstance(v, bytes) else v for v in ids.tolist()]
        except UnicodeDecodeError:
            raise BadTensor(f"input '{ID_INPUT}': a BYTES id is not UTF-8 text") from None
    rows = {}
    for name, v in tensors.items():
        if v.dtype.kind not in "iuf":
            raise BadTensor(f"input '{name}' is a feature column: a numeric datatype, not BYTES")
        rows[name] = v.astype(np.float64)
    if len({len(v) for v in rows.values()}) > 1:
        shapes = ", ".join(f"{n}: {len(v)}" for n, v in rows.items())
        raise BadTensor(f"the feature columns hold different numbers of rows ({shapes})")
    return rows, None


# -- outputs ---------------------------------------------------------------------------------


def check_outputs(asked: Iterable[Any], outputs: Mapping[str, Any]) -> None:
    """Refuse an output name the model does not have."""
    for name in asked:
        if name not in outputs:
            raise BadTensor(f"unknown output {name!r}: {', '.join(outputs)}")


def raw_output(value: np.ndarray | Sequence[str]) -> tuple[str, list[int], bytes]:
    """An output's datatype, shape and raw bytes (FP32 little-endian, or BYTES elements)."""
    if isinstance(value, np.ndarray):
        return "FP32", list(value.shape), np.ascontiguousarray(value, dtype="<f4").tobytes()
    return "BYTES", [len(value)], b"".join(bytes_element(v) for v in value)


def bytes_element(v: str | bytes) -> bytes:
    b = v.encode() if isinstance(v, str) else v
    return struct.pack("<I", len(b)) + b


# -- the run and the broker ------------------------------------------------------------------


def _preprocess(config: Config) -> dict[str, Any]:
    """The run's preprocess.json as JSON (no torch): {} for a run without one (parties)."""
    path = RunDir(config.run_path).path / RunDir.PREPROCESS
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _scrape_ready(bind: str, port: int) -> bool:
    url = metrics_url(bind, port, ["traci_broker_serve_ready"])
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            text = resp.read().decode()
    except Exception:
        return False
    return any(line.split(" ")[:2] == ["traci_broker_serve_ready", "1.0"]
               for line in text.splitlines())  # fmt: skip
