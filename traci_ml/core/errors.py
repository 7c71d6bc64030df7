"""The one exception tree of TRACI.

    TraciError
     +-- ConfigError      a config file, flag or environment variable is wrong (names the key)
     +-- DataError        a dataset or CSV file is unusable (names the file/column)
     +-- ProtocolError    a message on a socket is malformed (``reason`` is a metric label)
     +-- PeerTimeout      a peer stopped answering within its liveness window
     +-- CheckpointError  a checkpoint is missing, corrupt, or from another run
     +-- ServeError       a served prediction failed (``status``: its cause, as on the wire)
     +-- ExportError      a trained model cannot be written in the asked format

Every error carries optional context (service, peer, step) so log lines name where it happened.

A process ends with ``exit_code(error)``: 2 (``CONFIG_ERROR``) for a config, usage or
checkpoint error, 3 (``DATA_ERROR``) for a service's data error, 1 for a peer that stopped
answering (a crash: a restart may find it back). ``traci up`` never restarts a service that
exits 2 or 3, and the Kubernetes Jobs fail at once on them (docs/reliability.md): keep these
codes stable.
"""

from __future__ import annotations

CONFIG_ERROR = 2  # a config, usage or checkpoint error: a restart fails the same way
DATA_ERROR = 3  # a service's data is unusable: a restart reads the same data again
PEER_LOST = 1  # a peer stopped answering: like a crash, a restart may succeed


class TraciError(Exception):
    """Base of every error TRACI raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        service: str | None = None,
        peer: str | None = None,
        step: int | None = None,
    ) -> None:
        self.message = message
        self.service = service
        self.peer = peer
        self.step = step
        super().__init__(message)

    def __str__(self) -> str:
        ctx = [
            f"{name}={value}"
            for name, value in (("service", self.service), ("peer", self.peer), ("step", self.step))
            if value is not None
        ]
        return f"{self.message} ({', '.join(ctx)})" if ctx else self.message


class ConfigError(TraciError):
    """Invalid configuration. The message names the offending key."""


class DataError(TraciError):
    """A dataset cannot be loaded or does not match the config."""


class ProtocolError(TraciError):
    """A message failed validation. ``reason`` is a short, stable label used in metrics."""

    def __init__(self, reason: str, message: str, **context: object) -> None:
        self.reason = reason
        self.kind: str | None = None  # the message kind, once the header named a valid one
        self.seq: int | None = None  # and its step, when it had a valid one
        self.expert_id: int | None = None  # and the expert it names, if any
        super().__init__(f"{reason}: {message}", **context)  # type: ignore[arg-type]


class PeerTimeout(TraciError):
    """A peer stopped answering within its liveness window."""


class CheckpointError(TraciError):
    """A checkpoint cannot be read, or belongs to another run or expert."""


class ServeError(TraciError):
    """The cluster answered a prediction request with an error (``status``: its cause, the
    REPLY's status on the wire), or did not answer."""

    def __init__(self, status: str, detail: str) -> None:
        self.status, self.detail = status, detail
        super().__init__(f"{status}: {detail}" if detail else status)


class ExportError(TraciError):
    """The model cannot be written in the asked format."""


def exit_code(error: TraciError, *, service: bool = False) -> int:
    """The exit code of a process that ends with ``error``; ``service``: a broker, reducer or
    expert (a data error or a lost peer there has its own code; elsewhere every error is 2)."""
    if service and isinstance(error, DataError):
        return DATA_ERROR
    if service and isinstance(error, PeerTimeout):
        return PEER_LOST
    return CONFIG_ERROR
