"""BrokerLink.post: messages from another thread (an expert's compute stream) reach the
broker in the order posted, whether or not the polling thread is inside ``recv``."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from traci_ml import proto
from traci_ml.core.link import BrokerLink, dealer

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def wired():
    """(link with a connected socket, the ROUTER standing in for the broker)."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    hello = lambda: proto.Hello("expert", "r", 4, "float32", expert_id=0, window=2)  # noqa: E731
    # a long poll slice (heartbeat_interval / 4 = 1 s): a post must not wait it out
    link = BrokerLink(context, f"tcp://127.0.0.1:{port}", hello, heartbeat_interval=4.0,
                      liveness=60.0)  # fmt: skip
    link.socket = dealer(context, link.endpoint, None)  # registered: the broker's side faked
    yield link, router
    link.close()
    router.close(0)
    context.term()


def received(router: zmq.Socket, n: int) -> list[proto.Message]:
    out = []
    for _ in range(n):
        assert router.poll(5000), f"only {len(out)} of {n} messages arrived"
        frames = router.recv_multipart()
        out.append(proto.decode(frames[1:]))
    return out


def test_a_post_with_nobody_in_recv_is_sent_at_once(wired) -> None:
    link, router = wired
    worker = threading.Thread(target=lambda: [link.post(proto.Heartbeat()) for _ in range(3)])
    worker.start()
    worker.join()
    assert [m.KIND for m in received(router, 3)] == [proto.Heartbeat.KIND] * 3


def test_posts_during_recv_arrive_in_order_and_recv_still_answers(wired) -> None:
    link, router = wired
    got: list[proto.Message | None] = []
    polling = threading.Thread(target=lambda: got.append(link.recv(10.0)))
    polling.start()
    while not link._lock.locked():  # the poller is inside recv: posts take the wake-up path
        time.sleep(0.001)
    drops = [proto.Drop(seq, "late", frontier=seq + 10) for seq in range(5)]
    for msg in drops:  # from this thread while the other polls
        link.post(msg)
    arrived = received(router, len(drops))
    assert [(m.seq, m.frontier) for m in arrived] == [(d.seq, d.frontier) for d in drops]
    route = link.socket.getsockopt(zmq.ROUTING_ID)  # type: ignore[union-attr]
    router.send_multipart([route, *proto.encode(proto.Heartbeat())])
    polling.join(10)
    assert got and isinstance(got[0], proto.Heartbeat)
