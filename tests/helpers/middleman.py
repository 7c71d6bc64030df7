"""What the recording and the fuzzing man-in-the-middle share: the broker's two ports, stood in.

    expert i --DEALER--> [ROUTER  middle man  DEALER per peer connection] --> broker ROUTER
    reducer  --DEALER--> [ROUTER  middle man  DEALER per peer connection] --> broker ROUTER

``ports`` are where the peers connect instead of the broker (``EXPERT``, ``REDUCER``);
``endpoints`` are the broker's. Every socket lives in the one thread that runs the loop
(``_turn`` again and again until ``stop``, then every socket of ``_sockets`` closed);
``SNDHWM``/``RCVHWM`` are 0 so the middle man itself never drops a message."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import zmq

EXPERT, REDUCER = "expert", "reducer"


class MiddleMan:
    def __init__(self, *, broker_experts: str, broker_reducer: str, name: str) -> None:
        self.endpoints = {EXPERT: broker_experts, REDUCER: broker_reducer}
        self.context = zmq.Context()
        self.poller = zmq.Poller()
        self.front = {side: self._socket(zmq.ROUTER) for side in (EXPERT, REDUCER)}
        self.ports = {}
        for side, sock in self.front.items():
            self.ports[side] = sock.bind_to_random_port("tcp://127.0.0.1")
            self.poller.register(sock, zmq.POLLIN)
        self.error: BaseException | None = None  # what ended the loop, for the test to raise
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)

    def _socket(self, kind: int) -> zmq.Socket:
        sock = self.context.socket(kind)
        for opt, value in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
            sock.setsockopt(opt, value)
        return sock

    @staticmethod
    def _ready(sock: zmq.Socket, most: int) -> Iterator[list[bytes]]:
        """Up to ``most`` messages that ``sock`` holds now, without waiting for more."""
        for _ in range(most):
            try:
                yield sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._turn()
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            for sock in self._sockets():
                sock.close(linger=0)
            self.context.term()

    def _turn(self) -> None:
        """One pass of the loop: poll and forward (and whatever else the middle man does)."""
        raise NotImplementedError

    def _sockets(self) -> list[zmq.Socket]:
        """Every socket, closed when the loop ends."""
        raise NotImplementedError
