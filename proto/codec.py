"""The compressed wire dtype ``int8``: symmetric int8 values with one float32 scale per row.

A row is the last axis of the tensor's logical shape (``[B, d]``: B rows of d values). Each
row ``x`` is sent as ``scale = max|x| / 127`` (0 for a row of zeros) and ``q = round(x /
scale)`` in [-127, 127]; the receiver reads ``q * scale``, within ``scale / 2`` of ``x`` per
value. The frame holds the B float32 scales first (little-endian), then the B*d int8 values,
row-major: ``messages.frame_nbytes`` is its size, 4*B + B*d, about a quarter of float32.

What a peer may send: a scale is finite and >= 0 (``scale_problem``; decode refuses a
negative one as ``bad_scale``, NaN/Inf as ``non_finite``), and ``127 * scale`` stays within
the value bound (``values.value_problem``), so every dequantized value obeys it.

Pure numpy: no torch (the broker and the protocol never import it), no messages.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

QMAX = 127  # symmetric: -128 is never sent (and reads as -128 * scale if a peer sends it)
SCALE_BYTES = 4
_F4 = np.dtype("<f4")
_I1 = np.dtype("i1")


def rows_of(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """(rows, values per row) of a logical shape: the last axis is a row."""
    width = shape[-1] if len(shape) else 1
    return math.prod(shape[:-1]), width


def quantize(x: np.ndarray) -> np.ndarray:
    """The int8 frame (a 1-D uint8 array) of float array ``x`` (any shape; rows are its last
    axis). A row holding NaN or Inf gets a NaN or Inf scale (and zeros): the value checks
    refuse it, as they refuse NaN in a float32 frame."""
    shape = x.shape
    rows, width = rows_of(shape)
    flat = np.asarray(x, dtype=np.float32).reshape(rows, width)
    frame = np.empty(SCALE_BYTES * rows + rows * width, dtype=np.uint8)
    scales = frame[: SCALE_BYTES * rows].view(_F4)
    values = frame[SCALE_BYTES * rows :].view(_I1).reshape(rows, width)
    if not flat.size:
        scales[:] = 0.0
        return frame
    absmax = np.max(np.abs(flat), axis=1)
    np.divide(absmax, np.float32(QMAX), out=scales, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inverse = np.where(scales > 0, np.float32(1.0) / scales, np.float32(0.0))
        q = np.rint(flat * inverse[:, None])
    np.clip(q, -QMAX, QMAX, out=q)
    q[~np.isfinite(q)] = 0  # NaN rows: the NaN scale tells
    values[:] = q
    return frame


def split(buffer: Any, shape: tuple[int, ...] | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy views (scales ``[rows]`` float32, values ``[rows, width]`` int8) of an int8
    frame of logical ``shape``; the frame's size must be right (decode checked it)."""
    rows, width = rows_of(shape)
    raw = np.frombuffer(buffer, dtype=np.uint8)
    scales = raw[: SCALE_BYTES * rows].view(_F4)
    values = raw[SCALE_BYTES * rows :].view(_I1).reshape(rows, width)
    return scales, values


def scales_of(buffer: Any, rows: int) -> np.ndarray:
    """The ``rows`` scales at the head of an int8 frame (a zero-copy view)."""
    return np.frombuffer(buffer, dtype=_F4, count=rows)


def dequantize(buffer: Any, shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """The float32 values (a new array of ``shape``) of an int8 frame."""
    scales, values = split(buffer, shape)
    out = values.astype(np.float32)
    out *= scales[:, None]
    return out.reshape(tuple(shape))


def scale_problem(buffer: Any, rows: int, max_abs: float = math.inf) -> tuple[str, str] | None:
    """``(reason, detail)`` when a scale of the frame is NaN/Inf (``non_finite``), negative
    (``bad_scale``) or lets a value exceed ``max_abs`` (``too_large``: ``127 * scale >
    max_abs``); None when every scale is fine."""
    scales = scales_of(buffer, rows)
    if not scales.size:
        return None
    hi, lo = float(np.max(scales)), float(np.min(scales))
    if not math.isfinite(hi - lo):  # NaN makes max/min NaN; Inf makes the difference Inf
        return "non_finite", "a row's scale is NaN or Inf"
    if lo < 0:
        return "bad_scale", f"a row's scale is negative ({lo:.3g})"
    # A sender never writes -128 (its rows reach +-127); a peer that does gets its bound
    # taken as 128 * scale, so no dequantized value escapes the check.
    top = hi * QMAX
    if top <= max_abs < hi * (QMAX + 1) and rows:
        values = np.frombuffer(buffer, dtype=_I1, offset=SCALE_BYTES * rows)
        if values.size and int(np.min(values)) == -QMAX - 1:
            top = hi * (QMAX + 1)
    if top > max_abs * (1 + 1e-6):  # the float32 scale's own rounding is not a violation
        return "too_large", (f"a row's scale {hi:.3g} allows {top:.3g}, beyond the "
                             f"bound {max_abs:.3g}")  # fmt: skip
    return None
