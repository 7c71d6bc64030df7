"""A recording man-in-the-middle: every frame between the peers and a live broker, kept.

    expert i --DEALER--> [ROUTER  recorder  DEALER per peer connection] --> broker ROUTER
    reducer  --DEALER--> [ROUTER  recorder  DEALER per peer connection] --> broker ROUTER

Everything is forwarded unchanged, in order, both ways; each frame is also kept, tagged with
the party (``expert-<i>`` from its HELLO, or ``reducer``) and the direction: ``up`` (the
party sent it: the broker received it) or ``down`` (the broker sent it: the party received
it). Used to prove what each party, the broker included, gets to see (tests/integration/
test_parties.py).
"""

from __future__ import annotations

from collections import defaultdict

import msgpack
import zmq

from tests.helpers.middleman import EXPERT, REDUCER, MiddleMan


class Recorder(MiddleMan):
    def __init__(self, *, broker_experts: str, broker_reducer: str) -> None:
        super().__init__(
            broker_experts=broker_experts, broker_reducer=broker_reducer, name="recorder"
        )
        self.links: dict[tuple[str, bytes], zmq.Socket] = {}
        self.back: dict[zmq.Socket, tuple[str, bytes]] = {}
        self.party: dict[tuple[str, bytes], str] = {}
        # (party, "up" | "down") -> frames seen, in order
        self.frames: dict[tuple[str, str], list[bytes]] = defaultdict(list)
        self.kinds: dict[tuple[str, str], list[str]] = defaultdict(list)

    def _turn(self) -> None:
        for sock, _ in self.poller.poll(20):
            self._drain(sock)

    def _sockets(self) -> list[zmq.Socket]:
        return [*self.front.values(), *self.back]

    def _drain(self, sock: zmq.Socket) -> None:
        for frames in self._ready(sock, 500):
            if sock in self.back:  # broker -> party
                key = self.back[sock]
                self._keep(key, "down", frames)
                self.front[key[0]].send_multipart([key[1], *frames])
                continue
            side = EXPERT if sock is self.front[EXPERT] else REDUCER
            key = (side, frames[0])
            upstream = self.links.get(key)
            if upstream is None:
                upstream = self.links[key] = self._socket(zmq.DEALER)
                upstream.connect(self.endpoints[side])
                self.poller.register(upstream, zmq.POLLIN)
                self.back[upstream] = key
            self._keep(key, "up", frames[1:])
            upstream.send_multipart(frames[1:])

    def _keep(self, key: tuple[str, bytes], direction: str, frames: list[bytes]) -> None:
        kind = ""
        try:
            header = msgpack.unpackb(frames[0], raw=False)
            kind = header.get("k", "") if isinstance(header, dict) else ""
            if kind == "HELLO" and direction == "up":
                eid = header.get("expert_id", -1)
                self.party[key] = f"expert-{eid}" if header.get("role") == EXPERT else REDUCER
        except Exception:  # not ours to judge: kept as it is
            pass
        party = self.party.get(key, f"unknown-{key[0]}")
        self.frames[(party, direction)].extend(frames)
        self.kinds[(party, direction)].append(kind)
