"""Free loopback ports, nested config updates, a fake broker and a service run against it,
shared by the tests."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from bench.e2e import EXPERT_BLOCK, free_ports  # noqa: F401 -- the tests' free ports
from traci_ml import proto
from traci_ml.core.config import Config, load_config


def deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            deep_update(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def fake_broker_config(settings: dict[str, str], extra: dict[str, str]) -> Config:
    """The config of a service run against a ``FakeBroker``: ``settings``, then ``extra``, over
    two fresh loopback ports, quick heartbeats (0.05 s, 2 s liveness) and no metrics servers."""
    expert_port, reducer_port = free_ports(2)
    network = {
        "network.expert_port": str(expert_port), "network.reducer_port": str(reducer_port),
        "network.heartbeat_interval": "0.05", "network.liveness": "2.0",
        "network.connect_timeout": "10", "metrics.broker_port": "0",
        "metrics.reducer_port": "0", "metrics.expert_base_port": "0",
    }  # fmt: skip
    return load_config(overrides={**settings, **network, **extra}, env={})


def generate_keys(traci: list[str], keys: Path, config: Path) -> str:
    """``traci keys generate KEYS --config CONFIG`` (``traci``: how to run the CLI), which must
    succeed; returns what it printed."""
    made = subprocess.run(
        [*traci, "keys", "generate", str(keys), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    return made.stdout


class FakeBroker:
    """A broker ROUTER socket (expert- or reducer-facing), driven by the test thread."""

    def __init__(self, port: int) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"tcp://127.0.0.1:{port}")
        self.peer: bytes | None = None  # routing id of the last sender
        self.last_beat = 0.0

    def send(self, msg: proto.Message) -> None:
        assert self.peer is not None, "nobody connected yet"
        self.sock.send_multipart([self.peer, *proto.encode(msg)], copy=False)

    def next(self, timeout: float = 5.0) -> proto.Message | None:
        """The next message that is not a HEARTBEAT, or None after ``timeout`` seconds.
        While waiting, heartbeats keep the peer from declaring the broker lost."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.peer is not None and time.monotonic() - self.last_beat > 0.1:
                self.send(proto.Heartbeat())
                self.last_beat = time.monotonic()
            if self.sock.poll(int(min(left, 0.05) * 1000) + 1):
                routing_id, *frames = self.sock.recv_multipart(copy=False)
                self.peer = routing_id.bytes
                msg = proto.decode(frames)
                if not isinstance(msg, proto.Heartbeat):
                    return msg
        return None

    def serve(self, seconds: float) -> list[proto.Message]:
        """Heartbeat for ``seconds``; returns what the peer sent meanwhile (no HEARTBEATs)."""
        got, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if (msg := self.next(left)) is not None:
                got.append(msg)
        return got

    def expect(self, kind: type, timeout: float = 5.0):  # noqa: ANN201 - returns a `kind`
        msg = self.next(timeout)
        assert isinstance(msg, kind), f"expected {kind.__name__}, got {msg!r}"
        return msg

    def quiet(self, wait: float = 0.3) -> None:
        msg = self.next(wait)
        assert msg is None, f"expected silence, got {msg!r}"

    def close(self, *, term: bool) -> None:
        self.sock.close(linger=0)
        if term:
            self.context.term()


class ServiceRig:
    """A service whose run() is in a background thread, and the ``FakeBroker`` it talks to.

    ``make(context, stop)`` builds the service on the broker's zmq context with ``stop`` as
    its stop event; ``name`` is what a run() that does not return is called in the failure."""

    def __init__(self, port: int, make: Callable[[zmq.Context, threading.Event], Any], name: str):
        self.broker = FakeBroker(port)
        self.stop = threading.Event()
        self.service = make(self.broker.context, self.stop)
        self.name = name
        self.result: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.service.run()
        except BaseException as exc:  # re-raised in the test thread by join()
            self.error = exc

    def welcome(self, start_seq: int = 0) -> proto.Hello:
        hello = self.broker.expect(proto.Hello)
        self.broker.send(proto.Welcome(ok=True, start_seq=start_seq))
        return hello

    def join(self, timeout: float = 10.0) -> int | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.name}.run() did not return"
        if self.error is not None:
            raise self.error
        return self.result

    def close(self) -> None:
        self.stop.set()
        self.thread.join(15)
        self.broker.close(term=not self.thread.is_alive())
