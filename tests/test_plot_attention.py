"""Issue 14, item 6, the plots: queue latency against training time counted from the first
training step (start-up samples off the axis), and the attention heat map per class, on
runs written by the services' own code (tests/test_predict.py's ``make_run``). The data the
plots are drawn from is tested, not pixels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.test_plot import assert_png, write_run
from tests.test_predict import Built, make_run, write_csv
from traci_ml.app import plot, plot_attention
from traci_ml.app.cli import main
from traci_ml.app.plot_latency import first_step_time, latency_series

pytestmark = pytest.mark.timeout(120)
T0 = 1.7e9  # the first broker sample; training starts 20 s later


def timed_run(run: Path) -> Path:
    """A run whose reducer records carry ``time`` and ``wall_seconds`` as the reducer writes
    them (first step at T0 + 20), and broker samples every 2 s from T0 (start-up included)."""
    lines = []
    for step in range(25, 201, 25):
        wall = step / 10  # 10 steps/s
        lines.append(
            {
                "kind": "train",
                "step": step,
                "loss": 1 / step,
                "loss_avg": 1 / step,
                "wall_seconds": wall,
                "time": T0 + 20 + wall,
                "attention": [0.2] * 4,
            }
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with (run / "broker.jsonl").open("w") as fh:
        for i in range(21):  # T0 .. T0 + 40; steps from T0 + 20
            count = max(0, i - 10) * 50
            fh.write(json.dumps({"time": T0 + 2 * i, "count": count, "sum": count * 0.001,
                                 "p50_seconds": 0.001 if count else None,
                                 "p99_seconds": 0.002 if count else None,
                                 "live_experts": 4}) + "\n")  # fmt: skip
    return run


def test_first_step_time_is_the_reducers_first_step(tmp_path: Path) -> None:
    loaded = plot.load_run(timed_run(write_run(tmp_path / "run")))
    assert first_step_time(loaded.train) == pytest.approx(T0 + 20)
    assert first_step_time([{"step": 5}]) is None  # records from before `time`: no start
    # a resumed life (wall_seconds summed over lives) starts later: the earliest is the run's
    second = {"time": T0 + 100, "wall_seconds": 30.0}
    assert first_step_time([{"time": T0 + 25, "wall_seconds": 5.0}, second]) == T0 + 20


def test_queue_latency_is_drawn_against_training_time_from_the_first_step(tmp_path: Path):
    run = timed_run(write_run(tmp_path / "run"))
    loaded = plot.load_run(run)
    start = first_step_time(loaded.train)
    series = latency_series(loaded.broker or [], start)  # what plot_run draws
    assert series["t"][0] == pytest.approx(0.0) and min(series["t"]) >= 0
    assert series["t"] == pytest.approx([2.0 * i for i in range(11)])  # start-up left out
    assert series["mean_ms"][1] == pytest.approx(1.0)  # the interval's own, from the one before
    everything = latency_series(loaded.broker or [])  # no start: since the first sample
    assert everything["t"][0] == 0 and len(everything["t"]) == 21
    fig = plot._queue_latency(loaded, series, since_first_step=True)
    ax, bx = fig.axes
    assert min(ax.lines[0].get_xdata()) == pytest.approx(0.0)
    assert bx.get_xlim()[0] == 0 and bx.get_xlabel() == "training time since the first step (s)"
    assert "queue_latency.png" in [p.name for p in plot.plot_run(run)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return make_run(tmp_path_factory.mktemp("plot-attention") / "run")


def test_heat_map_has_one_row_per_class_of_mean_attention(digits: Built, tmp_path: Path):
    ca = plot_attention.class_attention(digits.path)
    classes = [str(k) for k in range(10)]
    assert ca.groups == classes and ca.task == "classification"
    assert ca.experts == ["top_left", "top_right", "bottom_left", "bottom_right"]
    assert ca.mean.shape == (10, 4)
    out = tmp_path / "att.csv"
    assert main(["predict", "--run", str(digits.path), "--split", "test", "--attention",
                 "--output", str(out)]) == 0  # fmt: skip
    lines = list(csv.DictReader(out.read_text().splitlines()))
    assert sum(ca.counts) == len(lines)
    for k, name in enumerate(classes):  # the mean over the rows whose true class it is
        mine = [r for r in lines if r["label"] == name]
        want = np.mean([[float(r[f"attn_{e}"]) for e in ca.experts] for r in mine], axis=0)
        assert ca.counts[k] == len(mine) > 0
        np.testing.assert_allclose(ca.mean[k], want, rtol=1e-6)
    assert (ca.mean.sum(axis=1) < 1).all()  # [CLS] keeps the rest of each row's 1


def test_heat_map_reads_the_reducers_attention_without_checkpoints(digits: Built, tmp_path):
    """The reducer's eval_predictions.csv carries each test row's attention (the columns of
    ``traci predict --split test --attention``, written here that way): with it, the map
    needs no config, checkpoint or data, and draws the same numbers; a file without them
    (an older run) is not read."""
    want = plot_attention.class_attention(digits.path)  # no file in the run: predicted again
    bare = tmp_path / "bare"
    bare.mkdir()
    assert main(["predict", "--run", str(digits.path), "--split", "test", "--attention",
                 "--output", str(bare / "eval_predictions.csv")]) == 0  # fmt: skip
    got = plot_attention.class_attention(bare)
    assert (got.groups, got.experts, got.counts, got.task) == (
        want.groups, want.experts, want.counts, want.task)  # fmt: skip
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-6)
    old = tmp_path / "old.csv"
    text = (bare / "eval_predictions.csv").read_text()
    kept = [line.split(",")[:15] for line in text.splitlines()]
    assert kept[0][-1] == "absent"  # row, id, label, prediction, 10 prob_*, absent
    old.write_text("\n".join(",".join(cells) for cells in kept) + "\n")
    assert plot_attention.from_eval_predictions(old) is None
    assert plot_attention.from_eval_predictions(tmp_path / "none.csv") is None


def test_plot_run_writes_the_heat_map_beside_the_others(digits: Built) -> None:
    write_run(digits.path)  # records of a run, into the run directory with the checkpoints
    paths = plot.plot_run(digits.path)
    assert [p.name for p in paths] == list(plot.NAMES)
    assert_png(digits.path / "plots" / "attention_by_class.png")


def test_regression_groups_rows_by_quantile_bins_of_the_true_label(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(0.0, 1.0, (300, 4)).round(4)
    y = x @ [1.0, -2.0, 0.5, 3.0] + 10.0
    data = write_csv(tmp_path / "data.csv", ["a", "b", "c", "d", "y"],
                     [[*r, v] for r, v in zip(x.tolist(), y.tolist(), strict=True)])  # fmt: skip
    views = "[{name: left, columns: [a, b]}, {name: right, columns: [c, d]}]"
    built = make_run(tmp_path / "run", **{"data.source": "csv", "data.path": str(data),
                                          "data.label": "y", "data.task": "regression",
                                          "data.views": views})  # fmt: skip
    ca = plot_attention.class_attention(built.path)
    assert main(["predict", "--run", str(built.path), "--split", "test", "--attention",
                 "--output", str(built.path / "eval_predictions.csv")]) == 0  # fmt: skip
    read = plot_attention.class_attention(built.path)  # now from the file: the same bins
    assert (read.groups, read.counts) == (ca.groups, ca.counts)
    np.testing.assert_allclose(read.mean, ca.mean, rtol=1e-6)
    assert ca.task == "regression" and ca.experts == ["left", "right"]
    assert len(ca.groups) == plot_attention.BINS and ca.mean.shape == (plot_attention.BINS, 2)
    assert ca.groups[0].startswith("[") and ca.groups[-1].endswith("]")
    assert max(ca.counts) - min(ca.counts) <= 2  # quantile bins: about equal
    assert np.isfinite(ca.mean).all()


def test_bins_cover_every_value_once() -> None:
    names, member = plot_attention._bins(np.arange(100.0))
    assert names == ["[0, 19.8)", "[19.8, 39.6)", "[39.6, 59.4)", "[59.4, 79.2)", "[79.2, 99]"]
    assert np.bincount(member).tolist() == [20] * 5
    names, member = plot_attention._bins(np.full(7, 3.0))  # one value: one bin
    assert names == ["3"] and member.tolist() == [0] * 7
    names, member = plot_attention._bins(np.array([2.0, 1.0, 5.0, 2.0]))  # few values: each
    assert names == ["1", "2", "5"] and member.tolist() == [1, 0, 2, 1]
