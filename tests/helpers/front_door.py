"""A fake front door for the Open Inference Protocol's unit tests (tests/test_grpc_v2.py,
tests/test_http_translator.py): a ZeroMQ ROUTER that answers QUERYs as the broker's front
door does, with a toy model, and a ``Translator`` in front of it for a run whose
preprocess.json names columns a and b and classes cat and dog. The fixtures ``door`` and
``translator`` (registered for every test by tests/conftest.py) give both."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from traci_ml import proto
from traci_ml.app.oip import Translator
from traci_ml.core.config import Config
from traci_ml.core.errors import ProtocolError
from traci_ml.core.rundir import RunDir
from traci_ml.core.security import ServerKeys, apply_domain, apply_server, start_authenticator

MODEL = "toy"
CLASSES = ("cat", "dog")


def dog(x: np.ndarray) -> np.ndarray:
    """The fake model: P(dog) of each row (R, F) or id (R,), as float32 probabilities (R, 2)."""
    s = x.reshape(len(x), -1).sum(axis=1)
    p = 1 / (1 + np.exp(-s))
    return np.stack([1 - p, p], 1).astype(np.float32)


class FrontDoor:
    """Answers as the broker's front door: ``missing_columns`` for rows lacking a or b, else
    ``dog``'s probabilities; ``status`` set: that error instead; ``silent``: no answer."""

    def __init__(self, curve: ServerKeys | None = None) -> None:
        """``curve``: a CURVE front door as the broker's (its own context and ZAP handler,
        admitting the ``client`` keys listed in ``curve.authorized``)."""
        self.status: str | None = None
        self.silent = False
        self.asked: list[proto.Query] = []
        self._ctx = zmq.Context() if curve else zmq.Context.instance()
        self._auth = start_authenticator(self._ctx, curve.authorized) if curve else None
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve:
            apply_server(self._sock, curve)
            apply_domain(self._sock, "client")
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            who, *frames = self._sock.recv_multipart()
            try:
                query = proto.decode(frames)
            except ProtocolError as exc:  # as the broker answers a bad QUERY
                self.asked.append(None)
                reply = proto.Reply(-1, "bad_request", str(exc))
                self._sock.send_multipart([who, *proto.encode(reply)])
                continue
            self.asked.append(query)
            if self.silent:
                continue
            self._sock.send_multipart([who, *proto.encode(self._answer(query))])

    def _answer(self, q: proto.Query) -> proto.Reply:
        if self.status is not None:
            return proto.Reply(q.qid, self.status, f"the fake says {self.status}")
        if q.ids:
            out = dog(np.array([hash(i) % 7 if isinstance(i, str) else i for i in q.ids], float))
        else:
            if not {"a", "b"} <= set(q.columns):
                return proto.Reply(q.qid, "missing_columns", "an expert reads a and b")
            x = q.tensors[0].numpy()
            out = dog(x[:, [q.columns.index("a"), q.columns.index("b")]])
        tensors = (proto.Tensor.from_numpy(out),)
        return proto.Reply(q.qid, "ok", task="classification", classes=CLASSES, experts=(0, 1),
                           expert_names=("left", "right"), batch_rows=len(out),
                           tensors=tensors)  # fmt: skip

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        if self._auth is not None:
            self._auth.stop()
            self._ctx.term()


def make_translator(run_dir: Path, door: FrontDoor) -> Translator:
    """A Translator for a run at ``run_dir`` (written here: its preprocess.json) asking
    ``door``; the broker's metrics off, so readiness is a one-row query."""
    config = Config.model_validate({
        "run_id": MODEL, "run_dir": str(run_dir),
        "metrics": {"broker_port": 0}, "serve": {"timeout": 0.2},
    })  # fmt: skip
    run = RunDir(config.run_path).path
    run.mkdir(parents=True)
    prep = {"task": "classification", "columns": ["a", "b"], "classes": list(CLASSES)}
    (run / RunDir.PREPROCESS).write_text(json.dumps(prep))
    return Translator(config, door.endpoint)


@pytest.fixture
def door() -> Iterator[FrontDoor]:
    d = FrontDoor()
    yield d
    d.close()


@pytest.fixture
def translator(tmp_path: Path, door: FrontDoor) -> Iterator[Translator]:
    tr = make_translator(tmp_path / "run", door)
    yield tr
    tr.close()


def spawn_http(tmp_path: Path, door: FrontDoor, serve: dict) -> tuple[subprocess.Popen, int, int]:
    """`traci http` (REST and gRPC, on free ports) as a process, in front of ``door``, for a
    run whose preprocess.json names columns a and b (classes cat and dog); ``serve``: more
    of the config's ``serve`` section. Returns (process, REST port, gRPC port); its output
    (WARNING and up) is on its stdout pipe."""
    from tests.helpers.support import free_ports

    http_port, grpc_port = free_ports(2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "preprocess.json").write_text(json.dumps(
        {"task": "classification", "columns": ["a", "b"], "classes": list(CLASSES)}))  # fmt: skip
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(json.dumps({
        "run_id": MODEL, "run_dir": str(tmp_path / "run"), "metrics": {"broker_port": 0},
        "network": {"serve_port": int(door.endpoint.rsplit(":", 1)[1])},
        "serve": {"http_port": http_port, **serve},
    }))  # fmt: skip
    argv = [sys.executable, "-m", "traci_ml.app.cli", "http", "--config", str(cfg),
            "--grpc-port", str(grpc_port), "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, http_port, grpc_port


def wait_up(proc: subprocess.Popen, check, seconds: float = 60.0) -> None:  # noqa: ANN001
    """Until ``check()`` (an OSError counts as not yet), failing if ``proc`` ends first or
    ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "traci http never came up"
        time.sleep(0.3)
