"""``attention_by_class.png``: the reducer's attention per expert for each class, a heat map.

The rows are the run's **test split** (the held-out rows the final evaluation scores), with
the attention the reducer itself computed when it scored them: ``eval_predictions.csv``'s
``attn_*`` columns (which attention it is: ``core/models/attention.py``). Nothing is
re-run, so the map needs neither checkpoints nor data (a ``parties`` run plotted where no
party's file is). A run written before the reducer kept those columns is predicted again in
this process with ``traci predict --split test --attention`` (the same checkpoints).
Each cell is the mean attention weight the [CLS] query gives that expert over the rows of
one **true** class (classification: the label, not the prediction, so a class the model
confuses still shows where it looked); for regression the rows are grouped into ``BINS``
quantile bins of the true label (one per value for a label of few values). An expert masked
for a row counts with its weight there, 0; [CLS]'s weight on itself is the rest of each
row's 1 and is not drawn.

That fallback needs the run's checkpoints and data (as ``traci predict --split`` does):
``class_attention`` raises ``TraciError`` when they are not there, and ``traci plot`` then
skips the heat map.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BINS = 5  # regression: quantile bins of the true label
NAME = "attention_by_class.png"


@dataclass
class ClassAttention:
    """What the heat map draws: ``mean[k, i]`` = mean attention on expert ``i`` over the
    ``counts[k]`` test rows of group ``groups[k]``."""

    groups: list[str]  # class names (in class order) or label bins, e.g. "[1.2, 3.4)"
    experts: list[str]  # expert (view) names, in id order
    mean: np.ndarray  # (groups, experts)
    counts: list[int]  # rows per group
    task: str


def class_attention(
    run_dir: str | Path, split: str = "test", *, predict: bool = True
) -> ClassAttention:
    """Mean attention per expert for each true class (or label bin) of ``split``: for the
    test split, read from the reducer's ``eval_predictions.csv`` when it holds the
    attention; else predicted again (``traci predict --split SPLIT --attention``), unless
    not ``predict`` (then ``TraciError``: nothing reads the data)."""
    from traci_ml.core.errors import TraciError

    if split == "test":
        found = from_eval_predictions(Path(run_dir) / "eval_predictions.csv")
        if found is not None:
            return found
    if not predict:
        raise TraciError(f"no attention columns in {Path(run_dir) / 'eval_predictions.csv'} "
                         f"(an older run): `traci plot {run_dir}` predicts them where the data "
                         "is")  # fmt: skip
    from traci_ml.app.attention import recording, with_attention
    from traci_ml.app.predict import load_id_predictor
    from traci_ml.core.data import view_specs
    from traci_ml.core.models.attention import column_names

    by_id = load_id_predictor(run_dir)
    with recording(by_id.model.reducer) as seen:
        cols, _ = by_id.predict_split(split)
    cols = with_attention(cols, seen, by_id.config)
    experts = [v.name for v in view_specs(by_id.config.data)]
    att = np.array([cols[c] for c in column_names(experts)[1:]], dtype=np.float64).T
    att = att.reshape(len(cols["row"]), len(experts))
    if by_id.task == "classification":
        groups = list(by_id.classes)
        member = np.array([groups.index(str(lab)) for lab in cols["label"]], dtype=np.intp)
    else:
        groups, member = _bins(np.asarray(cols["label"], dtype=np.float64))
    return _grouped(groups, experts, att, member, by_id.task)


def from_eval_predictions(path: Path) -> ClassAttention | None:
    """The heat map's numbers from the reducer's final scoring (``eval_predictions.csv``:
    ``prob_<class>`` columns name the classes in order, ``attn_cls`` then ``attn_<expert>``
    the attention); None when the file is missing or has no attention columns."""
    import csv

    if not path.is_file():
        return None
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        lines = list(reader)
    if "attn_cls" not in header:
        return None
    first = header.index("attn_cls") + 1
    experts = [h.removeprefix("attn_") for h in header[first:]]
    label = header.index("label")
    att = np.array([[float(v) for v in line[first:]] for line in lines], dtype=np.float64)
    att = att.reshape(len(lines), len(experts))
    classes = [h.removeprefix("prob_") for h in header if h.startswith("prob_")]
    if classes:
        index = {c: k for k, c in enumerate(classes)}
        groups, task = classes, "classification"
        member = np.array([index[line[label]] for line in lines], dtype=np.intp)
    else:
        groups, member = _bins(np.array([float(line[label]) for line in lines], np.float64))
        task = "regression"
    return _grouped(groups, experts, att, member, task)


def _grouped(groups: list[str], experts: list[str], att: np.ndarray, member: np.ndarray,
             task: str) -> ClassAttention:  # fmt: skip
    """The mean of ``att``'s rows per group (``member``: each row's group)."""
    mean = np.full((len(groups), len(experts)), np.nan)
    counts = []
    for k in range(len(groups)):
        rows = att[member == k]
        counts.append(len(rows))
        if len(rows):
            mean[k] = rows.mean(axis=0)
    return ClassAttention(groups, experts, mean, counts, task)


def _bins(y: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Up to ``BINS`` quantile bins of ``y``, their names and each value's bin; a label of
    at most ``BINS`` distinct values (a rating) gets one bin per value."""
    values = np.unique(y)
    if len(values) <= BINS:
        return [f"{v:.3g}" for v in values], np.searchsorted(values, y).astype(np.intp)
    edges = np.unique(np.quantile(y, np.linspace(0, 1, BINS + 1)))
    last = len(edges) - 2
    member = np.clip(np.searchsorted(edges, y, side="right") - 1, 0, last)
    names = [f"[{edges[k]:.3g}, {edges[k + 1]:.3g}{']' if k == last else ')'}"
             for k in range(last + 1)]  # fmt: skip
    return names, member


def draw(ca: ClassAttention, title: str) -> Any:
    """The heat map: one row per class (or bin), one column per expert, the mean written in
    each cell; the figure (matplotlib's Agg canvas, as ``plot.py``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = ca.mean.shape
    fig = Figure(figsize=(max(6.0, 1.2 * n_cols + 3), max(4.0, 0.45 * n_rows + 2)), dpi=120,
                 layout="constrained")  # fmt: skip
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(ca.mean), aspect="auto", cmap="viridis", vmin=0)
    fig.colorbar(image, ax=ax, label="mean [CLS] attention weight")
    ax.set_xticks(range(n_cols), ca.experts, rotation=30 if n_cols > 4 else 0, ha="right"
                  if n_cols > 4 else "center")  # fmt: skip
    ticks = [f"{g} (n={c})" for g, c in zip(ca.groups, ca.counts, strict=True)]
    ax.set_yticks(range(n_rows), ticks)
    if n_rows * n_cols <= 400:
        top = np.nanmax(ca.mean) if np.isfinite(ca.mean).any() else 1.0
        for (k, i), v in np.ndenumerate(ca.mean):
            if np.isfinite(v):
                color = "black" if v > 0.6 * top else "white"
                ax.text(i, k, f"{v:.2f}", ha="center", va="center", fontsize=8, color=color)
    what = "true class" if ca.task == "classification" else "true label (quantile bins)"
    ax.set_ylabel(what)
    ax.set_xlabel("expert")
    ax.set_title(title)
    return fig
