"""What the reducer writes into the run directory: ``metrics.jsonl`` and ``summary.json``,
and the accumulation of one evaluation round."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

EVAL_PREDICTIONS = "eval_predictions.csv"  # the final evaluation round, row by row


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON object per line; flushed each time so ``traci up`` can follow it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        """One record, stamped with the wall-clock ``time`` (Unix seconds)."""
        self._fh.write(json.dumps({**record, "time": time.time()}, sort_keys=True) + "\n")

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
        if rows is not None:
            self.rows.append(rows.detach().cpu())
            self.absent.append(absent.detach().cpu())
        present = (~absent).float().cpu()
        s, c = (att.detach().cpu() * present).sum(0), present.sum(0)
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
        return out

    def attention(self) -> list[float]:
        if self.att_sum is None or self.att_count is None:
            return [0.0] * self.n_experts
        return (self.att_sum / self.att_count.clamp(min=1)).tolist()


def write_eval_predictions(path: Path, rnd: EvalRound, dataset: Any) -> None:
    """One evaluation round's predictions, one line per test-split row, atomically: ``row``,
    ``label``, ``prediction``, one ``prob_<class>`` per class (classification; the label and
    prediction in the label's units for regression), and ``absent``: the experts masked
    ("" when all were present). The columns of ``traci predict --split test``."""
    classes = dataset.classes if dataset.task == "classification" else ()
    y_mean, y_std = dataset.y_mean, dataset.y_std
    logits, y = torch.cat(rnd.logits), torch.cat(rnd.targets)
    rows, absent = torch.cat(rnd.rows), torch.cat(rnd.absent)
    if classes:
        probs = logits.softmax(dim=-1)
        header = ["row", "label", "prediction", *(f"prob_{c}" for c in classes), "absent"]
        body = [
            [classes[int(t)], classes[int(p.argmax())], *(f"{float(v):.9g}" for v in p)]
            for t, p in zip(y, probs, strict=True)
        ]
    else:
        header = ["row", "label", "prediction", "absent"]
        pred = logits[:, 0] * y_std + y_mean
        body = [
            [f"{float(t) * y_std + y_mean:.9g}", f"{float(p):.9g}"]
            for t, p in zip(y, pred, strict=True)
        ]
    lines = [",".join(header)]
    for r, cells, a in zip(rows.tolist(), body, absent, strict=True):
        gone = " ".join(str(i) for i in a.nonzero().flatten().tolist())
        lines.append(",".join([str(r), *cells, gone]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def metric_name(task: str) -> str:
    return "accuracy" if task == "classification" else "rmse"
