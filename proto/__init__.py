"""The TRACI wire protocol (``traci_ml.proto``): see ``wire.py`` and docs/protocol.md."""

from traci_ml.proto.wire import (
    DTYPES,
    KINDS,
    MAX_EXPERTS,
    MAX_HEADER_BYTES,
    MAX_TENSOR_BYTES,
    PHASES,
    REJECT_REASONS,
    VERSION,
    Ack,
    Batch,
    Drop,
    Emb,
    Goodbye,
    Grad,
    Heartbeat,
    Hello,
    Message,
    Tensor,
    Welcome,
    decode,
    encode,
    is_finite,
)

__all__ = [
    "DTYPES", "KINDS", "MAX_EXPERTS", "MAX_HEADER_BYTES", "MAX_TENSOR_BYTES", "PHASES",
    "REJECT_REASONS", "VERSION", "Ack", "Batch", "Drop", "Emb", "Goodbye", "Grad", "Heartbeat",
    "Hello", "Message", "Tensor", "Welcome", "decode", "encode", "is_finite",
]
