"""``traci plot RUN_DIR``: a run's curves as PNGs in ``RUN_DIR/plots/``.

Reads ``metrics.jsonl`` (required), ``summary.json`` (optional: an interrupted run has none)
and ``broker.jsonl`` (optional: written by ``traci up`` when the broker serves metrics), and
writes ``loss.png``, ``throughput.png``, ``attention.png``, ``queue_latency.png`` (against
training time from the first step) and ``attention_by_class.png`` (``plot_attention.py``:
needs the run's checkpoints and data); ``traci up`` calls :func:`plot_run` after a run that
finished.
Data preparation is in pure functions (``continued``, ``histogram_quantile``, ``bucket_deltas``,
and in ``plot_latency.py`` ``latency_series``, ``first_step_time``); drawing uses matplotlib's
Agg canvas (no pyplot, no global backend state).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traci_ml.app.plot_latency import first_step_time, latency_series
from traci_ml.core.errors import TraciError
from traci_ml.core.files import replacing
from traci_ml.core.rundir import RunDir

log = logging.getLogger(__name__)
DPI = 120
NAMES = ("loss.png", "throughput.png", "attention.png", "queue_latency.png",
         "attention_by_class.png")  # fmt: skip
_EVAL_MARK = {"marker": "o", "ls": "", "ms": 7, "mec": "black", "mew": 0.6}
Buckets = Sequence[tuple[float, float]]  # (upper bound ``le``, cumulative count), +Inf last


# -- histogram arithmetic (also used by ``traci up`` when it samples the broker) -------------


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q``-quantile of a cumulative histogram, as Prometheus' ``histogram_quantile``.

    Linear interpolation inside the bucket that holds rank ``q * total`` (the first bucket
    starts at 0); a rank in the +Inf bucket answers the highest finite bound. ``None`` where
    Prometheus answers NaN: no observations, fewer than two buckets, or no +Inf bucket.
    """
    ordered = sorted((float(le), float(c)) for le, c in buckets)
    if len(ordered) < 2 or not math.isinf(ordered[-1][0]) or math.isnan(q):
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    counts, top = [], 0.0
    for _le, c in ordered:  # tolerate non-monotonic scrapes, as Prometheus does
        top = max(top, c)
        counts.append(top)
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    b = next((i for i in range(len(ordered) - 1) if counts[i] >= rank), len(ordered) - 1)
    if b == len(ordered) - 1:
        return ordered[-2][0]
    if b == 0 and ordered[0][0] <= 0:
        return ordered[0][0]
    start = 0.0 if b == 0 else ordered[b - 1][0]
    below = 0.0 if b == 0 else counts[b - 1]
    return start + (ordered[b][0] - start) * (rank - below) / (counts[b] - below)


def bucket_deltas(previous: Mapping[float, float] | None, current: Buckets) -> list:
    """Per-bucket increase since ``previous``: what one sampling interval observed.

    A count that went down means the broker restarted (its counters start again at 0), so
    the whole of ``current`` is the interval, as Prometheus' ``rate`` treats a counter reset.
    """
    if previous is None or any(c < previous.get(le, 0.0) for le, c in current):
        return [(le, c) for le, c in current]
    return [(le, c - previous.get(le, 0.0)) for le, c in current]


# -- reading a run ---------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every whole JSON object in ``path``, one per line. A torn line (a writer killed
    mid-line, or the next life of the service appending onto it) is skipped."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise TraciError(f"{path} does not exist: is this a run directory?") from None
    except OSError as exc:
        raise TraciError(f"{path} cannot be read: {exc.strerror}") from None
    records, torn = [], 0
    for line in filter(str.strip, text.splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
    if torn:
        log.info("%s: skipped %d torn line(s)", path, torn)
    return records


def continued(records: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """The records of the run as it continued, in step order, and the steps it resumed at.

    A reducer that crashed resumes from its last checkpoint and logs some steps again: a record
    whose step is not above the last kept one discards the kept records from that step on
    (the abandoned stretch) and marks a resume. Records without a numeric step are ignored.
    """
    kept: list[dict[str, Any]] = []
    resumed: list[int] = []
    for rec in records:
        step = rec.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            continue
        if kept and step <= kept[-1]["step"]:
            while kept and kept[-1]["step"] >= step:
                kept.pop()
            resumed.append(int(step))
        kept.append(dict(rec))
    return kept, resumed


def _num(value: Any) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok else math.nan


@dataclass
class Run:
    """What the plots need from a run directory."""

    path: Path
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    resumed: list[int]
    summary: dict[str, Any] = field(default_factory=dict)
    broker: list[dict[str, Any]] | None = None

    @property
    def metric(self) -> str:
        recs = self.train + self.evals
        return "accuracy" if any("accuracy" in r or "train_accuracy" in r for r in recs) else "rmse"

    @property
    def names(self) -> list[str]:
        n = max((len(r.get("attention") or []) for r in self.train + self.evals), default=0)
        names = [str(x) for x in self.summary.get("expert_names") or []]
        return names[:n] + [f"expert {i}" for i in range(len(names), n)]


def load_run(run_dir: Path) -> Run:
    run_files = RunDir(run_dir)
    run_dir, path = run_files.path, run_files.metrics
    records = read_jsonl(path)
    train, resumed = continued([r for r in records if r.get("kind") == "train"])
    evals, _ = continued([r for r in records if r.get("kind") == "eval"])
    if not train and not evals:
        raise TraciError(f"{path} holds no train or eval records: nothing to plot")
    summary: dict[str, Any] = {}
    summary_path = run_files.summary
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise TraciError(f"{summary_path} is not readable JSON: {exc}") from None
    else:
        log.info("%s is missing (run not finished?): plotting without it", summary_path)
    broker_path = run_files.broker_metrics
    broker = read_jsonl(broker_path) if broker_path.exists() else None
    return Run(run_dir, train, evals, resumed, summary, broker or None)


# -- entry points ----------------------------------------------------------------------------


def plot_run(run_dir: Path, *, read_data: bool = True) -> list[Path]:
    """Write the run's PNGs into ``RUN_DIR/plots/``; returns the paths written. Without a
    usable ``broker.jsonl`` there is no ``queue_latency.png`` (logged). The heat map of
    attention by class comes from ``eval_predictions.csv``; a run whose file lacks the
    attention is predicted again, which reads the data: ``read_data`` False (``traci up``
    of a parties run, which reads no party's file) skips the map instead.
    Raises TraciError naming the file when ``metrics.jsonl`` is missing, empty or
    ``summary.json`` is corrupt; OSError when ``plots/`` cannot be written."""
    run = load_run(Path(run_dir))
    out = RunDir(run.path).plots
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _save(_loss(run), out / "loss.png"),
        _save(_throughput(run), out / "throughput.png"),
        _save(_attention(run), out / "attention.png"),
    ]
    start = first_step_time(run.train)
    series = latency_series(run.broker or [], start)
    if series["t"]:
        fig = _queue_latency(run, series, since_first_step=start is not None)
        written.append(_save(fig, out / "queue_latency.png"))
    else:
        log.info("%s: no broker.jsonl samples, queue_latency.png not written", run.path)
    written.extend(_by_class(run, out, read_data))
    return written


def _by_class(run: Run, out: Path, read_data: bool) -> list[Path]:
    """``attention_by_class.png`` (``plot_attention.py``), or nothing and a warning saying
    why (no attention in ``eval_predictions.csv`` and no checkpoints or data to predict it:
    what ``traci predict --split test`` would refuse)."""
    from traci_ml.app import plot_attention

    try:
        ca = plot_attention.class_attention(run.path, predict=read_data)
    except Exception as exc:  # best effort, like every plot: say why, draw the others
        log.warning("%s not written: %s", plot_attention.NAME, exc)
        return []
    title = _title(run, "Reducer attention per expert by class, test split")
    return [_save(plot_attention.draw(ca, title), out / plot_attention.NAME)]


def describe(paths: Sequence[Path]) -> str:
    """One line naming where the PNGs are (and that queue latency was skipped, if it was)."""
    if not paths:
        return "no plots written"
    line = f"plots in {paths[0].parent}: {', '.join(p.name for p in paths)}"
    if not any(p.name == "queue_latency.png" for p in paths):
        line += " (no broker.jsonl: queue latency not plotted)"
    return line


def main(run_dir: str) -> int:
    """``traci plot RUN_DIR``: 0 and one line naming the PNGs, or 2 and the error."""
    try:
        paths = plot_run(Path(run_dir))
    except (TraciError, OSError) as exc:
        print(f"traci plot: error: {exc}", file=sys.stderr)
        return 2
    print(describe(paths))
    return 0


# -- drawing ---------------------------------------------------------------------------------


def _figure(rows: int, size: tuple[float, float], **grid: Any) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False, gridspec_kw=grid or None)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, list(axes)


def _save(fig: Any, path: Path) -> Path:
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _title(run: Run, what: str) -> str:
    return f"{what} (run {run.summary.get('run_id', run.path.name)})"


def _legend(ax: Any, **kw: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(framealpha=0.9, **kw)


def _log_if_wide(ax: Any, values: Sequence[float], ratio: float = 20.0) -> bool:
    pos = [v for v in values if math.isfinite(v) and v > 0]
    wide = bool(pos) and max(pos) / min(pos) > ratio
    if wide:  # plain numbers at 1, 2 and 5 times each power of ten, not 4x10^1
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _pos: f"{v:g}")
        ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    return wide


def _resumes(ax: Any, xs: Sequence[float]) -> None:
    for i, x in enumerate(xs):
        ax.axvline(x, color="gray", ls=":", lw=1.2, label=None if i else "reducer resumed")


def _col(records: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [_num(r.get(key)) for r in records]


def _loss(run: Run) -> Any:
    fig, (ax, bx) = _figure(2, (9, 6.5), height_ratios=[3, 2])
    steps, esteps = _col(run.train, "step"), _col(run.evals, "step")
    if run.train:
        ax.plot(steps, _col(run.train, "loss"), color="C0", alpha=0.3, lw=0.8,
                label="train loss (one batch)")  # fmt: skip
        ax.plot(steps, _col(run.train, "loss_avg"), color="C0", lw=2, label="train loss (EMA)")
    if run.evals:
        ax.plot(esteps, _col(run.evals, "loss"), "o-", color="C3", ms=5, label="eval loss")
    kind = "cross-entropy" if run.metric == "accuracy" else "MSE, standardised labels"
    wide = _log_if_wide(ax, _col(run.train, "loss_avg") + _col(run.evals, "loss"))
    ax.set_ylabel(f"loss ({kind}{', log scale' if wide else ''})")
    ax.set_title(_title(run, "Loss"))
    if run.metric == "accuracy":
        if run.train:
            bx.plot(steps, _col(run.train, "train_accuracy"), color="C0", lw=2,
                    label="train accuracy (EMA)")  # fmt: skip
        final = run.summary.get("test_accuracy")
        label = "eval accuracy" + (f" (final {final:.4f})" if _num(final) == final else "")
        bx.plot(esteps, _col(run.evals, "accuracy"), "o-", color="C3", ms=5, label=label)
        bx.set_ylabel("accuracy (fraction)")
    else:
        final = run.summary.get("test_rmse")
        label = "eval RMSE" + (f" (final {final:.4g})" if _num(final) == final else "")
        bx.plot(esteps, _col(run.evals, "rmse"), "o-", color="C3", ms=5, label=label)
        bx.set_ylabel("RMSE (label units)")
    for a in (ax, bx):
        _resumes(a, run.resumed)
    bx.set_xlabel("training step")
    _legend(ax, loc="best")
    _legend(bx, loc="best")
    return fig


def _throughput(run: Run) -> Any:
    fig, (ax,) = _figure(1, (9, 4.5))
    wall = _col(run.train, "wall_seconds")
    ax.plot(wall, _col(run.train, "samples_per_sec"), "o-", ms=3, color="C0",
            label="train samples/s (between log records)")  # fmt: skip
    avg = _num(run.summary.get("samples_per_sec"))
    if math.isfinite(avg):
        ax.axhline(avg, color="gray", ls="--", label=f"run average {avg:,.0f} samples/s")
    by_step = {r["step"]: _num(r.get("wall_seconds")) for r in run.train}
    _resumes(ax, [by_step[s] for s in run.resumed if s in by_step])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("wall time (s, reducer clock, summed over restarts)")
    ax.set_ylabel("samples/s")
    last = run.train[-1]["step"] if run.train else 0
    ax.set_title(_title(run, f"Training throughput, {last} steps"))
    _legend(ax, loc="best")
    return fig


def _attention(run: Run) -> Any:
    from matplotlib.lines import Line2D

    names = run.names
    n = len(names)
    fig, (ax,) = _figure(1, (10, 5))
    handles = []
    for i, name in enumerate(names):
        color = f"C{i % 10}"
        for recs, style in ((run.train, {"lw": 1.6}), (run.evals, _EVAL_MARK)):
            pts = [
                (r["step"], r["attention"][i]) for r in recs if len(r.get("attention") or []) > i
            ]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, **style)
        handles.append(Line2D([], [], color=color, lw=2.5, label=name))
    if n:
        ax.axhline(1 / n, color="gray", ls="--", lw=1.2)
        handles.append(Line2D([], [], color="gray", ls="--", label=f"uniform 1/{n} = {1 / n:.3f}"))
        styles = [
            Line2D([], [], color="black", lw=1.6, label="train (EMA)"),
            Line2D([], [], color="gray", **_EVAL_MARK, label="eval"),
        ]
        ncols = max(1, math.ceil(n / 20))
        fig.legend(handles=handles, title="expert", loc="outside right upper", ncols=ncols)
        fig.legend(handles=styles, loc="outside right lower")
    else:
        ax.text(0.5, 0.5, "no attention recorded", ha="center", transform=ax.transAxes)
    _resumes(ax, run.resumed)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean [CLS] attention weight")
    ax.set_title(_title(run, "Reducer attention per expert"))
    return fig


def _queue_latency(
    run: Run, series: Mapping[str, list[float]], since_first_step: bool = False
) -> Any:
    from matplotlib.ticker import MaxNLocator

    fig, (ax, bx) = _figure(2, (10, 5.5), height_ratios=[3, 1])
    t = series["t"]
    ax.plot(t, series["p99_ms"], color="C3", lw=1.6, label="p99 (bucket estimate)")
    ax.plot(t, series["p50_ms"], color="C0", lw=1.6, label="p50 (bucket estimate)")
    ax.plot(t, series["mean_ms"], color="black", lw=1, ls=":", label="mean (exact)")
    wide = _log_if_wide(ax, series["p50_ms"] + series["p99_ms"] + series["mean_ms"], 10)
    ax.set_ylabel(f"queue latency (ms{', log scale' if wide else ''})")
    ax.set_title(_title(run, "Broker queue latency, first EMB to dispatch, per sample interval"))
    _legend(ax, loc="best")
    bx.step(t, series["live"], where="post", color="C2", lw=1.6)
    bx.yaxis.set_major_locator(MaxNLocator(integer=True))
    top = max((v for v in series["live"] if math.isfinite(v)), default=1)
    bx.set_ylim(-0.3, top + 0.5)
    bx.set_ylabel("live experts")
    if since_first_step:  # start-up (registration, alignment) is not on the axis
        bx.set_xlim(left=0)
        bx.set_xlabel("training time since the first step (s)")
    else:
        bx.set_xlabel("time since first broker sample (s)")
    return fig
