"""Offline prediction: a trained run in one process, with no broker and no sockets.

``load_model(run_dir)`` assembles every expert's **target** network (the smoothed net whose
embeddings the cluster sent) and the reducer from the run's checkpoints into one
``nn.Module`` taking the experts' preprocessed views. ``load_predictor(run_dir)`` wraps it with
the run's preprocessing (column -> view assignment, standardisation) so that it takes raw
feature rows in the training column order; ``predict_frame`` and ``traci predict`` use it, and
``traci export`` writes it to one file (``traci_ml/app/export.py``).

``load_id_predictor(run_dir)`` / ``predict_ids(run_dir, ids)`` predict rows **by id**: for a
parties run (``data.source: parties``) every expert reads its own file, standardises it with
its checkpoint's statistics and embeds the rows it holds (zeros and a masked token for the rows
it lacks), as the cluster does; for a one-table run the id is the row's number in the table.
``traci predict --split`` and ``--ids`` use it. See docs/predict.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from traci_ml.app.checkpoints import choose
from traci_ml.core import checkpoint, fits
from traci_ml.core.align import IdIndex
from traci_ml.core.config import Config
from traci_ml.core.data import (  # noqa: F401 (the preprocessing, as predict's API had it)
    PARTIES_NO_TABLE,
    Preprocess,
    checked_table,
    derive_preprocess,
    fmt_cell,
    label_values,
    load_expert_data,
    load_labels,
    load_preprocess,
    read_csv_table,
    split_index,
    split_rows,
    standardise,
    write_preprocess,
)
from traci_ml.core.errors import CheckpointError, DataError
from traci_ml.core.ids import as_ids, id_kind, read_ids  # noqa: F401 (predict API)
from traci_ml.core.models.expert import build_expert_net
from traci_ml.core.models.reducer import Reducer
from traci_ml.core.rundir import RunDir
from traci_ml.core.tensors import wire_round

log = logging.getLogger(__name__)
PREPROCESS_FILE = RunDir.PREPROCESS  # written by the reducer when a run starts
BATCH_ROWS = 4096  # rows through the model at a time


# -- the model ----------------------------------------------------------------------------


class TraciModel(nn.Module):
    """``(view_0, ..., view_{N-1}) -> logits``: every expert's target net and the reducer, as
    the cluster evaluates with all experts present. Views are (B, F_i) standardised features."""

    def __init__(self, experts: list[nn.Module], reducer: Reducer, wire_dtype: str) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.reducer = reducer
        # Embeddings cross the wire in expert.dtype: round them the same way (int8: per row).
        self.wire = None if wire_dtype == "float32" else wire_dtype

    def forward(self, *views: torch.Tensor) -> torch.Tensor:
        tokens = torch.stack(
            [net(v) for net, v in zip(self.experts, views, strict=True)], dim=1
        )  # (B,N,d)
        if self.wire is not None:
            tokens = wire_round(tokens, self.wire)
        absent = torch.zeros_like(tokens[:, :, 0], dtype=torch.bool)  # (B, N): all present
        logits, _ = self.reducer(tokens, absent)
        return logits


class Predictor(nn.Module):
    """``features (B, F)`` raw, columns in ``preprocess.columns`` order -> ``(logits,
    probabilities (B, C))`` for classification, ``(logits (B, 1), prediction (B,))`` in the
    label's units for regression. Standardisation and the view split are built in."""

    def __init__(self, model: TraciModel, preprocess: Preprocess, config: Config) -> None:
        super().__init__()
        self.model, self.preprocess, self.config = model, preprocess, config
        self.classification = preprocess.task == "classification"
        self.y_mean, self.y_std = preprocess.y_mean, preprocess.y_std
        self.register_buffer("mean", torch.from_numpy(preprocess.mean.copy()))
        self.register_buffer("std", torch.from_numpy(preprocess.std.copy()))
        for i in range(len(preprocess.views)):
            self.register_buffer(f"view_{i}", torch.tensor(preprocess.view_index(i)))
        self.n_views = len(preprocess.views)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (features - self.mean) / self.std
        views = [x.index_select(1, getattr(self, f"view_{i}")) for i in range(self.n_views)]
        logits = self.model(*views)
        if self.classification:
            return logits, logits.softmax(dim=-1)
        return logits, logits[:, 0] * self.y_std + self.y_mean


def load_predictor(
    run_dir: str | Path, *, device: str = "cpu", checkpoint: str | None = None
) -> Predictor:
    """The run's full model taking raw feature rows; see ``Predictor``. ``checkpoint``:
    "best" (the best validation round's), "last", or None: the best where the run has it
    (``app/checkpoints.py``)."""
    run_path = Path(run_dir)
    config = RunDir(run_path).config()
    if config.data.source == "parties":
        raise DataError(f"{run_path}: {PARTIES_NO_TABLE}")
    prep = load_preprocess(run_path, config)
    in_dims = [len(cols) for _, cols in prep.views]
    model, _ = _assemble(run_path, config, in_dims, prep.out_dim, checkpoint)
    return Predictor(model, prep, config).to(device).eval()


def load_model(
    run_dir: str | Path, *, device: str = "cpu", checkpoint: str | None = None
) -> TraciModel:
    """``(views...) -> logits`` from the run's checkpoints; see ``TraciModel``."""
    return load_predictor(run_dir, device=device, checkpoint=checkpoint).model


def _assemble(
    run_path: Path, config: Config, in_dims: list[int], out_dim: int, which: str | None = None
) -> tuple[TraciModel, list[dict[str, Any]]]:
    """The model from the checkpoints ``which`` chooses (``app/checkpoints.py``), and each
    expert's last checkpoint (its other contents: a party's standardisation)."""
    run = RunDir(run_path)
    ckpt, names = run.checkpoints, run.model_checkpoints(len(in_dims))
    missing = run.missing_checkpoints(len(in_dims))
    if len(missing) == len(names):
        raise CheckpointError(f"{run_path} has no checkpoints: train it first (traci up)")
    if missing:
        raise CheckpointError(f"{ckpt} lacks {', '.join(missing)}")
    chosen = choose(run, len(in_dims), config.run_id, which, selects=config.data.val_fraction > 0)
    experts, seqs, states = [], [], []
    fix, against = f"its {RunDir.CONFIG} no longer matches its checkpoints", "the run's config"
    with torch.random.fork_rng(devices=[]):  # building nets draws initial weights
        for i, in_dim in enumerate(in_dims):
            path = chosen.experts[i]
            state = checkpoint.load(path, run_id=config.run_id, expert_id=i)
            net = build_expert_net(
                config.expert_model(i),
                in_dim=in_dim,
                out_dim=config.embed_dim,
                key=config.expert_model_key(i),
                linear=config.linear_width,
            )
            fits.expert_weights(config, i, state, path, {"target": net}, fix=fix, against=against)
            experts.append(net.eval().requires_grad_(False))
            seqs.append(state.get("seq_next"))
            last = run.expert_checkpoint(i)
            states.append(state if path == last else checkpoint.load(last, run_id=config.run_id))
        reducer = Reducer(n_experts=len(in_dims), d=config.embed_dim, out_dim=out_dim,
                          cfg=config.reducer, linear=config.linear_width)  # fmt: skip
    path = chosen.reducer
    state = checkpoint.load(path, run_id=config.run_id)
    fits.reducer_weights(config, state, path, reducer, fix=fix, against=against)
    if chosen.which == "last" and any(s != state.get("last_seq", -1) + 1 for s in seqs):
        log.warning(
            "checkpoints are from different points of the run (experts at seq %s, reducer "
            "after seq %s): was it interrupted?",
            seqs,
            state.get("last_seq"),
        )
    model = TraciModel(experts, reducer.eval().requires_grad_(False), config.expert.dtype)
    return model, states


# -- prediction -----------------------------------------------------------------------------


def features_from(
    frame: Mapping[str, Any],
    columns: tuple[str, ...],
    *,
    where: str = "input",
    lines: list[int] | None = None,
) -> np.ndarray:
    """(n, F) float32 from a mapping column -> values (a dict of lists, a pandas DataFrame);
    extra columns are ignored. Errors name the missing columns, or the row and column."""
    missing = [c for c in columns if c not in list(frame.keys())]
    if missing:
        raise DataError(f"{where} lacks {len(missing)} feature column(s): {', '.join(missing)}")
    n = len(frame[columns[0]]) if columns else 0
    x = np.empty((n, len(columns)), dtype=np.float32)
    for j, name in enumerate(columns):
        values = list(frame[name])
        if len(values) != n:
            raise DataError(f"{where}: column {name!r} has {len(values)} values, not {n}")
        try:  # fast path; via float64 as float() does, so the rounding matches training's
            x[:, j] = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            pass
        else:
            if np.isfinite(x[:, j]).all():
                continue
        for r, v in enumerate(values):  # find the culprit
            at = f"line {lines[r]} (row {r})" if lines else f"row {r}"
            x[r, j] = _number(v, f"{where} {at}", name)
    return x


def _number(value: Any, where: str, column: str) -> float:
    try:
        v = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: column {column!r} value {value!r} is not a number") from None
    if not math.isfinite(v):
        raise DataError(f"{where}: column {column!r} value {value!r} is not finite")
    return v


@torch.no_grad()
def predict_array(predictor: Predictor, x: np.ndarray, batch: int = BATCH_ROWS) -> dict[str, Any]:
    """Raw rows (n, F) -> output columns: ``prediction`` and ``prob_<class>`` per class."""
    prep, dev = predictor.preprocess, predictor.mean.device
    out = np.zeros((0, prep.out_dim), np.float32)
    parts = [
        predictor(torch.from_numpy(x[i : i + batch]).to(dev))[1] for i in range(0, len(x), batch)
    ]
    out = torch.cat(parts).cpu().numpy() if parts else out
    if prep.task != "classification":
        return {"prediction": out.reshape(-1)}
    cols: dict[str, Any] = {"prediction": [prep.classes[k] for k in out.argmax(axis=1)]}
    cols.update({f"prob_{name}": out[:, k] for k, name in enumerate(prep.classes)})
    return cols


def predict_frame(model: Predictor | str | Path, frame: Mapping[str, Any]) -> dict[str, Any]:
    """Predict every row of ``frame`` (column name -> values; extra columns are ignored)."""
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    return predict_array(predictor, features_from(frame, predictor.preprocess.columns))


def read_csv(path: Path, columns: tuple[str, ...]) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Feature rows (n, F) from a CSV file with a header (the one table reader), and every
    column as text."""
    table = read_csv_table(path)
    if not table.header:
        raise DataError(f"{path} is empty: it needs a header row with the feature columns")
    table.require(columns)
    table.check_unique(columns)
    x = table.numbers(columns, row_numbers=True)
    return x, {h: [row[k] for row in table.records] for k, h in enumerate(table.header)}


# -- prediction by id: parties runs, and one-table runs by row number ------------------------


@dataclass
class IdPredictor:
    """A run's experts and reducer over the rows each expert holds, looked up by id: for each
    id every expert embeds its own row of it (a row it lacks: masked), then the reducer reads
    the tokens with that per-row mask, as the cluster does (``predict``). Build it with
    ``load_id_predictor``."""

    config: Config
    model: TraciModel  # the experts' target nets and the reducer
    tables: list[np.ndarray]  # per expert: (n_i, F_i) float32, standardised as in training
    indexes: list[IdIndex]  # per expert: id -> row of its table
    kind: str  # the run's id type: "int" or "str"
    ids_of: str  # where the run's ids come from, for messages
    task: str
    classes: tuple[str, ...]
    y_mean: float
    y_std: float
    labels: IdIndex  # the label holder's ids ...
    label_of: list[Any]  # ... and their labels, as eval_predictions.csv writes them
    splits: dict[str, np.ndarray]  # "train"/"test" -> the split's ids in order
    device: torch.device

    @property
    def n_experts(self) -> int:
        return len(self.tables)

    def check_kind(self, ids: np.ndarray, where: str = "ids") -> None:
        kind = id_kind(ids)
        if kind != self.kind and len(ids):
            raise DataError(f"{where} are {kind} ids ({ids[0].item()!r}, ...), but the run's "
                            f"ids are {self.kind} ({self.ids_of}): ids of one type never match "
                            "the other's")  # fmt: skip

    @torch.no_grad()
    def outputs(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(outputs, absent) for ``ids``: class probabilities (n, C) or predictions (n,) in
        the label's units, and (n, N) bool, True where expert i holds no row of the id."""
        out_dim = len(self.classes) if self.task == "classification" else 1
        outs = [np.zeros((0, out_dim) if out_dim > 1 else (0,), np.float32)]
        absent = np.ones((len(ids), self.n_experts), dtype=bool)
        d, dev = self.config.embed_dim, self.device
        for start in range(0, len(ids), BATCH_ROWS):
            chunk = ids[start : start + BATCH_ROWS]
            tokens = torch.zeros((len(chunk), self.n_experts, d), device=dev)
            for i, (net, table, index) in enumerate(
                zip(self.model.experts, self.tables, self.indexes, strict=True)
            ):
                local = index.find(chunk)
                held = local >= 0
                absent[start : start + len(chunk), i] = ~held
                if held.any():  # as the expert's _embed: the net sees the rows it holds only
                    x = torch.from_numpy(table[local[held]]).to(dev)
                    tokens[torch.from_numpy(held).to(dev), i] = net(x).float()
            if self.model.wire is not None:  # the wire's rounding, as TraciModel
                tokens = tokens.to(self.model.wire).float()
            mask = torch.from_numpy(absent[start : start + len(chunk)]).to(dev)
            logits, _ = self.model.reducer(tokens, mask)
            if self.task == "classification":
                outs.append(logits.softmax(dim=-1).cpu().numpy())
            else:
                outs.append((logits[:, 0] * self.y_std + self.y_mean).cpu().numpy())
        return np.concatenate(outs), absent

    def predict(self, ids: Sequence[int] | Sequence[str] | np.ndarray) -> dict[str, list]:
        """The output columns for ``ids`` (one line each, in order; an id no expert holds
        gets the [CLS]-only output with every expert in ``absent``): ``row`` (0-based),
        ``id``, ``label`` (None where the label holder has none), ``prediction``,
        ``prob_<class>`` (classification) and ``absent``."""
        ids = as_ids(ids)
        self.check_kind(ids)
        at = self.labels.find(ids)
        labels = [self.label_of[k] if k >= 0 else None for k in at.tolist()]
        return self._columns(ids, np.arange(len(ids)), labels, *self.outputs(ids))

    def predict_split(self, split: str) -> tuple[dict[str, list], int]:
        """The run's own ``split`` (``row``: the row of the split), less the rows no expert
        holds, which the cluster's evaluation leaves out too; and how many those were."""
        ids = self.splits[split]
        out, absent = self.outputs(ids)
        keep = np.flatnonzero(~absent.all(axis=1))
        at = self.labels.find(ids[keep])
        labels = [self.label_of[k] for k in at.tolist()]
        cols = self._columns(ids[keep], keep, labels, out[keep], absent[keep])
        return cols, len(ids) - len(keep)

    def _columns(
        self,
        ids: np.ndarray,
        rows: np.ndarray,
        labels: list[Any],
        out: np.ndarray,
        absent: np.ndarray,
    ) -> dict[str, list]:
        cols: dict[str, list] = {"row": rows.tolist(), "id": ids.tolist(), "label": labels}
        if self.task == "classification":
            cols["prediction"] = [self.classes[k] for k in out.argmax(axis=1).tolist()]
            cols.update({f"prob_{c}": out[:, k].tolist() for k, c in enumerate(self.classes)})
        else:
            cols["prediction"] = out.tolist()
        cols["absent"] = [" ".join(str(i) for i in np.flatnonzero(a)) for a in absent]
        return cols


def load_id_predictor(
    run_dir: str | Path, *, device: str | torch.device = "cpu", checkpoint: str | None = None
) -> IdPredictor:
    """The run's model over its experts' own rows, by id (see ``IdPredictor``). A parties
    run reads every party's file and the label file (everything on one machine); a one-table
    run reads its table (a csv must be the file it trained on)."""
    from traci_ml.core.tensors import resolve_device

    run_path = Path(run_dir)
    run = RunDir(run_path)
    config = run.config()
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if config.data.source != "parties":
        return _one_table_ids(run_path, config, dev, checkpoint)
    ds = load_labels(config)
    assert ds.ids_train is not None and ds.ids_test is not None  # load_labels sets them
    parties = [load_expert_data(config, i) for i in range(ds.n_experts)]
    in_dims = [p.table.shape[1] for p in parties]
    model, states = _assemble(run_path, config, in_dims, ds.out_dim, checkpoint)
    labels = config.data.labels
    assert labels is not None  # a parties config has them
    ids_of = f"{labels.path}, id column {labels.id or config.data.id!r}"
    kind = id_kind(ds.ids_train)
    for i, (party, state) in enumerate(zip(parties, states, strict=True)):
        if party.id_type != kind:
            raise DataError(f"{party.source}: {party.id_type} ids, but the label holder's are "
                            f"{kind} ({ids_of})")  # fmt: skip
        if state.get("mean") is None or state.get("std") is None:
            raise CheckpointError(f"{run.expert_checkpoint(i)} holds no "
                                  "standardisation (mean, std) of its party's table: was the "
                                  "expert ever aligned?")  # fmt: skip
        mean, std = state["mean"].numpy(), state["std"].numpy()
        if mean.shape != (party.table.shape[1],) or std.shape != mean.shape:
            raise CheckpointError(f"{run.expert_checkpoint(i).name}: mean/std of "
                                  f"{mean.shape[0]} columns, {party.source} has "
                                  f"{party.table.shape[1]}")  # fmt: skip
        party.standardise(mean, std)  # in place, as the expert restores its checkpoint
    all_ids = np.concatenate([ds.ids_train, ds.ids_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    label_of = (
        [ds.classes[int(k)] for k in y]
        if ds.task == "classification"
        else [float(t) * ds.y_std + ds.y_mean for t in y]  # standardised float32 already
    )
    return IdPredictor(
        config, model.to(dev).eval(), [p.table for p in parties],
        [IdIndex(p.ids) for p in parties], kind, ids_of, ds.task,
        ds.classes if ds.task == "classification" else (), ds.y_mean, ds.y_std,
        IdIndex(all_ids), label_of, {"train": ds.ids_train, "test": ds.ids_test}, dev,
    )  # fmt: skip


def _one_table_ids(
    run_path: Path, config: Config, dev: torch.device, which: str | None
) -> IdPredictor:
    """One table: every expert holds every row, its id the row's number in the table."""
    prep = load_preprocess(run_path, config)
    in_dims = [len(c) for _, c in prep.views]
    model, _ = _assemble(run_path, config, in_dims, prep.out_dim, which)
    x, y, columns, _ = checked_table(config, prep, "predicting by id")
    if tuple(columns) != prep.columns:
        raise DataError(f"the run's table has columns {list(columns)[:5]}..., not those it "
                        f"trained on ({PREPROCESS_FILE})")  # fmt: skip
    xs = standardise(x, prep.mean, prep.std)  # as the dataset's split
    ids = np.arange(len(x), dtype=np.int64)
    index = IdIndex(ids)
    train, test = split_index(len(x), config)
    return IdPredictor(
        config, model.to(dev).eval(),
        [np.ascontiguousarray(xs[:, prep.view_index(i)]) for i in range(len(prep.views))],
        [index] * len(prep.views), "int", "the row numbers of its one table", prep.task,
        prep.classes, prep.y_mean, prep.y_std, index, label_values(y, prep),
        {"train": train.astype(np.int64), "test": test.astype(np.int64)}, dev,
    )  # fmt: skip


def predict_ids(
    run: str | Path | IdPredictor,
    ids: Sequence[int] | Sequence[str] | np.ndarray,
    *,
    device: str = "cpu",
) -> dict[str, list]:
    """Predict the rows with these ids: the columns of ``traci predict --ids`` (``row``,
    ``id``, ``label``, ``prediction``, ``prob_<class>``..., ``absent``) as lists. ``run``: a
    run directory, or an ``IdPredictor`` from ``load_id_predictor`` (loaded once)."""
    predictor = run if isinstance(run, IdPredictor) else load_id_predictor(run, device=device)
    return predictor.predict(ids)
