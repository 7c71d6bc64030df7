"""The reducer's evaluation bookkeeping: the eval batches of a round accumulated (in the test
scoring also the same rows with each single expert masked), the ``eval`` record of a finished
validation round, the ``test`` record of the test scoring (and ``eval_predictions.csv``), the
eval history, and the contents of ``summary.json`` built from them. The model runs in the
reducer loop (``service.py``); only the test scoring's per-missing-expert passes run here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from traci_ml.core.data import Dataset
from traci_ml.services.reducer.metrics import ReducerMetrics
from traci_ml.services.reducer.runlog import (
    EvalRound,
    MetricsLog,
    metric_name,
    write_eval_predictions,
)


class Evaluation:
    """The evaluation round in progress and the ``eval`` records of the finished ones."""

    def __init__(self, dataset: Dataset, predictions: Path, metrics: ReducerMetrics) -> None:
        self.dataset = dataset
        self.predictions = predictions  # RUN_DIR/eval_predictions.csv, the final round
        self.metrics = metrics
        self.history: list[dict[str, Any]] = []  # one eval record per round (checkpointed)
        self.test: dict[str, Any] | None = None  # the test scoring's record
        self.round: EvalRound | None = None
        self.round_key: tuple[str, int] | None = None  # (split, round) being accumulated
        self.missing_rounds: dict[int, EvalRound] = {}  # test scoring: one per masked expert

    def _new_round(self) -> EvalRound:
        return EvalRound(self.dataset.task, self.dataset.n_experts, self.dataset.y_std)

    def add(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        att: torch.Tensor,
        absent: torch.Tensor,
        rows: torch.Tensor,
        key: tuple[str, int] = ("test", 0),
    ) -> None:
        """One eval batch's outputs (``key``: its split and round); the first batch of a round
        starts it, and a round whose last batch never came is dropped here."""
        if self.round is None or self.round_key != key:
            self.round, self.round_key = self._new_round(), key
            self.missing_rounds = {}
        self.round.add(logits, y, att, absent, rows=rows)

    def add_missing(
        self, model: nn.Module, x: torch.Tensor, absent: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Graceful degradation: the same rows ``x`` (B, N, d) scored with each single expert
        masked, one round per expert; ``model`` is already in eval mode."""
        for i in range(self.dataset.n_experts):
            without = absent.clone()
            without[:, i] = True
            with torch.no_grad():
                logits_i, att_i = model(x, without)
            self.missing_rounds.setdefault(i, self._new_round()).add(logits_i, y, att_i, without)

    def finish(
        self,
        records: MetricsLog,
        *,
        step: int,
        seq: int,
        wall_seconds: float,
        test: bool = False,
        kind: str = "eval",
        judge: Callable[[dict[str, Any]], Any] | None = None,
    ) -> dict[str, Any]:
        """Ends the round: its record of ``kind`` (``eval`` records are the history; the
        test scoring's is ``test``, or, in a run without validation, its last ``eval``),
        written to ``records`` and the eval gauges; returned. ``judge`` sees the record
        first and may add to it (model selection's decision)."""
        assert self.round is not None and self.round_key is not None
        split, rnd = self.round_key
        result = self.round.result()
        if test:  # the rows behind summary.json's test_* figures (docs/predict.md)
            write_eval_predictions(self.predictions, self.round, self.dataset)
        name = metric_name(self.dataset.task)
        if self.missing_rounds:
            views = [v.name for v in self.dataset.views]
            result["missing_expert"] = {
                views[i]: r.result()[name] for i, r in sorted(self.missing_rounds.items())
            }
        self.round, self.round_key, self.missing_rounds = None, None, {}
        record = {
            "kind": kind,
            "split": split,
            "round": rnd,
            "step": step,
            "seq": seq,
            **result,
            "wall_seconds": wall_seconds,
        }
        if judge is not None:
            judge(record)
        if test:
            self.test = record
        if kind == "eval":
            self.history.append(record)
        records.write(record)
        self.metrics.eval_loss.set(result["loss"])
        self.metrics.eval_metric.set(result[name])
        for k, part in result["by_experts_present"].items():
            self.metrics.eval_by_present.labels(present=k).set(part[name])
        for i, a in enumerate(result["attention"]):
            self.metrics.attention.labels(expert=str(i), phase="eval").set(a)
        return record

    def summary(
        self,
        *,
        run_id: str,
        steps: int,
        skipped: int,
        wall: float,
        batch_size: int,
        attention_train: list[float],
        overlap: dict[str, Any] | None = None,
        rows_skipped: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """The contents of ``summary.json``: the run's figures, its eval history and the test
        scoring (``test``, and its figures as ``test_*``)."""
        final = self.test or {}
        name = metric_name(self.dataset.task)
        out: dict[str, Any] = {
            "run_id": run_id,
            "task": self.dataset.task,
            "steps": steps,
            "steps_skipped": skipped,
            "wall_seconds": wall,
            "samples_per_sec": steps * batch_size / max(wall, 1e-9),
            "n_experts": self.dataset.n_experts,
            "expert_names": [v.name for v in self.dataset.views],
            "attention_train": attention_train,
            "attention_eval": final.get("attention", []),
            "eval_history": self.history,
            "test": final or None,
            # parties: per expert, the labelled rows it holds (docs/parties.md)
            "overlap": overlap or {},
            "rows_skipped": rows_skipped or {},
        }
        if "by_experts_present" in final:
            out[f"test_{name}_by_experts_present"] = final["by_experts_present"]
        for key in ("accuracy", "loss", "rmse", "r2"):
            if key in final:
                out[f"test_{key}"] = final[key]
        name = metric_name(self.dataset.task)
        if "missing_expert" in final:
            out[f"test_{name}_missing_expert"] = final["missing_expert"]
            pick = min if self.dataset.task == "classification" else max
            out[f"test_{name}_worst_missing"] = pick(final["missing_expert"].values())
        return out
