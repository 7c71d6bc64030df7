"""The run directory: every file a run writes, named in one place, and its config read one way.

A run directory (``run_dir`` in the config) is shared by the processes of one run on one
machine (``traci up``), or collected from a cluster. Who writes what:

==========================  ==================================================================
``config.json``             the reducer, when training starts: the config it trained with
``launch.yaml``             ``traci up``: the effective config it handed its services
``serve.yaml``              ``traci serve``: the effective config of the serving services
``preprocess.json``         the reducer (one-table runs): columns, views, standardisation
``metrics.jsonl``           the reducer: one JSON record per log interval / evaluation
``broker.jsonl``            ``traci up``: the broker's metrics, sampled for the plots
``summary.json``            the reducer, at the end: accuracy, overlap, accounts, stop reason
``eval_predictions.csv``    the reducer: the final evaluation round, row by row
``checkpoints/*.pt``        every service its own: ``expert-<i>.pt``, ``reducer.pt`` (the
                            last weights); ``expert-<i>.best.pt``, ``reducer.best.pt`` (the
                            best validation round's); ``expert-<i>.round-<r>.pt``: an expert's
                            target of round r, until the reducer's decision on r reaches it
``experts/expert-<i>.*``    each expert: ``.applied`` (its ledger of applied gradients) and
                            ``.json`` (its accounts: sent, applied, dropped ...)
``logs/<service>.log``      ``traci up`` / ``traci serve``: each child's stdout and stderr
``pids.json``               ``traci up``: the children's process ids
``serve-pids.json``         ``traci serve``: the same for serving
``plots/*.png``             ``traci up`` / ``traci plot``: loss, throughput, attention, latency
``tensorboard/``            the reducer, with ``tracking.tensorboard``: TensorBoard event files
``mlflow/``                 the reducer, with ``tracking.mlflow``: ``run.json`` (the MLflow run
                            it logs to) and, by default, the store ``mlflow.db``
==========================  ==================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from traci_ml.core.config import Config, load_config
from traci_ml.core.errors import CheckpointError, ConfigError


class RunDir:
    """Paths of one run directory. Nothing is created or read until a method is called."""

    CONFIG = "config.json"
    LAUNCH = "launch.yaml"
    SERVE = "serve.yaml"
    PREPROCESS = "preprocess.json"
    METRICS = "metrics.jsonl"
    BROKER_METRICS = "broker.jsonl"
    SUMMARY = "summary.json"
    EVAL_PREDICTIONS = "eval_predictions.csv"
    PIDS = "pids.json"
    SERVE_PIDS = "serve-pids.json"
    CHECKPOINTS = "checkpoints"
    EXPERTS = "experts"
    LOGS = "logs"
    PLOTS = "plots"
    TENSORBOARD = "tensorboard"
    MLFLOW = "mlflow"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- the files ---------------------------------------------------------------------------

    @property
    def config_json(self) -> Path:
        return self.path / self.CONFIG

    @property
    def launch(self) -> Path:
        return self.path / self.LAUNCH

    @property
    def serve(self) -> Path:
        return self.path / self.SERVE

    @property
    def preprocess(self) -> Path:
        return self.path / self.PREPROCESS

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def broker_metrics(self) -> Path:
        return self.path / self.BROKER_METRICS

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def eval_predictions(self) -> Path:
        return self.path / self.EVAL_PREDICTIONS

    @property
    def pids(self) -> Path:
        return self.path / self.PIDS

    @property
    def serve_pids(self) -> Path:
        return self.path / self.SERVE_PIDS

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def logs(self) -> Path:
        return self.path / self.LOGS

    @property
    def plots(self) -> Path:
        return self.path / self.PLOTS

    @property
    def tensorboard(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def mlflow(self) -> Path:
        return self.path / self.MLFLOW

    def log(self, service: str) -> Path:
        """``logs/<service>.log``: ``broker``, ``reducer``, ``expert-<i>``."""
        return self.logs / f"{service}.log"

    def expert_checkpoint(self, expert_id: int) -> Path:
        return self.checkpoints / f"expert-{expert_id}.pt"

    def ledger(self, expert_id: int) -> Path:
        """``experts/expert-<i>.applied``: one line per gradient the expert applied."""
        return self.path / self.EXPERTS / f"expert-{expert_id}.applied"

    def accounts(self, expert_id: int) -> Path:
        """``experts/expert-<i>.json``: the expert's step accounts."""
        return self.path / self.EXPERTS / f"expert-{expert_id}.json"

    @property
    def reducer_checkpoint(self) -> Path:
        return self.checkpoints / "reducer.pt"

    @property
    def reducer_best(self) -> Path:
        """The reducer's weights of the best validation round (model selection)."""
        return self.checkpoints / "reducer.best.pt"

    def expert_best(self, expert_id: int) -> Path:
        """Expert ``expert_id``'s target net of the best validation round."""
        return self.checkpoints / f"expert-{expert_id}.best.pt"

    def expert_candidate(self, expert_id: int, rnd: int) -> Path:
        """Expert ``expert_id``'s target net of validation round ``rnd``, kept until the
        reducer's decision on that round reaches it."""
        return self.checkpoints / f"expert-{expert_id}.round-{rnd}.pt"

    def expert_candidates(self, expert_id: int) -> dict[int, Path]:
        """Round -> candidate file, of those on disk."""
        out = {}
        for path in self.checkpoints.glob(f"expert-{expert_id}.round-*.pt"):
            rnd = path.name[len(f"expert-{expert_id}.round-") : -len(".pt")]
            if rnd.isdigit():
                out[int(rnd)] = path
        return out

    def best_checkpoints(self, n_experts: int) -> list[Path]:
        """``model_checkpoints`` of the best validation round."""
        return [self.expert_best(i) for i in range(n_experts)] + [self.reducer_best]

    def model_checkpoints(self, n_experts: int) -> list[Path]:
        """Every checkpoint a trained model needs: each expert's, then the reducer's."""
        return [self.expert_checkpoint(i) for i in range(n_experts)] + [self.reducer_checkpoint]

    def missing_checkpoints(self, n_experts: int) -> list[str]:
        """File names of ``model_checkpoints`` that do not exist (empty: all there)."""
        return [p.name for p in self.model_checkpoints(n_experts) if not p.exists()]

    # -- the run's config, read one way -----------------------------------------------------

    def config_file(self) -> Path:
        """The file the run's config is read from: the reducer's ``config.json`` (what training
        used, present in every deployment), else ``traci up``'s ``launch.yaml``."""
        if not self.path.is_dir():
            raise CheckpointError(f"run directory {self.path} does not exist")
        for path in (self.config_json, self.launch):
            if path.exists():
                return path
        raise CheckpointError(
            f"{self.path} holds no {self.CONFIG} or {self.LAUNCH}: not a run directory"
        )

    def config(
        self,
        overrides: Mapping[str, str] | None = None,
        *,
        environment: bool = False,
    ) -> Config:
        """The run's config (``config_file``) with ``run_dir`` pointing here and ``overrides``
        (``--set``) applied; ``environment`` also applies ``TRACI_*`` variables, as an entry
        point does. A config that no longer validates names the file."""
        path = self.config_file()
        sets = {**(overrides or {}), "run_dir": str(self.path)}
        try:
            return load_config(path, overrides=sets, env=None if environment else {})
        except ConfigError as exc:
            if str(path) in str(exc):
                raise
            raise ConfigError(f"{path}: {exc}") from None
