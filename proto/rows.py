"""Row bitmaps: which of a tensor's rows a party holds (docs/protocol.md, "Row bitmaps"), and
the header size of a QUERY's ids. Pure numpy/msgpack: no torch, no sockets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from traci_ml.core.errors import ProtocolError


def pack_rows(mask: Any) -> bytes:
    """The row bitmap of a 1-D boolean ``mask`` (``mask[i]``: row i present):
    ``np.packbits(mask, bitorder="little")``, ceil(B/8) bytes, padding bits zero; b"" when
    every row is present (the same meaning, and what the wire omits)."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.ndim != 1:
        raise ValueError(f"a row mask is a 1-D bool array, got {mask.dtype} of shape {mask.shape}")
    if mask.all():
        return b""
    return np.packbits(mask, bitorder="little").tobytes()


def unpack_rows(bits: bytes, n: int) -> np.ndarray:
    """The ``n`` booleans of row bitmap ``bits`` (b"": all True). A bitmap of the wrong
    length or with padding bits set is ``ProtocolError("bad_field")``."""
    problem = rows_problem(bits, n)
    if problem is not None:
        raise ProtocolError("bad_field", f"row bitmap: {problem}")
    if not bits:
        return np.ones(n, dtype=bool)
    packed = np.frombuffer(bits, dtype=np.uint8)
    return np.unpackbits(packed, count=n, bitorder="little").astype(bool)


def ids_bytes(ids: Sequence[Any]) -> int:
    """The bytes a QUERY's ``ids`` take in its header (msgpack), for ``MAX_IDS_BYTES``."""
    return len(msgpack.packb(list(ids), use_bin_type=True))


def rows_problem(bits: bytes, n: int) -> str | None:
    """What is wrong with ``bits`` as the row bitmap of ``n`` rows; None when it is one."""
    if not bits:
        return None
    need = (n + 7) >> 3
    if len(bits) != need:
        return f"{len(bits)} bytes for {n} rows, needs {need}"
    tail = n & 7
    if tail and bits[-1] >> tail:
        return f"padding bits beyond row {n} are set"
    return None
