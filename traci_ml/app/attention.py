"""``traci predict --attention``: each row's attention per expert, offline (docs/predict.md,
"Attention"; which attention it is: ``traci_ml/core/models/attention.py``).

The numbers are the reducer's own: a forward hook records the attention that
``Reducer.forward`` returns on every call while ``recording`` is open, so the prediction
runs exactly as without it (the same batches, masks and rounding) and the attention comes
out beside it. ``with_attention`` appends the columns ``attn_cls``, ``attn_<expert>``... to
``traci predict``'s output columns, one line per output row.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from traci_ml.core.models.attention import column_names, with_cls

if TYPE_CHECKING:  # torch and the data layer only where used: `traci request` needs neither
    import torch
    from torch import nn

    from traci_ml.core.config import Config


@contextmanager
def recording(reducer: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor] | None]:
    """Every ``(B, N)`` attention ``reducer`` returns while open, in call order (None when
    not ``enabled``: nothing is hooked)."""
    if not enabled:
        yield None
        return
    seen: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        seen.append(output[1].detach().float().cpu())

    handle = reducer.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def table(seen: list[torch.Tensor], n_experts: int) -> np.ndarray:
    """``(n, 1 + N)`` float32: per recorded row, [CLS]'s own weight, then each expert's."""
    import torch

    if not seen:
        return np.zeros((0, 1 + n_experts), np.float32)
    return with_cls(torch.cat(seen)).numpy()


def with_attention(
    cols: dict[str, list[Any]], seen: list[torch.Tensor] | None, config: Config
) -> dict[str, list[Any]]:
    """``cols`` (``traci predict``'s output columns) with the attention columns appended, for
    the rows ``cols["row"]`` of what was recorded (``predict_split`` leaves some out); ``cols``
    as it is when nothing was recorded (``recording`` not enabled)."""
    from traci_ml.core.data import view_specs

    if seen is None:
        return cols
    names = [v.name for v in view_specs(config.data)]
    rows = table(seen, len(names))[np.asarray(cols["row"], dtype=np.intp)]
    out = dict(cols)
    for k, name in enumerate(column_names(names)):
        out[name] = rows[:, k].tolist()
    return out


def served_columns(pred: Any) -> tuple[list[str], list[list[str]]]:
    """``traci request --attention``: the attention columns of a served ``Prediction`` (the
    experts that took part, ``pred.experts``; a masked one weighs 0 and has no column) and
    each row's cells; ``([], [[]...])`` when the prediction carries none."""
    if pred.attention is None:
        return [], [[] for _ in range(len(pred.outputs))]
    head = column_names(pred.expert_names, pred.experts)
    both = np.column_stack([pred.attention_cls, pred.attention])
    return head, [[f"{v:.9g}" for v in row] for row in both]
