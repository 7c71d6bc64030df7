"""CurveZMQ for the broker and its peers: generate key pairs, load them, apply them to sockets,
and run the broker's authenticator. No torch here: the broker imports this module.

A key directory, as ``traci keys generate DIR`` writes it::

    DIR/broker.key, DIR/broker.key_secret        the broker's pair (public, secret)
    DIR/reducer.key, DIR/reducer.key_secret      one pair per peer ...
    DIR/expert-<i>.key, DIR/expert-<i>.key_secret
    DIR/client.key, DIR/client.key_secret        the front door's client (traci request)
    DIR/authorized/<peer>.key                    the public keys the broker admits

The broker reads ``broker.key_secret`` and ``authorized/``; a peer reads its own
``<name>.key_secret`` and ``broker.key``. Deleting a file from ``authorized/`` revokes that
peer (the broker reads the folder when it starts). Every error is a ``ConfigError`` that names
the file at fault.

A key's file name in ``authorized/`` is its role: ``expert-<i>.key`` admits expert ``i`` on
the expert socket and nothing else, ``reducer.key`` the reducer on the reducer socket,
``client.key`` / ``client-<name>.key`` the front door only. The ZAP handler
(``RoleAuthenticator``) refuses a key on a socket its role does not use, and gives the broker
the role as the connection's User-Id, which the broker compares with every HELLO.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from traci_ml.core.config import Config
from traci_ml.core.errors import ConfigError

log = logging.getLogger(__name__)

BROKER = "broker"
REDUCER = "reducer"
CLIENT = "client"
AUTHORIZED = "authorized"
_OURS = re.compile(r"^(broker|reducer|client|expert-\d+)\.key(_secret)?$")  # generate()'s
# The ZAP domain of each broker socket and the key names (roles) it admits.
DOMAINS = {
    "expert": re.compile(r"^expert-(0|[1-9]\d{0,5})$"),
    "reducer": re.compile(r"^reducer$"),
    "client": re.compile(r"^client(-[A-Za-z0-9_.-]{1,64})?$"),
}
_Z85_KEY_LEN = 40  # a 32-byte curve key in Z85


@dataclass(frozen=True)
class ServerKeys:
    """What the broker's ROUTER sockets need (Z85 keys) and whom its authenticator admits."""

    public: bytes
    secret: bytes
    authorized: Path


@dataclass(frozen=True)
class ClientKeys:
    """What one peer's DEALER socket needs: its own pair and the broker's public key."""

    public: bytes
    secret: bytes
    server_public: bytes


def peer_names(n_experts: int) -> list[str]:
    """The services that connect to the broker (the front door's client is not one)."""
    return [REDUCER, *(f"expert-{i}" for i in range(n_experts))]


# ---- generating -------------------------------------------------------------------------


def generate(directory: str | Path, n_experts: int, *, force: bool = False) -> list[Path]:
    """Write a broker pair, one pair per peer and ``authorized/``; returns the files written.

    Refuses to touch a directory that already holds keys unless ``force`` (then the old
    broker/reducer/expert keys, and their copies in ``authorized/``, are replaced)."""
    if n_experts < 1:
        raise ConfigError(f"cannot generate keys for {n_experts} experts: need at least 1")
    directory = Path(directory)
    authorized = directory / AUTHORIZED
    existing = _existing_keys(directory)
    if existing and not force:
        names = ", ".join(str(p.relative_to(directory)) for p in existing[:4])
        more = f" and {len(existing) - 4} more" if len(existing) > 4 else ""
        raise ConfigError(
            f"{directory} already holds keys ({names}{more}): pass --force to replace them "
            "(every peer then needs its new key)"
        )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        authorized.mkdir(mode=0o700, exist_ok=True)
        for path in existing:
            path.unlink()
        written = []
        for name in (BROKER, *peer_names(n_experts), CLIENT):
            public, secret = (Path(p) for p in zmq.auth.create_certificates(directory, name))
            os.chmod(secret, 0o600)  # a secret key is for its owner's eyes only
            written += [public, secret]
            if name != BROKER:
                copy = authorized / public.name
                copy.write_bytes(public.read_bytes())
                written.append(copy)
    except OSError as exc:
        raise ConfigError(f"cannot write keys to {directory}: {exc}") from None
    return written


def _existing_keys(directory: Path) -> list[Path]:
    found = []
    for folder in (directory, directory / AUTHORIZED):
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if _OURS.match(p.name))
    return found


# ---- loading ----------------------------------------------------------------------------


def curve_dir(config: Config) -> Path | None:
    """The configured key directory, or None when CURVE is off."""
    value = config.security.curve_dir
    return None if value is None else Path(value)


def broker_keys(config: Config) -> ServerKeys | None:
    """The broker's keys from ``security.curve_dir``, or None when it is unset."""
    directory = curve_dir(config)
    if directory is None:
        return None
    public, secret = _load(directory / f"{BROKER}.key_secret", secret=True)
    authorized = directory / AUTHORIZED
    if not authorized.is_dir():
        raise ConfigError(
            f"security.curve_dir: {authorized} is missing: it lists the peer public keys the "
            "broker admits (`traci keys generate DIR` creates it)"
        )
    return ServerKeys(public=public, secret=secret, authorized=authorized)


def peer_keys(config: Config, name: str) -> ClientKeys | None:
    """Peer ``name``'s keys (``reducer``, ``expert-<i>``), or None when CURVE is off."""
    directory = curve_dir(config)
    if directory is None:
        return None
    public, secret = _load(directory / f"{name}.key_secret", secret=True)
    server_public, _ = _load(directory / f"{BROKER}.key", secret=False)
    return ClientKeys(public=public, secret=secret, server_public=server_public)


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes]:
    hint = "generate keys with `traci keys generate DIR` and set security.curve_dir"
    if not path.is_file():
        raise ConfigError(f"security.curve_dir: CURVE key file {path} is missing; {hint}")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"security.curve_dir: cannot read CURVE key file {path}: {exc}") from None
    if secret and not secret_key:
        raise ConfigError(f"security.curve_dir: {path} holds no secret key; {hint}")
    for key in (public, secret_key) if secret else (public,):
        if len(key) != _Z85_KEY_LEN:  # type: ignore[arg-type]
            raise ConfigError(f"security.curve_dir: {path} holds a malformed key")
    return public, secret_key or b""


# ---- sockets ----------------------------------------------------------------------------


def apply_server(socket: zmq.Socket, keys: ServerKeys) -> None:
    """Make ``socket`` a CURVE server (before it binds)."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_server = True


def apply_client(socket: zmq.Socket, keys: ClientKeys) -> None:
    """Make ``socket`` a CURVE client of the broker (before it connects)."""
    socket.curve_secretkey = keys.secret
    socket.curve_publickey = keys.public
    socket.curve_serverkey = keys.server_public


def apply_domain(socket: zmq.Socket, domain: str) -> None:
    """Name the ZAP domain of a broker socket (``expert``, ``reducer`` or ``client``): the
    authenticator admits only the keys whose role belongs there."""
    socket.zap_domain = domain.encode()


def load_roles(authorized: Path) -> dict[bytes, str]:
    """Z85 public key -> role (the file's stem, e.g. ``expert-2``) for ``authorized/*.key``.
    A file whose name is no role is admitted nowhere (warned); a key listed under two roles
    is an error: it would let one party act as both."""
    roles: dict[bytes, str] = {}
    try:
        files = sorted(p for p in authorized.iterdir() if p.suffix == ".key")
    except OSError as exc:
        raise ConfigError(f"security.curve_dir: cannot read {authorized}: {exc}") from None
    for path in files:
        public, _ = _load(path, secret=False)
        role = path.stem
        if not any(pattern.match(role) for pattern in DOMAINS.values()):
            log.warning("%s: %r is not a role (expert-<i>, reducer, client[-name]): this key "
                        "is admitted nowhere", path, role)  # fmt: skip
            continue
        if public in roles:
            raise ConfigError(
                f"security.curve_dir: {path} repeats the key of {roles[public]}.key: one key "
                "may hold one role only"
            )
        roles[public] = role
    return roles


class RoleAuthenticator(ThreadAuthenticator):
    """The broker's ZAP handler: a key is admitted on a socket only when its role (the name
    of its file in ``authorized/``) belongs to that socket's domain, and the connection's
    User-Id is that role, so the broker can hold every HELLO to it."""

    def __init__(self, context: zmq.Context, roles: dict[bytes, str]) -> None:
        super().__init__(context, log=logging.getLogger(f"{__name__}.zap"))
        self.roles = roles

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: is ``key`` (Z85) admitted on ``domain``?"""
        role = self.roles.get(key)
        pattern = DOMAINS.get(domain)
        ok = role is not None and pattern is not None and bool(pattern.match(role))
        if not ok:
            shown = key[:8].decode(errors="replace")
            log.warning("CURVE: refused key %s... (%s) on the %s socket", shown,
                        role or "unlisted", domain or "?")  # fmt: skip
        return ok

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.roles.get(zmq.utils.z85.encode(client_public_key), "")


def start_authenticator(context: zmq.Context, authorized: Path) -> RoleAuthenticator:
    """Start a ZAP handler on ``context`` that admits exactly the public keys in
    ``authorized/``, each on its role's socket. Start it *before* binding: without a
    handler, libzmq admits any key."""
    roles = load_roles(authorized)
    if not roles:
        log.warning("%s lists no public keys: every peer will be refused", authorized)
    auth = RoleAuthenticator(context, roles)
    auth.start()
    for domain in DOMAINS:
        auth.configure_curve_callback(domain=domain, credentials_provider=auth)
    log.info("CURVE on: admitting the %d peer keys in %s, each in its role", len(roles),
             authorized)  # fmt: skip
    return auth


# ---- binding ----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (brackets allowed)."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name, "*" or an interface: reachable from elsewhere
        return False


def endpoint_host(endpoint: str) -> str | None:
    """The host of a ``tcp://host:port`` endpoint; None for transports that stay on this
    machine (``ipc://``, ``inproc://``)."""
    transport, _, address = endpoint.partition("://")
    if transport not in ("tcp", "ws", "wss", "udp", "pgm", "epgm"):
        return None
    host = address.rpartition(":")[0] or address
    return host.rpartition(";")[2]  # "tcp://eth0;10.0.0.1:5555" binds 10.0.0.1


def is_ipv6(endpoint: str) -> bool:
    """True when ``endpoint``'s host is an IPv6 literal (``tcp://[::1]:5555``): its socket
    needs ``zmq.IPV6`` (off by default in libzmq). Left off for IPv4, whose endpoints it
    would rewrite (``0.0.0.0`` binds as ``[::ffff:0.0.0.0]``)."""
    host = endpoint_host(endpoint)
    return host is not None and ":" in host


def tcp_endpoint(host: str, port: int) -> str:
    """``tcp://host:port``, with an IPv6 literal in brackets (``tcp://[::1]:5555``)."""
    host = host.strip()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def check_bind(endpoint: str, *, curve: bool, insecure: bool) -> None:
    """Refuse to bind ``endpoint`` off loopback without CURVE unless ``insecure``."""
    host = endpoint_host(endpoint)
    if curve or host is None or is_loopback(host):
        return
    if not insecure:
        raise ConfigError(
            f"refusing to bind {host} without CURVE keys: anyone who can reach it could "
            "inject embeddings or read gradients; generate keys with `traci keys generate "
            "DIR` and set security.curve_dir, or pass --insecure"
        )
    log.warning(
        "binding %s without CURVE (--insecure): anyone who can reach it can inject "
        "embeddings or read gradients",
        endpoint,
    )
