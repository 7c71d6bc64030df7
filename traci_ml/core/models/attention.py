"""A prediction's attention per expert, as ``traci predict --attention`` and the served answer
report it (docs/predict.md, "Attention").

Which attention: the reducer's **last** Transformer block, the softmax weights of the [CLS]
query over the keys ([CLS] itself and one token per expert), **averaged over heads**; no
earlier layer. It is the attention the head reads (the head sees the last block's [CLS]
output only) and the one ``Reducer.forward`` returns, the reducer reports per expert in
``metrics.jsonl``/``summary.json`` (there averaged over rows) and Prometheus exports. Each
head's row is a softmax, so a row of the average sums to 1 over [CLS] and the experts; an
expert masked for a row weighs exactly 0 there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the client's columns need none
    import torch

CLS = "cls"  # the column of [CLS]'s weight on itself


def with_cls(att: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` [CLS] -> expert weights (``Reducer.forward``'s second output) -> ``(B, 1 + N)``
    with [CLS]'s weight on itself first: the rest of the row's 1 (clamped at 0 against
    rounding), so every row sums to 1."""
    import torch

    own = (1.0 - att.sum(dim=1, keepdim=True)).clamp_min(0.0)
    return torch.cat([own, att], dim=1)


def column_names(
    expert_names: list[str] | tuple[str, ...], ids: list[int] | tuple[int, ...] | None = None
) -> list[str]:
    """The CSV columns of a row's attention: ``attn_cls``, then ``attn_<expert name>`` per
    expert, or ``attn_<expert id>`` for all (``ids``, default 0, 1, ...) when the names are
    not unique or one of them is ``cls``."""
    names = [str(n) for n in expert_names]
    if len(set(names)) != len(names) or CLS in names:
        names = [str(i) for i in (range(len(names)) if ids is None else ids)]
    return [f"attn_{n}" for n in (CLS, *names)]
