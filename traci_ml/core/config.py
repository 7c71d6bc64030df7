"""Run configuration: one validated object, built once at the entry point and passed down.

Sources, later ones winning: the YAML file, environment variables ``TRACI_<SECTION>__<KEY>``
(e.g. ``TRACI_NETWORK__BROKER_HOST=broker``), then CLI ``--set section.key=value``. Values from
the environment and the CLI are parsed as YAML scalars, so ``5`` is an int and ``[64, 32]`` a
list. Every error is a ``ConfigError`` that names the key (or variable) at fault.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from traci_ml.core.errors import ConfigError
from traci_ml.proto.values import DEFAULT_MAX_ABS

ENV_PREFIX = "TRACI_"
# Adam's L2 penalty for the experts and the reducer, "auto" by default: WEIGHT_DECAY_ROWS / the
# rows training draws from (traci_ml.core.models.optim.weight_decay_for), the prior's weight
# against a mean loss over n rows. Without a penalty small tables overfit (train loss ~1e-3
# while held-out loss grows); one fixed value cannot suit 108 rows (iris) and 1440
# (friedman1) at once. Measured in docs/config.md "Weight decay by default" (bench.quality).
DEFAULT_WEIGHT_DECAY = "auto"
WEIGHT_DECAY_ROWS = 40.0
# Gaussian noise added to each expert's standardised inputs on train steps; none by default.
# "auto": for regression sd sqrt(WEIGHT_DECAY_ROWS / rows training draws from), at most
# INPUT_NOISE_MAX; none for classification (traci_ml.core.models.expert.input_noise_for).
# Under a squared loss such noise on a linear model is exactly a ridge penalty of sd**2: the
# same prior worth 40 rows as the weight decay, put on the nets' slope in their inputs. Not
# the default: over five splits of diabetes it gained 0.005 r2 and cost friedman1 0.008
# (docs/config.md "Input noise").
DEFAULT_INPUT_NOISE = 0.0
INPUT_NOISE_MAX = 0.3
_MODULE_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _auto_or_number(key: str) -> AfterValidator:
    """A key that takes "auto" or a finite number >= 0 (the error names ``key``)."""

    def check(v: str | float) -> str | float:
        if not isinstance(v, str) and not (v >= 0.0 and v != float("inf")):
            raise ValueError(f"{key} must be 'auto' or a number >= 0")
        return v

    return AfterValidator(check)


WeightDecay = Annotated[Literal["auto"] | float, _auto_or_number("weight_decay")]
InputNoise = Annotated[Literal["auto"] | float, _auto_or_number("input_noise")]


class ExpertModelConfig(_Section):
    """The embedding network: a feed-forward net, or any nn.Module by import path."""

    hidden: list[int] = Field(default_factory=lambda: [256])
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    norm: Literal["none", "layernorm", "batchnorm"] = "none"
    # "package.module:Class", built as Class(in_dim=..., out_dim=..., **kwargs).
    module: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v):
            raise ValueError("every hidden width must be >= 1")
        return v

    @field_validator("module")
    @classmethod
    def _module_path(cls, v: str | None) -> str | None:
        if v is not None and not _MODULE_PATH.match(v):
            raise ValueError(f"{v!r} is not of the form 'package.module:Class'")
        return v


class ViewConfig(_Section):
    """One expert's view of the data: a name and the feature columns it reads; with
    ``data.source: parties`` also the party's own table (``path``) and its id column."""

    name: str = Field(min_length=1)
    columns: list[str] = Field(min_length=1)
    # This expert's own embedding network; absent: expert.model (shared by every expert).
    model: ExpertModelConfig | None = None
    # parties: this expert's own file (CSV or Parquet) and its id column (default: data.id)
    path: str | None = Field(None, min_length=1)
    id: str | None = Field(None, min_length=1)
    format: Literal["csv", "parquet"] | None = None  # default: from the suffix


class LabelsConfig(_Section):
    """parties: the label holder's table (read by the reducer alone): ids and the label."""

    path: str = Field(min_length=1)
    label: str = Field(min_length=1)
    id: str | None = Field(None, min_length=1)  # default: data.id
    format: Literal["csv", "parquet"] | None = None


class SyntheticConfig(_Section):
    """A generated classification table (benchmarks, smoke tests): Gaussian features, labels
    from a fixed random two-layer teacher, so every feature group carries some signal."""

    rows: int = Field(20000, ge=4)
    features: int = Field(256, ge=1)
    classes: int = Field(10, ge=2)
    experts: int = Field(4, ge=1)  # views: the features split into this many equal groups


class DataConfig(_Section):
    # parties: every view names its own file, the labels their own (docs/parties.md)
    source: Literal["digits", "csv", "synthetic", "parties"] = "digits"
    path: str | None = None  # csv: file path
    label: str | None = None  # csv: label column
    # parties: the label holder's table; the id column every table has unless it names its own
    labels: LabelsConfig | None = None
    id: str = Field("id", min_length=1)
    # parties: how experts learn which of their rows are labelled (through the broker):
    # plain (ids sent as they are) or psi (private set intersection, no id leaves its party)
    align: Literal["plain", "psi"] = "plain"
    # parties: train on every labelled row some expert holds (absent experts masked per row),
    # or only on the rows every expert holds (what intersection-only systems do)
    train_rows: Literal["all", "shared"] = "all"
    task: Literal["classification", "regression"] = "classification"
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    # validation rows carved from the training rows by the seed (model selection and early
    # stopping score them; 0: no validation split, rounds score the test split, as before)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # digits: a preset ("quadrants": 4 experts, one 4x4 quadrant each; "halves": 2 experts).
    # csv: a list of views, one per expert. The number of experts is the number of views.
    # synthetic: "even" (the features split into synthetic.experts contiguous groups).
    views: Literal["quadrants", "halves", "even"] | list[ViewConfig] = "quadrants"
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _csv_needs_path(self) -> DataConfig:
        if self.source == "parties":
            if self.labels is None:
                raise ValueError("data.labels (path, label) is required when data.source is "
                                 "'parties'")  # fmt: skip
            if isinstance(self.views, str):
                raise ValueError("data.views must list each expert's file and columns for "
                                 "data.source 'parties'")  # fmt: skip
            for i, v in enumerate(self.views):
                if v.path is None:
                    raise ValueError(f"data.views[{i}].path ({v.name!r}): every expert needs "
                                     "its own file when data.source is 'parties'")  # fmt: skip
                if v.id in v.columns or (v.id is None and self.id in v.columns):
                    raise ValueError(f"data.views[{i}].columns ({v.name!r}) lists the id "
                                     "column as a feature")  # fmt: skip
            return self
        if self.labels is not None:
            raise ValueError("data.labels is only for data.source 'parties'")
        if not isinstance(self.views, str):
            for i, v in enumerate(self.views):
                if v.path or v.id or v.format:
                    raise ValueError(f"data.views[{i}] ({v.name!r}): path, id and format are "
                                     "only for data.source 'parties'")  # fmt: skip
        if self.source == "csv":
            for key in ("path", "label"):
                if not getattr(self, key):
                    raise ValueError(f"data.{key} is required when data.source is 'csv'")
            if isinstance(self.views, str):
                raise ValueError("data.views must list each expert's columns for a csv source")
        if self.source == "synthetic" and self.synthetic.experts > self.synthetic.features:
            raise ValueError("data.synthetic.experts exceeds data.synthetic.features")
        if isinstance(self.views, str) and (self.views == "even") != (self.source == "synthetic"):
            raise ValueError(f"data.views {self.views!r} does not fit data.source {self.source!r}")
        return self


class ExpertConfig(_Section):
    model: ExpertModelConfig = ExpertModelConfig()
    tau: float = Field(0.1, gt=0.0, le=1.0)  # Polyak rate: target += tau * (online - target)
    lr: float = Field(1e-3, gt=0.0)
    # Adam's L2 penalty; "auto": WEIGHT_DECAY_ROWS / training rows (docs/config.md)
    weight_decay: WeightDecay = DEFAULT_WEIGHT_DECAY
    # sd of the Gaussian noise on the standardised inputs of train steps (0: none); "auto":
    # regression sqrt(WEIGHT_DECAY_ROWS / training rows), at most INPUT_NOISE_MAX
    input_noise: InputNoise = DEFAULT_INPUT_NOISE
    window: int = Field(2, ge=1, le=1024)  # steps in flight (sent, gradient not yet applied)
    step_timeout: float = Field(30.0, gt=0.0)  # seconds before an in-flight step is dropped
    # embeddings and gradients on the wire; int8: per-row scaled (docs/compression.md)
    dtype: Literal["float32", "float16", "bfloat16", "int8"] = "float32"
    # error feedback on the embeddings sent: each row's rounding error is added to its next
    # send (docs/compression.md)
    error_feedback: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    torch_threads: int = Field(1, ge=0)  # 0: torch's default


class ReducerConfig(_Section):
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    ff: int = Field(128, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    expert_dropout: float = Field(0.1, ge=0.0, lt=1.0)  # mask a token with this chance (train)
    lr: float = Field(1e-3, gt=0.0)
    # Adam's L2 penalty; "auto": WEIGHT_DECAY_ROWS / training rows (docs/config.md)
    weight_decay: WeightDecay = DEFAULT_WEIGHT_DECAY
    eval_batch_size: int = Field(512, ge=1)
    device: str = "auto"
    torch_threads: int = Field(1, ge=0)
    # train batches split into this many row slices on parallel threads (CPU; 1: whole batch;
    # traci_ml/core/models/shards.py)
    shards: int = Field(1, ge=1, le=64)
    # a linear path beside the network: each expert's last embedding coordinate(s) a linear
    # map of its columns, summed over the tokens (regression) or mapped to the classes'
    # logits, plus the network's output times a gate penalised toward 0 ("auto": on for
    # regression, off for classification; docs/config.md "Linear path")
    linear_path: Literal["auto"] | bool = "auto"


class TrainConfig(_Section):
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_every: int = Field(250, ge=0)  # 0: evaluate only at the end
    checkpoint_every: int = Field(500, ge=0)  # 0: only at exit
    log_every: int = Field(25, ge=1)  # train steps between metrics.jsonl records
    # Learning rate over train steps, the same function in every process (traci_ml.core.schedule):
    # linear warm-up, then constant or cosine decay to lr * min_lr_ratio at the last step.
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    # Model selection on the validation rounds (docs/config.md "Model selection"): the metric
    # that picks the best round ("auto": per task, core/selection.py), whether lower or
    # higher is better ("auto": from the metric), how many rounds in a row without an
    # improvement of more than min_delta end training early (0: never stop early)
    monitor: Literal["auto", "loss", "accuracy", "rmse", "r2"] = "auto"
    monitor_mode: Literal["auto", "min", "max"] = "auto"
    patience: int = Field(0, ge=0)
    min_delta: float = Field(0.0, ge=0.0)


class JoinConfig(_Section):
    """The broker's straggler-proof join (docs/protocol.md, "Deadline join"). A train step
    is released when every expected expert has sent, or ``deadline`` seconds after
    ``quorum`` of them have (the missing tokens masked). Eval steps always wait for all."""

    # experts whose tokens start the deadline: "all" (no deadline: wait for everyone, as
    # before), a count, or "auto" (all but one: one straggler is not waited for; a count
    # lower than that lets more go, at the price of a deadline learned on fewer experts)
    quorum: Literal["all", "auto"] | int = "auto"
    # seconds after the quorum; "auto": adaptive, 4 x the 90th percentile of how long recent
    # steps took to gather their quorum after their first token, never below min_deadline
    # (the first 16 train steps of a run wait for everyone)
    deadline: Literal["auto"] | float = "auto"
    min_deadline: float = Field(0.05, gt=0.0)
    # an expert on time in its recent steps gets this many deadlines before it is masked
    # (one hiccup of a punctual expert does not cost it a step; a straggler gets one)
    grace: float = Field(8.0, ge=1.0)

    @field_validator("quorum")
    @classmethod
    def _quorum(cls, v: str | int) -> str | int:
        if isinstance(v, int) and v < 1:
            raise ValueError("join.quorum must be >= 1, 'auto' or 'all'")
        return v

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, v: str | float) -> str | float:
        if not isinstance(v, str) and v <= 0:
            raise ValueError("join.deadline must be > 0 seconds or 'auto'")
        return v

    def quorum_of(self, n_experts: int) -> int:
        """How many tokens start the deadline (n_experts: no deadline)."""
        if self.quorum == "all":
            return n_experts
        if self.quorum == "auto":
            return max(1, n_experts - 1)
        return min(int(self.quorum), n_experts)


class NetworkConfig(_Section):
    broker_host: str = "127.0.0.1"  # where experts and the reducer connect
    bind_host: str = "127.0.0.1"  # where the broker binds
    expert_port: int = Field(5555, ge=1, le=65535)
    reducer_port: int = Field(5556, ge=1, le=65535)
    heartbeat_interval: float = Field(0.5, gt=0.0)
    liveness: float = Field(3.0, gt=0.0)  # silence after which a peer counts as gone
    max_pending_steps: int = Field(256, ge=1)  # broker: steps joined but not yet answered
    connect_timeout: float = Field(120.0, gt=0.0)  # peers: give up if the broker never answers
    serve_port: int = Field(5557, ge=0, le=65535)  # the broker's front door for clients; 0: off

    @model_validator(mode="after")
    def _liveness(self) -> NetworkConfig:
        if self.liveness <= self.heartbeat_interval:
            raise ValueError("network.liveness must exceed network.heartbeat_interval")
        if self.expert_port == self.reducer_port:
            raise ValueError("network.expert_port and network.reducer_port must differ")
        if self.serve_port in (self.expert_port, self.reducer_port):
            raise ValueError("network.serve_port must differ from expert_port and reducer_port")
        return self


class ServeConfig(_Section):
    """Served prediction through the broker's front door (docs/serving.md)."""

    max_batch_rows: int = Field(256, ge=1)  # rows of concurrent requests grouped in one query
    max_wait_ms: float = Field(2.0, ge=0.0, le=10000.0)  # a group waits this long; 0: none
    max_request_rows: int = Field(4096, ge=1)  # a larger request is refused (oversize)
    timeout: float = Field(2.0, gt=0.0)  # seconds the experts, then the reducer, may take
    max_inflight: int = Field(32, ge=1)  # queries at the experts or reducer at once
    max_queued: int = Field(1024, ge=1)  # requests waiting beyond that; more are refused (busy)
    # the Open Inference Protocol (KServe v2 REST) beside the front door (app/http_v2.py);
    # traci serve starts it; 0: off
    http_port: int = Field(8080, ge=0, le=65535)
    http_bind: str = "127.0.0.1"  # off loopback only with TLS and tokens (or --insecure)
    # the same protocol over gRPC (app/grpc_v2.py), in the same traci http process, on
    # http_bind:grpc_port; 0: off (traci serve --grpc-port P sets it)
    grpc_port: int = Field(0, ge=0, le=65535)
    # TLS for both sides (PEM files: the certificate chain and its private key; both or
    # neither) and bearer tokens (a file, one token per line) every request but the health
    # checks must carry (app/http_auth.py; docs/serving.md "Security")
    http_tls_cert: str | None = Field(None, min_length=1)
    http_tls_key: str | None = Field(None, min_length=1)
    http_token_file: str | None = Field(None, min_length=1)
    # mutual TLS: PEM certificates of the CAs whose client certificates are admitted; every
    # client must then present one (REST and gRPC; it stands in for tokens off loopback)
    http_tls_client_ca: str | None = Field(None, min_length=1)
    # the largest request body (REST) or message (gRPC) it reads, in MiB: a larger one is
    # refused (413 / RESOURCE_EXHAUSTED) before it is held in memory
    http_max_body_mb: float = Field(64.0, gt=0.0, le=2047.0)
    # slow and many REST clients (app/http_conn.py): a request must arrive whole within
    # http_read_timeout seconds of the connection waiting for it; connections beyond
    # http_max_connections are closed as they open
    http_read_timeout: float = Field(30.0, gt=0.0, le=3600.0)
    http_max_connections: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServeConfig:
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ValueError("serve.http_tls_cert and serve.http_tls_key go together: "
                             "set both (TLS) or neither")  # fmt: skip
        if self.http_tls_client_ca is not None and self.http_tls_cert is None:
            raise ValueError(
                "serve.http_tls_client_ca needs serve.http_tls_cert and "
                "serve.http_tls_key (client certificates are asked over TLS)"
            )
        return self


class MetricsConfig(_Section):
    bind: str = "127.0.0.1"
    broker_port: int = Field(9100, ge=0, le=65535)  # 0 disables a service's endpoint
    reducer_port: int = Field(9101, ge=0, le=65535)
    expert_base_port: int = Field(9110, ge=0, le=65535)  # expert i listens on base + i
    # Seconds a service whose run is done keeps its endpoint up for one last scrape of
    # traci_run_finished 1 (observe.RunEnd): a static Prometheus target (compose) then reads
    # "finished", not "down". 0: exit at once (traci up; Kubernetes drops finished pods).
    final_scrape: float = Field(0.0, ge=0.0, le=600.0)


class LauncherConfig(_Section):
    """How ``traci up`` supervises its children (like a container restart policy)."""

    restart: Literal["on-failure", "never"] = "on-failure"
    max_restarts: int = Field(5, ge=0)  # per service, over the whole run
    restart_delay: float = Field(1.0, ge=0.0)  # seconds; doubles while a service keeps failing


class SecurityConfig(_Section):
    """CurveZMQ between the broker and its peers (docs/security.md)."""

    curve_dir: str | None = Field(None, min_length=1)  # from `traci keys generate DIR`
    insecure: bool = False  # broker: allow a non-loopback bind without CURVE
    # The largest |value| any service accepts in a tensor from a peer (embeddings, gradients,
    # served rows and outputs); larger finite values are refused ``too_large`` like NaN/Inf.
    max_abs_value: float = Field(DEFAULT_MAX_ABS, gt=0.0, allow_inf_nan=False)


class TrackingConfig(_Section):
    """Opt-in experiment tracking of the reducer's records (docs/tracking.md): TensorBoard
    event files in ``RUN_DIR/tensorboard``, an MLflow run (by default in a SQLite store at
    ``RUN_DIR/mlflow/mlflow.db``). Needs ``pip install 'traci-ml[tracking]'``."""

    tensorboard: bool = False
    mlflow: bool = False
    # any tracking URI MLflow takes (sqlite:///path.db, http://host:5000, databricks ...);
    # None: sqlite:///RUN_DIR/mlflow/mlflow.db
    mlflow_uri: str | None = Field(None, min_length=1)
    experiment: str | None = Field(None, min_length=1, max_length=256)  # None: run_id

    @field_validator("mlflow_uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is not None and (v != v.strip() or any(c.isspace() for c in v)):
            raise ValueError(f"{v!r} holds white space; give a tracking URI such as "
                             "'sqlite:///mlflow.db' or 'http://host:5000'")  # fmt: skip
        return v


# The linear path's width (docs/config.md "Linear path"): a regression run's experts give it
# one coordinate, summed; a classification run's give it up to LINEAR_WIDTH each, which the
# reducer maps to the classes' logits (rank LINEAR_WIDTH per expert: a full multinomial
# logistic model up to LINEAR_WIDTH + 1 classes).
LINEAR_WIDTH = 8


class Config(_Section):
    run_id: str = Field("traci", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    seed: int = 0
    run_dir: str = "runs/{run_id}"
    embed_dim: int = Field(64, ge=1)  # one token's width; the reducer's d_model
    data: DataConfig = DataConfig()
    expert: ExpertConfig = ExpertConfig()
    reducer: ReducerConfig = ReducerConfig()
    train: TrainConfig = TrainConfig()
    network: NetworkConfig = NetworkConfig()
    join: JoinConfig = JoinConfig()
    serve: ServeConfig = ServeConfig()
    metrics: MetricsConfig = MetricsConfig()
    security: SecurityConfig = SecurityConfig()
    launcher: LauncherConfig = LauncherConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _heads_divide(self) -> Config:
        if self.embed_dim % self.reducer.heads:
            raise ValueError(
                f"reducer.heads ({self.reducer.heads}) must divide embed_dim ({self.embed_dim})"
            )
        return self

    @model_validator(mode="after")
    def _serve_ports(self) -> Config:
        s = self.serve
        if s.grpc_port and s.grpc_port == s.http_port:
            raise ValueError(f"serve.grpc_port {s.grpc_port} is serve.http_port too: the REST "
                             "and gRPC sides need a port each")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _selection(self) -> Config:
        train, task = self.train, self.task
        if train.patience and not self.data.val_fraction:
            raise ValueError(f"train.patience ({train.patience}): early stopping needs a "
                             "validation split (data.val_fraction > 0)")  # fmt: skip
        if self.linear_path and self.embed_dim < 2:
            raise ValueError("embed_dim: the linear path (reducer.linear_path) takes an "
                             "embedding's last coordinates; it needs embed_dim >= 2")  # fmt: skip
        fits = {"accuracy": "classification", "rmse": "regression", "r2": "regression"}
        if fits.get(train.monitor, task) != task:
            raise ValueError(f"train.monitor {train.monitor!r} is a {fits[train.monitor]} "
                             f"metric; this run's task is {task}")  # fmt: skip
        return self

    @property
    def task(self) -> str:
        """The run's task: ``data.task`` for csv and parties runs; digits and synthetic
        tables are classification."""
        return self.data.task if self.data.source in ("csv", "parties") else "classification"

    @property
    def linear_path(self) -> bool:
        """Whether the nets carry the linear path (``reducer.linear_path``; "auto":
        regression; classification takes it when asked, docs/config.md "Linear path")."""
        value = self.reducer.linear_path
        return self.task == "regression" if value == "auto" else bool(value)

    @property
    def linear_width(self) -> int:
        """The embedding coordinates each expert gives the linear path (0: none; regression
        1; classification ``LINEAR_WIDTH``, at most ``embed_dim // 2``)."""
        if not self.linear_path:
            return 0
        return 1 if self.task == "regression" else max(1, min(LINEAR_WIDTH, self.embed_dim // 2))

    def expert_model(self, expert_id: int) -> ExpertModelConfig:
        """Expert ``expert_id``'s network: its view's own ``model``, else ``expert.model``."""
        views = self.data.views
        if not isinstance(views, str) and 0 <= expert_id < len(views):
            return views[expert_id].model or self.expert.model
        return self.expert.model

    def expert_model_key(self, expert_id: int) -> str:
        """Where ``expert_model(expert_id)`` comes from, for error messages."""
        views = self.data.views
        if not isinstance(views, str) and 0 <= expert_id < len(views) and views[expert_id].model:
            return f"data.views[{expert_id}].model"
        return "expert.model"

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir.format(run_id=self.run_id))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the config from a YAML file, the environment and ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    environ = os.environ if env is None else env
    for name, value in sorted(environ.items()):
        key = env_key(name)
        if key is not None:
            _set(raw, key, _scalar(value), source=f"environment variable {name}")
    for key, value in (overrides or {}).items():
        _set(raw, key, _scalar(value), source=f"--set {key}")
    return validate(raw)


def env_key(name: str) -> str | None:
    """The config key an environment variable sets, or None if it is not a config variable.

    ``TRACI_<SECTION>__<KEY>`` (any name with ``__``) must name a real key: a typo is an
    error, raised by ``load_config``. Without ``__`` only the top-level keys count
    (``TRACI_RUN_ID``, ``TRACI_SEED``, ...); other ``TRACI_*`` names, such as the compose
    files' ``TRACI_IMAGE``, belong to other tools and are left alone.
    """
    if not name.startswith(ENV_PREFIX) or len(name) == len(ENV_PREFIX):
        return None
    rest = name[len(ENV_PREFIX) :].lower()
    if "__" in rest:
        return rest.replace("__", ".")
    return rest if rest in Config.model_fields else None


def validate(raw: Mapping[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def parse_set(items: list[str]) -> dict[str, str]:
    """``["a.b=1", ...]`` -> ``{"a.b": "1"}``; a malformed item names itself."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not KEY=VALUE")
        out[key.strip()] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set(raw: dict[str, Any], dotted: str, value: Any, *, source: str) -> None:
    keys = dotted.split(".")
    node: Any = raw
    fields = Config.model_fields
    for depth, key in enumerate(keys):
        if fields is None or key not in fields:
            raise ConfigError(f"{source}: unknown config key {'.'.join(keys[: depth + 1])!r}")
        annotation = fields[key].annotation
        sub = getattr(annotation, "model_fields", None) if isinstance(annotation, type) else None
        if depth == len(keys) - 1:
            node[key] = value
            return
        if sub is None:
            raise ConfigError(f"{source}: {'.'.join(keys[: depth + 1])!r} has no sub-keys")
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {'.'.join(keys[: depth + 1])!r} is not a mapping")
        fields = sub


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}")
    return "invalid config: " + "; ".join(lines)
