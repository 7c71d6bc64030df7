"""A real BrokerService on loopback for the broker tests, and reading from its sockets."""

from __future__ import annotations

import threading
import time

import zmq

from traci_ml import proto
from traci_ml.core.config import load_config
from traci_ml.services.broker.service import BrokerService


class BrokerNet:
    """A broker on random loopback ports (its loop in a thread) and the test's DEALERs.

    ``overrides`` are ``load_config`` overrides (dotted keys, string values)."""

    def __init__(self, overrides: dict[str, str]) -> None:
        config = load_config(overrides=overrides, env={})
        any_port = "tcp://127.0.0.1:*"
        self.broker = BrokerService(config, expert_endpoint=any_port, reducer_endpoint=any_port,
                                    client_endpoint=any_port)  # fmt: skip
        self.thread = threading.Thread(target=self.broker.run)
        self.thread.start()
        self.ctx = zmq.Context()
        self.sockets: list[zmq.Socket] = []

    def dealer(self, endpoint: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        self.broker.stop()
        self.thread.join(5)
        for sock in self.sockets:
            sock.close(linger=0)
        self.ctx.term()


def recv(sock: zmq.Socket, timeout: float = 3.0) -> proto.Message:
    """The next message on ``sock`` that is not a HEARTBEAT; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000)):
        msg = proto.decode(sock.recv_multipart())
        if not isinstance(msg, proto.Heartbeat):
            return msg
    raise AssertionError("nothing arrived")
