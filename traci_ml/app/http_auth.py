"""Who may use the Open Inference Protocol endpoint (``traci http``, REST and gRPC): TLS and
bearer tokens, and where it may listen without them (docs/serving.md "Security").

- ``serve.http_tls_cert`` / ``serve.http_tls_key``: PEM files; both sides then speak TLS only.
- ``serve.http_token_file``: one token per line (blank lines and ``#`` comments skipped, at
  least ``MIN_TOKEN`` characters, no spaces). Every request but the health checks must carry
  one: ``Authorization: Bearer <token>`` (REST), ``authorization`` metadata of the same form
  (gRPC). Otherwise: HTTP 401 ``{"error": ...}`` with ``WWW-Authenticate: Bearer``, gRPC
  UNAUTHENTICATED; counted, and logged at most once per ``LOG_EVERY`` seconds.
- ``serve.http_tls_client_ca``: mutual TLS. Every client must present a certificate signed
  by one of these CAs, or its TLS handshake fails (REST and gRPC; health checks included,
  since the handshake comes before any path).
- Off loopback, ``serve.http_bind`` needs TLS and a way to know the client: tokens or client
  certificates (tokens in plaintext can be read on the way), unless ``security.insecure``
  (``--insecure``): the rule the broker keeps for CURVE.

The health checks (``/v2/health/live``, ``/v2/health/ready``; gRPC ServerLive, ServerReady)
stay open so that load balancers and Kubernetes probes work without a secret; they say only
whether the process runs and the front door can answer.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from traci_ml.core.config import Config
from traci_ml.core.errors import ConfigError
from traci_ml.core.security import is_loopback

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
OPEN_RPCS = frozenset({"ServerLive", "ServerReady"})
MIN_TOKEN = 16  # characters: a guessable token is no token
LOG_EVERY = 10.0  # seconds between two warnings about refused requests
RELOAD_EVERY = 1.0  # seconds between two looks at serve.http_token_file
CHALLENGE = 'Bearer realm="traci"'


@dataclass
class Access:
    """What ``traci http`` enforces: the tokens (empty: none asked) and the TLS files.
    ``token_file``: where the tokens came from; it is looked at again at most every
    ``RELOAD_EVERY`` seconds, and a changed file that loads replaces the tokens (a token
    removed from it is refused from then on, without a restart); one that does not load is
    logged and the tokens in force stay."""

    tokens: tuple[bytes, ...] = ()
    cert: str | None = None
    key: str | None = None
    token_file: str | None = None
    client_ca: str | None = None  # mutual TLS: the CAs of the admitted client certificates
    refused: int = field(default=0, compare=False)  # refused for a missing or wrong token
    reloads: int = field(default=0, compare=False)  # token file changes taken
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _warned: float = field(default=float("-inf"), repr=False, compare=False)
    _tokens_watch: Watched | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.token_file is not None and self._tokens_watch is None:
            self._tokens_watch = Watched([self.token_file])

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def reload(self, *, now: float | None = None) -> None:
        """Take the token file again if it changed (at most every ``RELOAD_EVERY`` s)."""
        if self._tokens_watch is None or not self._tokens_watch.changed(now=now):
            return
        try:
            tokens = load_tokens(self.token_file)  # type: ignore[arg-type]
        except ConfigError as exc:
            log.error("http: %s; the %d token(s) in force stay", exc, len(self.tokens))
            return
        self.tokens = tokens  # one assignment: a request sees the old tuple or the new
        self.reloads += 1
        log.warning("http: %s changed: %d token(s) now", self.token_file, len(tokens))

    def allows(self, header: str | bytes | None) -> bool:
        """Whether an ``Authorization`` header (or gRPC metadata value) carries a listed
        token. Compared in constant time against every token."""
        if not self.tokens:
            return True
        self.reload()
        if header is None:
            return False
        raw = header if isinstance(header, bytes) else header.encode("utf-8", "replace")
        scheme, _, token = raw.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        found = False
        for listed in self.tokens:  # no early exit: the time says nothing about which
            found |= hmac.compare_digest(token, listed)
        return found

    def refuse(self, what: str, has_header: bool) -> str:
        """Count a refused request and say why, in one line (logged now and then)."""
        why = "a token not listed" if has_header else "no bearer token"
        with self._lock:
            self.refused += 1
            now = time.monotonic()
            warn = now - self._warned >= LOG_EVERY
            if warn:
                self._warned = now
            count = self.refused
        if warn:
            log.warning("http: refused %s with %s (%d refused so far)", what, why, count)
        return (f"unauthorized: {what} needs 'Authorization: Bearer <token>' with a token "
                f"from serve.http_token_file ({why})")  # fmt: skip

    def tls_files(self) -> Watched:
        """A watch on the TLS files (certificate, key, client CAs), for one consumer."""
        return Watched([p for p in (self.cert, self.key, self.client_ca) if p is not None])

    def server_credentials(self):  # -> grpc.ServerCredentials
        """gRPC's TLS credentials, taking new TLS files at the next handshake after they
        change (rotated certificates need no restart); files that do not load as a pair
        are logged and the ones in force stay."""
        import grpc

        def configuration():  # -> grpc.ServerCertificateConfiguration
            pair = (Path(self.key).read_bytes(), Path(self.cert).read_bytes())  # type: ignore[arg-type]
            roots = None if self.client_ca is None else Path(self.client_ca).read_bytes()
            return grpc.ssl_server_certificate_configuration([pair], roots)

        watch = self.tls_files()

        def fetch():  # called by grpc before every handshake: cheap unless a file changed
            if not watch.changed():
                return None
            try:
                _check_pair(self.cert, self.key)  # type: ignore[arg-type]
                new = configuration()
            except (ConfigError, OSError) as exc:
                log.error("grpc: the TLS files changed but do not load (%s); the ones in force "
                          "stay", exc)  # fmt: skip
                return None
            log.warning("grpc: TLS files changed: taken for new connections")
            return new

        return grpc.dynamic_ssl_server_credentials(
            configuration(), fetch, require_client_authentication=self.client_ca is not None
        )

    def reload_tls(self, context, watch: Watched) -> bool:  # noqa: ANN001 -- ssl.SSLContext
        """Load changed TLS files into uvicorn's ``context`` (new handshakes use them; the
        connections open keep theirs). True when taken; files that do not load as a pair are
        logged and the ones in force stay. Call it on the event loop's thread."""
        if not watch.changed():
            return False
        try:
            _check_pair(self.cert, self.key)  # type: ignore[arg-type]
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:  # adds the CAs listed now (none is forgotten)
                context.load_verify_locations(cafile=self.client_ca)
        except (ConfigError, OSError, ValueError) as exc:
            log.error("http: the TLS files changed but do not load (%s); the ones in force "
                      "stay", exc)  # fmt: skip
            return False
        log.warning("http: TLS files changed: taken for new connections")
        return True

    def uvicorn_ssl(self) -> dict:
        """uvicorn.Config's TLS arguments (none without TLS)."""
        import ssl

        if not self.tls:
            return {}
        args = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.client_ca is not None:
            args |= {"ssl_ca_certs": self.client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return args


class Watched:
    """Files looked at again at most every ``RELOAD_EVERY`` seconds: ``changed()`` is True
    once for each change seen (by inode, mtime and size)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self._stamps = [_stamp(p) for p in paths]
        self._looked = time.monotonic()
        self._lock = threading.Lock()

    def changed(self, *, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            if now - self._looked < RELOAD_EVERY:
                return False
            self._looked = now
            stamps = [_stamp(p) for p in self.paths]
            if stamps == self._stamps:
                return False
            self._stamps = stamps
            return True


def _stamp(path: str) -> tuple | None:
    """What tells a changed file (a Kubernetes Secret's update swaps a symlink: followed)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def load_tokens(path: str) -> tuple[bytes, ...]:
    """The tokens of ``serve.http_token_file``; a ConfigError naming the key and the line
    for anything else."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"serve.http_token_file: cannot read {path}: {exc}") from None
    tokens = []
    for n, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if len(token) < MIN_TOKEN or any(c.isspace() for c in token):
            raise ConfigError(f"serve.http_token_file: {path} line {n}: a token is at least "
                              f"{MIN_TOKEN} characters without spaces (e.g. `python -c "
                              "'import secrets; print(secrets.token_urlsafe(32))'`)")  # fmt: skip
        tokens.append(token.encode())
    if not tokens:
        raise ConfigError(f"serve.http_token_file: {path} holds no token")
    return tuple(tokens)


def access_for(config: Config) -> Access:
    """The endpoint's access rules from the config, checked before anything listens: the
    files readable, and off loopback both TLS and tokens unless ``security.insecure``."""
    s = config.serve
    for key in ("http_tls_cert", "http_tls_key", "http_tls_client_ca"):
        path = getattr(s, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"serve.{key}: {path} is not a readable file")
    if s.http_tls_cert is not None:
        _check_pair(s.http_tls_cert, s.http_tls_key)  # type: ignore[arg-type]
    if s.http_tls_client_ca is not None:
        _check_ca(s.http_tls_client_ca)
    access = Access(load_tokens(s.http_token_file) if s.http_token_file else (),
                    s.http_tls_cert, s.http_tls_key, s.http_token_file,
                    s.http_tls_client_ca)  # fmt: skip
    who = bool(access.tokens) or access.client_ca is not None
    if is_loopback(s.http_bind) or (access.tls and who):
        return access
    missing = " and ".join(
        what for what, ok in (
            ("TLS (serve.http_tls_cert, serve.http_tls_key)", access.tls),
            ("tokens (serve.http_token_file) or client certificates "
             "(serve.http_tls_client_ca)", who)) if not ok
    )  # fmt: skip
    if not config.security.insecure:
        raise ConfigError(f"refusing to serve the Open Inference Protocol on {s.http_bind} "
                          f"without {missing}: anyone who can reach it could ask predictions"
                          f"{' and read the tokens' if access.tokens else ''}; set them, or "
                          "pass --insecure")  # fmt: skip
    log.warning("http: serving on %s without %s (--insecure): anyone who can reach it can "
                "ask predictions", s.http_bind, missing)  # fmt: skip
    return access


def _check_pair(cert: str, key: str) -> None:
    """The certificate chain and its key load as a TLS server's would: a ConfigError naming
    both keys here, not a traceback when the server starts (or restarts, again and again)."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"serve.http_tls_cert / serve.http_tls_key: {cert} and {key} are not "
                          f"a PEM certificate chain and its unencrypted private key ({exc})"
                          ) from None  # fmt: skip


def _check_ca(path: str) -> None:
    """The client CA bundle loads as the TLS server will load it."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"serve.http_tls_client_ca: {path} is not a PEM bundle of CA "
                          f"certificates ({exc})") from None  # fmt: skip


def guard(app, access: Access):  # noqa: ANN001, ANN201 -- an ASGI app in, one out
    """``app`` behind ``access``'s tokens: a request without a listed one (health checks
    aside) is answered 401 in the protocol's error shape and never reaches ``app``."""
    if not access.tokens:
        return app
    from starlette.responses import JSONResponse

    async def guarded(scope, receive, send):  # noqa: ANN001, ANN202
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if access.allows(header):
            return await app(scope, receive, send)
        what = f"{scope['method']} {scope['path']}"
        body = {"error": access.refuse(what, header is not None)}
        reply = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": CHALLENGE})
        return await reply(scope, receive, send)

    return guarded


def grpc_interceptor(access: Access):  # -> grpc.ServerInterceptor | None
    """A gRPC interceptor refusing every RPC but the health checks without a listed token
    (UNAUTHENTICATED, before the request is read); None when no token is asked."""
    if not access.tokens:
        return None
    import grpc

    class Tokens(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):  # noqa: ANN001, ANN202
            method = details.method.rpartition("/")[2]
            header = next((v for k, v in details.invocation_metadata or ()
                           if k == "authorization"), None)  # fmt: skip
            if method in OPEN_RPCS or access.allows(header):
                return continuation(details)
            handler = continuation(details)
            if handler is None:  # an RPC nobody serves: UNIMPLEMENTED as before
                return None
            message = access.refuse(method, header is not None)

            def deny(request, context):  # noqa: ANN001, ANN202
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                    (False, True): grpc.unary_stream_rpc_method_handler,
                    (True, False): grpc.stream_unary_rpc_method_handler,
                    (True, True): grpc.stream_stream_rpc_method_handler}  # fmt: skip
            make = kind[(handler.request_streaming, handler.response_streaming)]
            return make(deny, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)  # fmt: skip

    return Tokens()
