"""Error feedback for a compressed wire (EF, as in EF-VFL; docs/compression.md).

Each step's rows are different samples, so the residual is kept per sample: row ``i`` of the
sender's own table has its own residual ``r_i``. Sending row ``i`` with value ``x`` sends
``C(x + r_i)`` and keeps ``r_i <- x + r_i - D(C(x + r_i))`` (``C``: the wire's compression,
``D``: what the receiver reads). Over the sends of a row, what the receiver reads then
averages to what was meant: the rounding errors do not pile up in one direction.

The residuals live on the host as float32 (``n_rows * dim * 4`` bytes), are saved in the
sender's checkpoint (``state_dict``) and restored with it.
"""

from __future__ import annotations

import numpy as np
import torch

from traci_ml.core.errors import CheckpointError
from traci_ml.core.tensors import to_wire
from traci_ml.proto import Tensor


class ErrorFeedback:
    """Per-row residuals of ``n_rows`` rows of ``dim`` values."""

    def __init__(self, n_rows: int, dim: int) -> None:
        self.residual = np.zeros((n_rows, dim), dtype=np.float32)

    def compress(self, row_ids: np.ndarray | torch.Tensor, x: torch.Tensor, dtype: str,
                 held: np.ndarray | None = None) -> Tensor:  # fmt: skip
        """The wire tensor of ``x`` ``[B, dim]`` (rows ``row_ids`` of the table, distinct)
        with each held row's residual added before compressing; the new residuals are kept.
        ``held``: a mask of the rows that are real (None: all); the others (zeros, masked
        by the receiver) are sent as they are and touch no residual. A row that comes out
        non-finite keeps its old residual (the value checks refuse the tensor anyway)."""
        ids = np.asarray(row_ids.cpu() if isinstance(row_ids, torch.Tensor) else row_ids,
                         dtype=np.int64)  # fmt: skip
        host = x.detach().to(device="cpu", dtype=torch.float32).numpy()
        pick = np.arange(len(ids)) if held is None else np.flatnonzero(held)
        rows = ids[pick]
        wanted = host.copy()
        wanted[pick] += self.residual[rows]
        wire = to_wire(torch.from_numpy(wanted), dtype)
        got = _read(wire)
        new = wanted[pick] - got[pick]
        ok = np.isfinite(new).all(axis=1)
        self.residual[rows[ok]] = new[ok]
        return wire

    def norm(self) -> float:
        """The root mean square of every residual (0 when none is held)."""
        return float(np.sqrt(np.mean(np.square(self.residual)))) if self.residual.size else 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"residual": torch.from_numpy(self.residual.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        residual = state.get("residual")
        if not isinstance(residual, torch.Tensor) or residual.shape != self.residual.shape:
            got = getattr(residual, "shape", None)
            raise CheckpointError(f"error feedback residual of shape {got}, want "
                                  f"{tuple(self.residual.shape)}")  # fmt: skip
        self.residual = residual.to(torch.float32).numpy().copy()


def _read(wire: Tensor) -> np.ndarray:
    """What the receiver reads of ``wire``, as float32 (the floats widened, int8 decoded)."""
    if wire.dtype == "bfloat16":
        bits = np.frombuffer(wire.buffer, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(wire.shape)
    return np.asarray(wire.numpy(), dtype=np.float32)
