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
"""

from __future__ import annotations


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
