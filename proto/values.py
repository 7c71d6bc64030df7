"""What a peer's values may be: finite, and within a bound (``security.max_abs_value``). The
structural checks of ``wire.decode`` cannot know a service's bound, so each service calls
``value_problem`` where values enter it. Pure numpy: no torch, no sockets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from traci_ml.proto import codec
from traci_ml.proto.messages import BLOB_DTYPES, DTYPES, ROW_SCALED, Tensor

# The default bound on any value a peer sends (``security.max_abs_value`` overrides it):
# finite values this large are no embedding or gradient a sane network makes, and one of
# them is enough to turn a Transformer's loss into NaN (docs/security.md).
DEFAULT_MAX_ABS = 1e6


def value_problem(tensors: Sequence[Tensor], max_abs: float) -> tuple[str, str] | None:
    """``(reason, detail)`` when a tensor holds NaN/Inf (``non_finite``) or a finite value
    with ``|x| > max_abs`` (``too_large``); None when every value is in bounds.

    The protocol's structural checks (``decode``) cannot know a service's bound, so each
    service calls this where values enter it: the broker on EMB/GRAD/QEMB/QOUT/QUERY, the
    experts on GRAD, the reducer on BATCH. Blob tensors (int64/uint8, ALIGN's) hold no
    values: they are skipped. A compressed tensor (int8) is judged by its row scales
    (``codec.scale_problem``): each finite, and ``127 * scale <= max_abs``, so that every
    value it dequantizes to is within the bound."""
    bound = max_abs * max_abs
    for i, tensor in enumerate(tensors):
        dtype = tensor.dtype
        if dtype in ROW_SCALED:
            problem = codec.scale_problem(tensor.buffer, codec.rows_of(tensor.shape)[0], max_abs)
            if problem is None:
                continue
            # decode refuses a negative scale (bad_scale); one made here holds values whose
            # size the scale does not bound
            return ("too_large" if problem[0] == "bad_scale" else problem[0],
                    f"tensor {i}: {problem[1]}")  # fmt: skip
        if dtype == "float32":
            # One BLAS pass, the usual verdict: every x*x <= the sum of squares, so a sum
            # within max_abs**2 proves each |x| within max_abs (and finite; NaN fails <=).
            flat = _frombuffer(tensor.buffer, _F4)
            if flat.size <= _DOT_MAX:
                squares = float(_vdot(flat, flat))
                if squares <= bound and _isfinite_scalar(squares):
                    continue
        elif dtype not in DTYPES:
            continue  # a blob: ids or bytes, not values
        values = _as_float(tensor)
        if not values.size:
            continue
        hi, lo = float(np.max(values)), float(np.min(values))
        if hi <= max_abs and -lo <= max_abs and math.isfinite(hi - lo):  # NaN: False
            continue
        if not math.isfinite(hi - lo):  # NaN anywhere makes max/min NaN; Inf makes it Inf
            return "non_finite", f"tensor {i} holds NaN or Inf"
        worst = hi if hi >= -lo else lo
        return "too_large", f"tensor {i} holds {worst:.3g}, beyond the bound {max_abs:.3g}"
    return None


_DOT_MAX = 1 << 16  # float32 values checked by one dot first (OpenBLAS: one thread there)
_F4 = np.dtype("<f4")
_frombuffer, _vdot, _isfinite_scalar = np.frombuffer, np.vdot, math.isfinite


def _as_float(tensor: Tensor) -> np.ndarray:
    """The tensor's values as a float numpy view (bfloat16: widened to float32)."""
    if tensor.dtype == "bfloat16":
        bits = np.frombuffer(tensor.buffer, dtype="<u2").astype(np.uint32) << 16
        return bits.view("<f4")
    return tensor.numpy()


def is_finite(tensor: Tensor) -> bool:
    """True when no element is NaN or Inf (bfloat16: exponent bits not all ones); always
    for a blob (int64/uint8), which holds no floats."""
    if tensor.dtype in BLOB_DTYPES:
        return True
    if tensor.dtype in ROW_SCALED:  # its values are int8: only the scales can be NaN/Inf
        scales = codec.scales_of(tensor.buffer, codec.rows_of(tensor.shape)[0])
        return bool(np.isfinite(scales).all())
    if tensor.dtype == "bfloat16":
        bits = np.frombuffer(tensor.buffer, dtype="<u2")
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    return bool(np.isfinite(tensor.numpy()).all())
