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

    def add(self, logits: torch.Tensor, y: torch.Tensor, att: torch.Tensor, absent: torch.Tensor):
        self.logits.append(logits.detach().cpu())
        self.targets.append(y.detach().cpu())
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


def metric_name(task: str) -> str:
    return "accuracy" if task == "classification" else "rmse"
