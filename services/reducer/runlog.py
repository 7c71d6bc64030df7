"""What the reducer writes into the run directory: ``metrics.jsonl`` and ``summary.json``,
and the accumulation of one evaluation round."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from traci_ml.core.files import write_atomic
from traci_ml.core.models.attention import column_names, with_cls


class MetricsLog:
    """Appends one JSON object per line; flushed each time so ``traci up`` can follow it.
    Each record also goes to every callable in ``sinks`` (experiment tracking)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", buffering=1)
        self.sinks: list[Callable[[dict[str, Any]], None]] = []

    def write(self, record: dict[str, Any]) -> None:
        """One record, stamped with the wall-clock ``time`` (Unix seconds)."""
        stamped = {**record, "time": time.time()}
        self._fh.write(json.dumps(stamped, sort_keys=True) + "\n")
        for sink in self.sinks:
            sink(stamped)

    def close(self) -> None:
        self._fh.close()


@dataclass
class EvalRound:
    """Accumulates predictions over the eval batches of one round."""

    task: str
    n_experts: int
    y_std: float = 1.0
    logits: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)
    att_sum: torch.Tensor | None = None
    att_count: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)  # test-split row of each prediction
    absent: list[torch.Tensor] = field(default_factory=list)
    att_rows: list[torch.Tensor] = field(default_factory=list)  # (B, N) per row, with ``rows``
    n_present: list[torch.Tensor] = field(default_factory=list)  # experts present per row

    def add(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        att: torch.Tensor,
        absent: torch.Tensor,
        rows: torch.Tensor | None = None,
    ):
        self.logits.append(logits.detach().cpu())
        self.targets.append(y.detach().cpu())
        self.n_present.append((~absent).sum(dim=1).cpu())
        att = att.detach().float().cpu()
        if rows is not None:
            self.rows.append(rows.detach().cpu())
            self.absent.append(absent.detach().cpu())
            self.att_rows.append(att)
        present = (~absent).float().cpu()
        s, c = (att * present).sum(0), present.sum(0)
        self.att_sum = s if self.att_sum is None else self.att_sum + s
        self.att_count = c if self.att_count is None else self.att_count + c

    def result(self) -> dict[str, Any]:
        logits, y = torch.cat(self.logits), torch.cat(self.targets)
        out: dict[str, Any] = {"samples": len(y), "attention": self.attention()}
        if self.task == "classification":
            out["loss"] = float(F.cross_entropy(logits, y))
            out["accuracy"] = float((logits.argmax(-1) == y).float().mean())
        else:
            pred = logits.squeeze(-1)
            mse = float(F.mse_loss(pred, y))
            sst = float(((y - y.mean()) ** 2).sum()) or 1.0
            out["loss"] = mse
            out["rmse"] = math.sqrt(mse) * self.y_std  # in the label's own units
            out["r2"] = 1.0 - float(((pred - y) ** 2).sum()) / sst
        out["by_experts_present"] = self.by_present(logits, y)
        return out

    def by_present(self, logits: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float]]:
        """The metric over the rows with k experts present, for each k seen: how the model
        degrades as parties lack rows (``{"4": {"samples": 300, "accuracy": 0.98}, ...}``)."""
        counts = torch.cat(self.n_present) if self.n_present else torch.zeros(0)
        out: dict[str, dict[str, float]] = {}
        for k in sorted(set(counts.tolist())):
            at = counts == k
            if self.task == "classification":
                value = {"accuracy": float((logits[at].argmax(-1) == y[at]).float().mean())}
            else:
                err = float(((logits[at].squeeze(-1) - y[at]) ** 2).mean())
                value = {"rmse": math.sqrt(err) * self.y_std}
            out[str(int(k))] = {"samples": int(at.sum()), **value}
        return out

    def attention(self) -> list[float]:
        if self.att_sum is None or self.att_count is None:
            return [0.0] * self.n_experts
        return (self.att_sum / self.att_count.clamp(min=1)).tolist()


def write_eval_predictions(path: Path, rnd: EvalRound, dataset: Any) -> None:
    """One evaluation round's predictions, one line per test-split row, atomically: ``row``,
    ``id`` (the row's number in the one table, or its id in the label file), ``label``,
    ``prediction``, one ``prob_<class>`` per class (classification; the label and prediction
    in the label's units for regression), ``absent``: the experts masked ("" when all
    were present), and each row's attention: ``attn_cls`` and ``attn_<expert>`` per expert
    (``core/models/attention.py``; a masked expert weighs 0). The columns of ``traci predict
    --split test --attention``; ``traci plot`` draws its attention heat map from them."""
    classes = dataset.classes if dataset.task == "classification" else ()
    y_mean, y_std = dataset.y_mean, dataset.y_std
    logits, y = torch.cat(rnd.logits), torch.cat(rnd.targets)
    rows, absent = torch.cat(rnd.rows), torch.cat(rnd.absent)
    ids = getattr(dataset, "ids_test", None)
    if classes:
        probs = logits.softmax(dim=-1)
        header = ["row", "id", "label", "prediction", *(f"prob_{c}" for c in classes), "absent"]
        body = [
            [classes[int(t)], classes[int(p.argmax())], *(f"{float(v):.9g}" for v in p)]
            for t, p in zip(y, probs, strict=True)
        ]
    else:
        header = ["row", "id", "label", "prediction", "absent"]
        pred = logits[:, 0] * y_std + y_mean
        body = [
            [f"{float(t) * y_std + y_mean:.9g}", f"{float(p):.9g}"]
            for t, p in zip(y, pred, strict=True)
        ]
    views = getattr(dataset, "views", None)
    names = [v.name for v in views] if views else [str(i) for i in range(rnd.n_experts)]
    header += [_csv(n) for n in column_names(names)]
    att = with_cls(torch.cat(rnd.att_rows)).tolist()  # one per row, kept with rnd.rows
    lines = [",".join(header)]
    for r, cells, a, w in zip(rows.tolist(), body, absent, att, strict=True):
        gone = " ".join(str(i) for i in a.nonzero().flatten().tolist())
        weights = (f"{v:.9g}" for v in w)
        lines.append(",".join([str(r), _csv(ids[r] if ids is not None else r), *cells, gone,
                               *weights]))  # fmt: skip
    write_atomic(path, "\n".join(lines) + "\n")


def _csv(value: object) -> str:
    """A CSV cell (ids may be text with commas or quotes)."""
    text = str(value)
    if any(c in text for c in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def metric_name(task: str) -> str:
    return "accuracy" if task == "classification" else "rmse"
