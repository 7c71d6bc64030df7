"""The broker over loopback TCP, with fake experts and a fake reducer (DEALER sockets)."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import msgpack
import numpy as np
import pytest
import zmq

from traci_ml import proto
from traci_ml.core.config import Config, load_config
from traci_ml.core.data import expert_count
from traci_ml.services.broker import main as broker_main
from traci_ml.services.broker.outcomes import EXPERT
from traci_ml.services.broker.service import BrokerService

D = 8  # embed_dim
B = 3  # batch rows
RUN_ID = "test-run"


pytestmark = pytest.mark.timeout(20)


def make_config(n_experts: int = 3, **overrides: str) -> Config:
    views = ", ".join(f"{{name: v{i}, columns: [c{i}]}}" for i in range(n_experts))
    settings = {
        "run_id": RUN_ID, "embed_dim": str(D), "reducer.heads": "1", "data.views": f"[{views}]",
        "expert.window": "4", "network.heartbeat_interval": "0.05", "network.liveness": "2.0",
        "metrics.broker_port": "0",
    }  # fmt: skip
    settings.update(overrides)
    return load_config(overrides=settings, env={})


class RunningBroker:
    """A Broker on random loopback ports, its run() in a thread."""

    def __init__(self, config: Config) -> None:
        self.broker = BrokerService(
            config, expert_endpoint="tcp://127.0.0.1:*", reducer_endpoint="tcp://127.0.0.1:*"
        )
        self.exit_codes: list[int] = []
        self.thread = threading.Thread(target=lambda: self.exit_codes.append(self.broker.run()))
        self.thread.start()

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.broker.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def rejections(self, reason: str) -> float:
        return self.sample("traci_broker_rejections_total", {"reason": reason})

    def stop(self) -> None:
        self.broker.stop()
        self.thread.join(5)


class Peer:
    """A fake expert or reducer: a DEALER speaking the protocol through traci_ml.proto."""

    def __init__(
        self, context: zmq.Context, endpoint: str, routing_id: bytes | None = None
    ) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)
        self.last_beat = 0.0

    def send(self, msg: proto.Message) -> None:
        self.sock.send_multipart(proto.encode(msg), copy=False)

    def beat(self) -> None:
        if time.monotonic() - self.last_beat >= 0.05:
            self.send(proto.Heartbeat())
            self.last_beat = time.monotonic()

    def recv(
        self, timeout: float = 3.0, *, beat: bool = True, keep_alive: Sequence[Peer] = ()
    ) -> proto.Message:
        """The next message that is not a HEARTBEAT; while waiting, this peer (unless
        ``beat`` is false) and the ``keep_alive`` peers send heartbeats."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            for peer in (self, *keep_alive) if beat else keep_alive:
                peer.beat()
            if self.sock.poll(int(min(left, 0.05) * 1000) + 1):
                msg = proto.decode(self.sock.recv_multipart())
                if isinstance(msg, proto.Welcome) and msg.ok:  # its secret: checked, then blanked
                    assert len(msg.token) == 32
                    msg = dataclasses.replace(msg, token="")
                if not isinstance(msg, proto.Heartbeat):
                    return msg
        raise AssertionError(f"no message within {timeout} s")

    def quiet(self, wait: float = 0.2) -> None:
        """Assert that nothing but heartbeats arrives for ``wait`` seconds."""
        with pytest.raises(AssertionError, match="no message"):
            msg = self.recv(wait)
            raise RuntimeError(f"unexpected {msg}")


def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def tensor(value: float, rows: int = B) -> proto.Tensor:
    return proto.Tensor.from_numpy(np.full((rows, D), value, dtype=np.float32))


class Net:
    """The test's own zmq context and every fake peer made from it (closed at teardown)."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.peers: list[Peer] = []

    def peer(self, endpoint: str, routing_id: bytes | None = None) -> Peer:
        self.peers.append(Peer(self.context, endpoint, routing_id))
        return self.peers[-1]

    def close(self) -> None:
        for peer in self.peers:
            peer.sock.close(linger=0)
        self.context.term()


@pytest.fixture
def net() -> Net:
    network = Net()
    yield network
    network.close()


@pytest.fixture
def broker() -> RunningBroker:
    running = RunningBroker(make_config())
    yield running
    running.stop()


def join_expert(net: Net, broker: RunningBroker, expert_id: int, **fields: object) -> Peer:
    peer = net.peer(broker.broker.expert_endpoint)
    hello = dict(role="expert", run_id=RUN_ID, embed_dim=D, dtype="float32", expert_id=expert_id)
    peer.send(proto.Hello(**{**hello, **fields}))  # type: ignore[arg-type]
    return peer


def join_reducer(net: Net, broker: RunningBroker, n_experts: int = 3) -> Peer:
    peer = net.peer(broker.broker.reducer_endpoint)
    peer.send(proto.Hello("reducer", RUN_ID, D, "float32", n_experts=n_experts))
    assert peer.recv() == proto.Welcome(ok=True, start_seq=0)
    return peer


def cluster(net: Net, broker: RunningBroker, n: int = 3) -> tuple[list[Peer], Peer]:
    experts = [join_expert(net, broker, i) for i in range(n)]
    for expert in experts:
        assert expert.recv() == proto.Welcome(ok=True, start_seq=0)
    return experts, join_reducer(net, broker, n)


# ---- registration -----------------------------------------------------------------------


def test_registration_accepted_and_refused_with_reasons(net, broker) -> None:
    first, *others = (join_expert(net, broker, i) for i in range(3))
    assert first.recv(keep_alive=others) == proto.Welcome(ok=True, start_seq=0)  # all 3 registered
    for fields, words in (({}, "held by another live peer"), ({"run_id": "other"}, "run_id"),
                          ({"embed_dim": D * 2}, "embed_dim")):  # fmt: skip
        welcome = join_expert(net, broker, 0, **fields).recv()
        assert isinstance(welcome, proto.Welcome) and not welcome.ok and words in welcome.reason
    wait_for(lambda: broker.rejections("refused") == 2 and broker.rejections("held") == 1)
    assert broker.sample("traci_broker_registered_experts") <= 3


def test_an_invalid_hello_is_answered_with_its_reason(net, broker) -> None:
    """A HELLO that fails validation (expert_id beyond MAX_EXPERTS, or negative) still gets
    WELCOME(ok=false) naming the problem, instead of silence until the peer times out."""
    for bad in (5000, -3):
        header = {"v": 1, "k": "HELLO", "role": "expert", "run_id": RUN_ID, "embed_dim": D,
                  "dtype": "float32", "expert_id": bad}  # fmt: skip
        peer = net.peer(broker.broker.expert_endpoint)
        peer.sock.send_multipart([msgpack.packb(header)])
        welcome = peer.recv(beat=False)
        assert (
            isinstance(welcome, proto.Welcome) and not welcome.ok and "expert_id" in welcome.reason
        )
    wait_for(lambda: broker.rejections("refused") == 2)


# ---- the data path ----------------------------------------------------------------------


def test_full_step_round_trip(net, broker) -> None:
    experts, reducer = cluster(net, broker)
    sent = [np.arange(B * D, dtype=np.float32).reshape(B, D) + 100 * i for i in range(3)]
    for i, expert in enumerate(experts):
        expert.send(proto.Emb(0, i, "train", proto.Tensor.from_numpy(sent[i])))
    batch = reducer.recv()
    assert isinstance(batch, proto.Batch)
    assert (batch.seq, batch.phase, batch.present) == (0, "train", (True, True, True))
    assert [bytes(t.buffer) for t in batch.tensors] == [a.tobytes() for a in sent]
    grads = [tensor(-1.0 - i) for i in range(3)]
    reducer.send(proto.Grad(0, -1, tuple(grads)))
    for i, expert in enumerate(experts):
        grad = expert.recv()
        assert isinstance(grad, proto.Grad) and (grad.seq, grad.expert_id) == (0, i)
        assert [bytes(t.buffer) for t in grad.tensors] == [bytes(grads[i].buffer)]
        expert.quiet(0.05)
    wait_for(lambda: broker.sample("traci_broker_queue_latency_seconds_count") == 1)
    assert broker.sample("traci_broker_join_wait_seconds_count") == 1
    assert broker.sample("traci_broker_steps_released_total") == 1
    assert broker.sample("traci_broker_messages_total", {"kind": "EMB", "direction": "in"}) == 3


def test_steps_leave_in_seq_order_whatever_the_arrival_order(net, broker) -> None:
    experts, reducer = cluster(net, broker)
    for seq, expert_id in [(2, 0), (1, 2), (2, 1), (1, 0), (2, 2), (0, 1), (0, 2), (1, 1)]:
        experts[expert_id].send(proto.Emb(seq, expert_id, "train", tensor(seq)))
    time.sleep(0.1)
    experts[0].send(proto.Emb(0, 0, "train", tensor(0)))  # completes 0, and with it 1 and 2
    seqs = [reducer.recv().seq for _ in range(3)]  # type: ignore[attr-defined]
    assert seqs == [0, 1, 2]


def test_silent_expert_is_dropped_and_steps_release_masked(net) -> None:
    running = RunningBroker(make_config(**{"network.liveness": "0.3"}))
    try:
        experts, reducer = cluster(net, running)
        alive = experts[:2]
        for i, expert in enumerate(experts):
            expert.send(proto.Emb(0, i, "train", tensor(i)))
        assert reducer.recv(keep_alive=alive).present == (True, True, True)  # type: ignore[attr-defined]
        for i, expert in enumerate(alive):  # expert 2 says nothing from now on
            expert.send(proto.Emb(1, i, "train", tensor(i)))
        batch = reducer.recv(keep_alive=alive)
        assert isinstance(batch, proto.Batch) and (batch.seq, batch.present) == (
            1,
            (True, True, False),
        )
        assert len(batch.tensors) == 2
        wait_for(lambda: running.sample("traci_broker_live_experts") == 2)
        assert running.sample("traci_broker_expert_up", {"expert": "2"}) == 0
        # Back again: told to register, then joins at the next step nobody has sent.
        experts[2].send(proto.Heartbeat())
        assert experts[2].recv(beat=False) == proto.Goodbye("unregistered")
        experts[2].send(proto.Hello("expert", RUN_ID, D, "float32", expert_id=2))
        assert experts[2].recv(beat=False) == proto.Welcome(ok=True, start_seq=2)
    finally:
        running.stop()


# libzmq's automatic routing ids when nobody seeds libc random(): the same in every run
UNSEEDED_FIRST_IDS = {"expert": 0x6B8B4567, "reducer": 0xE43C9869}


def test_guessed_routing_ids_take_no_route_and_cannot_abort_the_broker(net, broker) -> None:
    """The attack of issue 9: DEALERs naming the first automatic ids of each socket (under
    ROUTER_HANDOVER they took live routes; and an id-less peer arriving after them aborted
    libzmq). Now the strangers get only GOODBYE(unregistered), a registered expert keeps its
    route, and id-less newcomers are served."""
    experts, reducer = cluster(net, broker)
    endpoints = {"expert": broker.broker.expert_endpoint, "reducer": broker.broker.reducer_endpoint}
    strangers = []
    for side, first in UNSEEDED_FIRST_IDS.items():
        for k in range(8):
            rid = b"\x00" + (first + k).to_bytes(4, "big")
            strangers.append(net.peer(endpoints[side], rid))
            strangers[-1].send(proto.Heartbeat())
    anonymous = [net.peer(endpoints[side]) for side in ("expert", "reducer") for _ in range(8)]
    for peer in anonymous:
        peer.send(proto.Heartbeat())
    for peer in [*strangers, *anonymous]:
        assert peer.recv(beat=False) == proto.Goodbye("unregistered")
    for i, expert in enumerate(experts):  # the registered routes are untouched
        expert.send(proto.Emb(0, i, "train", tensor(i)))
    batch = reducer.recv()
    assert isinstance(batch, proto.Batch) and batch.present == (True, True, True)
    reducer.send(proto.Grad(0, -1, (tensor(0.5), tensor(0.5), tensor(0.5))))
    for expert in experts:
        assert isinstance(expert.recv(), proto.Grad)
    for peer in strangers:  # nothing of the run reached a stranger
        with pytest.raises(AssertionError, match="no message"):
            raise RuntimeError(f"unexpected {peer.recv(0.05, beat=False)}")
    assert broker.thread.is_alive()
    wait_for(lambda: broker.rejections("unregistered") == 32)


def test_garbage_is_rejected_and_counted_while_good_traffic_flows(net, broker) -> None:
    """Garbage is counted; a bad EMB with a step number from a registered expert is
    answered DROP and that step goes on with the expert masked, instead of waiting."""
    experts, reducer = cluster(net, broker)
    good = proto.encode(proto.Emb(0, 0, "train", tensor(1.0)))
    nan = np.full((B, D), np.nan, dtype=np.float32)
    experts[0].sock.send_multipart([b"\xc1 not msgpack"])
    experts[0].sock.send_multipart([msgpack.packb({"v": 99, "k": "EMB"})])
    experts[0].sock.send_multipart([good[0], bytes(good[1])[:-4]])  # truncated tensor
    assert experts[0].recv() == proto.Drop(0, "size_mismatch")
    experts[0].send(proto.Emb(1, 0, "train", proto.Tensor.from_numpy(nan)))
    assert experts[0].recv() == proto.Drop(1, "non_finite")
    experts[0].send(proto.Batch(0, "train", (True,), (tensor(1.0),)))  # a reducer's kind
    reducer.sock.send_multipart([b"\xc1"])
    stranger = net.peer(broker.broker.expert_endpoint)
    stranger.send(proto.Emb(0, 0, "train", tensor(1.0)))
    assert stranger.recv(beat=False) == proto.Goodbye("unregistered")
    for seq in (0, 1):
        for i, expert in enumerate(experts[1:], start=1):
            expert.send(proto.Emb(seq, i, "train", tensor(i)))
        batch = reducer.recv()
        assert isinstance(batch, proto.Batch) and (batch.seq, batch.present) == (
            seq,
            (False, True, True),
        )
        reducer.send(proto.Grad(seq, -1, (tensor(0.0), tensor(0.0))))
        for expert in experts[1:]:
            assert isinstance(expert.recv(), proto.Grad)
    for i, expert in enumerate(experts):
        expert.send(proto.Emb(2, i, "train", tensor(i)))
    batch = reducer.recv()
    assert isinstance(batch, proto.Batch) and batch.present == (True, True, True)
    expected = {"bad_header": 2, "version": 1, "size_mismatch": 1, "non_finite": 1,
                "unexpected_kind": 1, "unregistered": 1}  # fmt: skip
    wait_for(lambda: all(broker.rejections(r) == n for r, n in expected.items()))
    assert broker.sample("traci_broker_messages_total", {"kind": "invalid", "direction": "in"}) == 4
    assert broker.thread.is_alive()


def test_a_bug_on_one_message_is_counted_and_the_loop_goes_on(net, broker, monkeypatch) -> None:
    experts, reducer = cluster(net, broker)
    handlers = broker.broker._handlers[EXPERT]  # every EMB's way in: its handler
    real_emb, calls = handlers[proto.Emb], []

    def flaky_emb(*args: object) -> object:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_emb(*args)  # type: ignore[arg-type]

    monkeypatch.setitem(handlers, proto.Emb, flaky_emb)
    for i, expert in enumerate(experts):
        expert.send(proto.Emb(0, i, "train", tensor(i)))
    wait_for(lambda: broker.rejections("internal") == 1)
    _, msg, _ = calls[0]
    experts[msg.expert_id].send(msg)  # the EMB that hit the bug, again
    batch = reducer.recv()
    assert isinstance(batch, proto.Batch) and batch.present == (True, True, True)


def test_reducer_loss_drops_dispatched_steps(net) -> None:
    running = RunningBroker(make_config(2))
    try:
        experts, reducer = cluster(net, running, 2)
        for i, expert in enumerate(experts):
            expert.send(proto.Emb(0, i, "train", tensor(i)))
        assert isinstance(reducer.recv(), proto.Batch)
        reducer.send(proto.Goodbye("shutdown"))
        for expert in experts:
            assert expert.recv() == proto.Drop(0, "reducer_lost")
    finally:
        running.stop()


# ---- the end --------------------------------------------------------------------------------


def test_goodbye_done_ends_run_with_0(net, broker) -> None:
    experts, reducer = cluster(net, broker)
    reducer.send(proto.Goodbye("done"))
    for expert in experts:
        assert expert.recv() == proto.Goodbye("done")
    broker.thread.join(5)
    assert broker.exit_codes == [0]


def test_stop_tells_peers_and_returns_0(net, broker) -> None:
    experts, reducer = cluster(net, broker)
    broker.stop()
    for peer in (*experts, reducer):
        assert peer.recv() == proto.Goodbye("shutdown")
    assert broker.exit_codes == [0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_main_run_serves_until_done(net) -> None:
    expert_port, reducer_port = _free_port(), _free_port()
    config = make_config(2, **{"network.expert_port": str(expert_port),
                               "network.reducer_port": str(reducer_port)})  # fmt: skip
    assert expert_count(config) == 2
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(broker_main.run(config)))
    thread.start()
    reducer = net.peer(f"tcp://127.0.0.1:{reducer_port}")
    reducer.send(proto.Hello("reducer", RUN_ID, D, "float32", n_experts=2))
    assert reducer.recv() == proto.Welcome(ok=True, start_seq=0)
    reducer.send(proto.Goodbye("done"))
    thread.join(5)
    assert codes == [0]


def test_broker_imports_no_torch() -> None:
    code = "import sys, traci_ml.services.broker.main; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_digits_presets_count_experts() -> None:
    quadrants = load_config(overrides={"data.views": "quadrants"}, env={})
    halves = load_config(overrides={"data.views": "halves"}, env={})
    assert (expert_count(quadrants), expert_count(halves)) == (4, 2)
