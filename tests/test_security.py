"""CurveZMQ: key generation and loading, the bind guard, and an in-process broker that admits
only listed peer keys (fake DEALER peers over tcp loopback)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth

from tests.helpers.support import free_ports
from traci_ml.core.config import Config, load_config
from traci_ml.core.errors import ConfigError, PeerTimeout
from traci_ml.core.link import BrokerLink
from traci_ml.core.security import (
    ClientKeys,
    apply_client,
    broker_keys,
    check_bind,
    endpoint_host,
    generate,
    is_ipv6,
    is_loopback,
    peer_keys,
    tcp_endpoint,
)
from traci_ml.proto import Heartbeat, Hello, Message, Query, Reply, Tensor, Welcome, decode, encode
from traci_ml.services.broker.service import BrokerService

pytestmark = pytest.mark.timeout(30)

RUN_ID = "curve-test"
D = 8
N_EXPERTS = 1  # one fake expert opens the broker's start gate on its own
REFUSAL = "refusing to bind 0.0.0.0 without CURVE keys"


def make_config(**overrides: str) -> Config:
    expert_port, reducer_port = free_ports(2)
    views = ", ".join(f"{{name: v{i}, columns: [c{i}]}}" for i in range(N_EXPERTS))
    settings = {
        "run_id": RUN_ID, "embed_dim": str(D), "reducer.heads": "1", "data.views": f"[{views}]",
        "network.expert_port": str(expert_port), "network.reducer_port": str(reducer_port),
        "network.heartbeat_interval": "0.05", "network.liveness": "2.0",
        "metrics.broker_port": "0",
    }  # fmt: skip
    settings.update(overrides)
    return load_config(overrides=settings, env={})


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    generate(directory, 2)
    return directory


# ---- generating and loading -------------------------------------------------------------


def test_generate_writes_the_layout_and_refuses_to_overwrite(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    written = generate(directory, 3)
    peers = ["reducer", "expert-0", "expert-1", "expert-2", "client"]
    expected = {f"{name}.key{suffix}" for name in ["broker", *peers] for suffix in ("", "_secret")}
    assert {p.name for p in directory.iterdir() if p.is_file()} == expected
    assert sorted(p.name for p in (directory / "authorized").iterdir()) == sorted(
        f"{name}.key" for name in peers
    )  # the broker's own key is not a peer's
    assert len(written) == len(expected) + len(peers)
    for name in peers:
        public, secret = zmq.auth.load_certificate(directory / "authorized" / f"{name}.key")
        assert secret is None  # authorized/ holds public keys only
        assert public == zmq.auth.load_certificate(directory / f"{name}.key_secret")[0]
        assert (directory / f"{name}.key_secret").stat().st_mode & 0o077 == 0

    before = (directory / "broker.key_secret").read_bytes()
    with pytest.raises(ConfigError, match="already holds keys.*--force"):
        generate(directory, 3)
    assert (directory / "broker.key_secret").read_bytes() == before

    generate(directory, 1, force=True)  # fewer experts: the old ones are gone
    assert sorted(p.name for p in (directory / "authorized").iterdir()) == [
        "client.key",
        "expert-0.key",
        "reducer.key",
    ]
    assert (directory / "broker.key_secret").read_bytes() != before


def test_loaded_keys_and_curve_off(keys: Path) -> None:
    assert broker_keys(make_config()) is None
    assert peer_keys(make_config(), "reducer") is None
    config = make_config(**{"security.curve_dir": str(keys)})
    server = broker_keys(config)
    client = peer_keys(config, "expert-1")
    assert server is not None and client is not None
    assert client.server_public == server.public
    assert server.authorized == keys / "authorized"
    assert client.public == zmq.auth.load_certificate(keys / "expert-1.key")[0]


@pytest.mark.parametrize("missing", ["broker.key_secret", "broker.key", "expert-0.key_secret"])
def test_missing_key_file_is_named(keys: Path, missing: str) -> None:
    (keys / missing).unlink()
    config = make_config(**{"security.curve_dir": str(keys)})
    load = (lambda: broker_keys(config)) if missing == "broker.key_secret" else None
    load = load or (lambda: peer_keys(config, "expert-0"))
    with pytest.raises(ConfigError, match=f"{keys / missing} is missing"):
        load()


def test_unreadable_or_empty_key_files_are_config_errors(keys: Path) -> None:
    config = make_config(**{"security.curve_dir": str(keys)})
    (keys / "reducer.key_secret").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="reducer.key_secret"):
        peer_keys(config, "reducer")
    (keys / "broker.key_secret").write_bytes((keys / "broker.key").read_bytes())
    with pytest.raises(ConfigError, match="broker.key_secret holds no secret key"):
        broker_keys(config)


def test_missing_authorized_folder_is_named(keys: Path) -> None:
    for path in (keys / "authorized").iterdir():
        path.unlink()
    (keys / "authorized").rmdir()
    with pytest.raises(ConfigError, match="authorized is missing"):
        broker_keys(make_config(**{"security.curve_dir": str(keys)}))


# ---- the bind guard ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("10.1.2.3", False), ("*", False),
     ("broker", False), ("::", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_endpoint_host() -> None:
    assert endpoint_host("tcp://0.0.0.0:5555") == "0.0.0.0"
    assert endpoint_host("tcp://[::1]:5555") == "[::1]"
    assert endpoint_host("tcp://eth0;10.0.0.1:5555") == "10.0.0.1"
    assert endpoint_host("ipc:///tmp/broker") is None
    assert endpoint_host("inproc://broker") is None
    check_bind("inproc://broker", curve=False, insecure=False)  # never leaves the process


def test_broker_refuses_a_public_bind_without_keys() -> None:
    config = make_config(**{"network.bind_host": "0.0.0.0"})
    with pytest.raises(ConfigError) as info:
        BrokerService(config)
    message = str(info.value)
    assert message.startswith(REFUSAL)
    assert "inject embeddings or read gradients" in message
    assert "traci keys generate DIR" in message and "--insecure" in message


def test_broker_binds_a_public_address_when_insecure(caplog) -> None:
    config = make_config(**{"network.bind_host": "0.0.0.0", "security.insecure": "true"})
    broker = BrokerService(config)
    try:
        assert broker.expert_endpoint.startswith("tcp://0.0.0.0:")
        assert "without CURVE (--insecure)" in caplog.text
    finally:
        broker.close()


def test_broker_binds_a_public_address_with_keys(keys: Path) -> None:
    config = make_config(**{"network.bind_host": "0.0.0.0", "security.curve_dir": str(keys)})
    broker = BrokerService(config)
    broker.close()


# ---- an in-process CURVE broker and fake peers ------------------------------------------


class RunningBroker:
    def __init__(self, config: Config) -> None:
        self.broker = BrokerService(config)
        self.thread = threading.Thread(target=self.broker.run)
        self.thread.start()

    def hellos_in(self) -> float:
        labels = {"kind": "HELLO", "direction": "in"}
        value = self.broker.metrics.registry.get_sample_value("traci_broker_messages_total", labels)
        return 0.0 if value is None else value

    def stop(self) -> None:
        self.broker.stop()
        self.thread.join(5)


@pytest.fixture
def curve_broker(keys: Path) -> Iterator[RunningBroker]:
    running = RunningBroker(make_config(**{"security.curve_dir": str(keys)}))
    yield running
    running.stop()


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def say_hello(context: zmq.Context, endpoint: str, curve: ClientKeys | None) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        apply_client(sock, curve)
    sock.connect(endpoint)
    hello = Hello("expert", RUN_ID, D, "float32", expert_id=0, window=2)
    sock.send_multipart(encode(hello), copy=False)
    return sock


def first_reply(sock: zmq.Socket, timeout: float) -> Message | None:
    """The first message that is not a HEARTBEAT within ``timeout`` seconds, or None."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            msg = decode(sock.recv_multipart())
            if not isinstance(msg, Heartbeat):
                return msg
    return None


def welcomed(msg: Message | None) -> bool:
    return isinstance(msg, Welcome) and msg.ok


def test_listed_key_is_welcomed(curve_broker: RunningBroker, context, keys: Path) -> None:
    config = make_config(**{"security.curve_dir": str(keys)})
    sock = say_hello(context, curve_broker.broker.expert_endpoint, peer_keys(config, "expert-0"))
    try:
        assert welcomed(first_reply(sock, 5.0))
        assert curve_broker.hellos_in() == 1
    finally:
        sock.close(linger=0)


def test_unknown_key_and_plaintext_get_nothing_through(
    curve_broker: RunningBroker, context, keys: Path
) -> None:
    endpoint = curve_broker.broker.expert_endpoint
    config = make_config(**{"security.curve_dir": str(keys)})
    listed = peer_keys(config, "expert-0")
    assert listed is not None
    public, secret = zmq.curve_keypair()  # a fresh pair that is not in authorized/
    unknown = ClientKeys(public=public, secret=secret, server_public=listed.server_public)
    for curve in (unknown, None):  # an unlisted key, then no CURVE at all
        sock = say_hello(context, endpoint, curve)
        try:
            assert first_reply(sock, 2.0) is None
            assert curve_broker.hellos_in() == 0
        finally:
            sock.close(linger=0)
    # The broker is still serving: a listed key gets in afterwards.
    sock = say_hello(context, endpoint, listed)
    try:
        assert welcomed(first_reply(sock, 5.0))
    finally:
        sock.close(linger=0)


def test_revoked_key_is_refused_after_a_broker_restart(keys: Path, context) -> None:
    config = make_config(**{"security.curve_dir": str(keys)})
    (keys / "authorized" / "expert-0.key").unlink()  # the operator revokes expert-0
    running = RunningBroker(config)
    try:
        sock = say_hello(context, running.broker.expert_endpoint, peer_keys(config, "expert-0"))
        try:
            assert first_reply(sock, 2.0) is None
            assert running.hellos_in() == 0
        finally:
            sock.close(linger=0)
    finally:
        running.stop()


def test_broker_link_registers_with_its_key_and_explains_a_refusal(
    curve_broker: RunningBroker, context, keys: Path
) -> None:
    config = make_config(**{"security.curve_dir": str(keys)})
    listed = peer_keys(config, "expert-0")
    assert listed is not None
    hello = lambda: Hello("expert", RUN_ID, D, "float32", expert_id=0, window=2)  # noqa: E731
    endpoint = curve_broker.broker.expert_endpoint
    link = BrokerLink(context, endpoint, hello, heartbeat_interval=0.05, liveness=2.0,
                      name="expert-0", curve=listed)  # fmt: skip
    try:
        welcome = link.connect(timeout=5.0)
        assert welcome is not None and welcome.ok
    finally:
        link.close()
    public, secret = zmq.curve_keypair()
    unknown = ClientKeys(public=public, secret=secret, server_public=listed.server_public)
    link = BrokerLink(context, endpoint, hello, heartbeat_interval=0.05, liveness=2.0,
                      name="expert-0", curve=unknown)  # fmt: skip
    try:
        with pytest.raises(PeerTimeout, match="expert-0.key in the broker's authorized/"):
            link.connect(timeout=1.0)
    finally:
        link.close()


# ---- keys bound to roles (docs/security.md, "Trust model") ----------------------------


def send_hello(
    context: zmq.Context, endpoint: str, curve: ClientKeys | None, hello: Message
) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        apply_client(sock, curve)
    sock.connect(endpoint)
    sock.send_multipart(encode(hello), copy=False)
    return sock


def rejections(running: RunningBroker, reason: str) -> float:
    registry = running.broker.metrics.registry
    value = registry.get_sample_value("traci_broker_rejections_total", {"reason": reason})
    return 0.0 if value is None else value


def test_a_listed_key_acts_only_in_its_own_role_and_id(tmp_path: Path, context) -> None:
    """expert-1's key cannot register as expert 0 (refused, counted wrong_key); no peer key
    gets through the handshake of another role's socket, nor of the front door; the client
    key reaches the front door only."""
    keys = tmp_path / "keys"
    generate(keys, 2)  # expert-1 exists as a key, not in this 1-expert run
    (serve_port,) = free_ports(1)
    config = make_config(**{"security.curve_dir": str(keys), "network.serve_port": str(serve_port)})
    running = RunningBroker(config)
    broker = running.broker
    as_expert_0 = Hello("expert", RUN_ID, D, "float32", expert_id=0, window=2)
    as_reducer = Hello("reducer", RUN_ID, D, "float32", n_experts=N_EXPERTS)
    socks = []
    try:
        # a listed key claiming another expert's id: refused with the reason, counted
        sock = send_hello(context, broker.expert_endpoint, peer_keys(config, "expert-1"),
                          as_expert_0)  # fmt: skip
        socks.append(sock)
        reply = first_reply(sock, 5.0)
        assert isinstance(reply, Welcome) and not reply.ok
        assert "'expert-1'" in reply.reason and "'expert-0'" in reply.reason
        assert rejections(running, "wrong_key") == 1
        # keys on sockets their role does not use: the handshake fails, nothing arrives
        for name, endpoint, hello in (
            ("expert-0", broker.reducer_endpoint, as_reducer),
            ("client", broker.expert_endpoint, as_expert_0),
            ("reducer", broker.expert_endpoint, as_expert_0),
            ("client", broker.reducer_endpoint, as_reducer),
        ):
            sock = send_hello(context, endpoint, peer_keys(config, name), hello)
            socks.append(sock)
            assert first_reply(sock, 1.0) is None, f"{name}'s key got an answer on {endpoint}"
        assert running.hellos_in() == 1  # only expert-1's HELLO ever reached the broker
        # the front door: the client key gets an answer (no reducer yet), a peer's key not
        query = Query(1, ("c0", "c1"), (Tensor.from_numpy(np.zeros((1, 2), np.float32)),))
        for name, answered in (("expert-0", False), ("reducer", False), ("client", True)):
            sock = send_hello(context, broker.client_endpoint, peer_keys(config, name), query)
            socks.append(sock)
            reply = first_reply(sock, 2.0 if answered else 1.0)
            assert isinstance(reply, Reply) == answered, name
        # the right key for the right role still registers
        sock = send_hello(context, broker.expert_endpoint, peer_keys(config, "expert-0"),
                          as_expert_0)  # fmt: skip
        socks.append(sock)
        assert welcomed(first_reply(sock, 5.0))
    finally:
        for sock in socks:
            sock.close(linger=0)
        running.stop()


def test_a_key_listed_under_two_roles_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    generate(keys, 2)  # expert-1 exists as a key, not in this 1-expert run
    authorized = keys / "authorized"
    (authorized / "expert-1.key").write_bytes((authorized / "expert-0.key").read_bytes())
    with pytest.raises(ConfigError, match="one key may hold one role"):
        RunningBroker(make_config(**{"security.curve_dir": str(keys)}))


def test_ipv6_loopback_binds_and_peers_connect(context) -> None:
    """``::1`` is loopback: the broker binds it without keys, and a peer whose broker_host
    is ``::1`` registers (the endpoint is bracketed and the sockets speak IPv6)."""
    assert tcp_endpoint("::1", 5555) == "tcp://[::1]:5555" and is_ipv6("tcp://[::1]:5555")
    assert tcp_endpoint("127.0.0.1", 5555) == "tcp://127.0.0.1:5555"
    running = RunningBroker(make_config(**{"network.bind_host": "::1"}))
    try:
        endpoint = running.broker.expert_endpoint
        assert endpoint.startswith("tcp://[::1]:")
        hello = lambda: Hello("expert", RUN_ID, D, "float32", expert_id=0, window=2)  # noqa: E731
        link = BrokerLink(context, endpoint, hello, heartbeat_interval=0.05, liveness=2.0,
                          name="expert-0")  # fmt: skip
        try:
            welcome = link.connect(timeout=5.0)
            assert welcome is not None and welcome.ok and len(welcome.token) == 32
        finally:
            link.close()
    finally:
        running.stop()


def test_a_held_id_is_retried_until_its_holder_times_out(context) -> None:
    """A peer whose id is held by another live registration (an impostor on plaintext, or
    its own previous life) is told ``held`` and keeps saying HELLO; once the holder falls
    silent it gets in within the liveness timeout, instead of exiting as a config error."""
    running = RunningBroker(make_config())
    impostor = context.socket(zmq.DEALER)
    impostor.setsockopt(zmq.LINGER, 0)
    try:
        endpoint = running.broker.expert_endpoint
        impostor.connect(endpoint)
        impostor.send_multipart(encode(Hello("expert", RUN_ID, D, "float32", expert_id=0)))
        assert welcomed(first_reply(impostor, 5.0))
        stop_beating = threading.Event()

        def beat() -> None:  # the impostor stays alive for 1 s, then falls silent
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not stop_beating.is_set():
                impostor.send_multipart(encode(Heartbeat()))
                time.sleep(0.05)

        beater = threading.Thread(target=beat)
        beater.start()
        hello = lambda: Hello("expert", RUN_ID, D, "float32", expert_id=0, window=2)  # noqa: E731
        link = BrokerLink(context, endpoint, hello, heartbeat_interval=0.05, liveness=2.0,
                          name="expert-0")  # fmt: skip
        try:
            t0 = time.monotonic()
            welcome = link.connect(timeout=10.0)
            waited = time.monotonic() - t0
            assert welcome is not None and welcome.ok
            assert 0.9 <= waited  # held while the impostor was alive ...
        finally:
            stop_beating.set()
            beater.join()
            link.close()
        assert rejections(running, "held") >= 2  # ... and asked again meanwhile
    finally:
        impostor.close(linger=0)
        running.stop()
