"""Run plots (traci_ml.app.plot) and the broker queue-latency sampling of `traci up`: the data
preparation as pure functions against hand-computed cases, then real PNGs from synthetic runs."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import pytest
from prometheus_client import generate_latest, start_http_server

from traci_ml.app import launcher, plot
from traci_ml.app.plot import bucket_deltas, continued, histogram_quantile, latency_series
from traci_ml.core.config import load_config
from traci_ml.core.errors import TraciError
from traci_ml.services.broker.metrics import BrokerMetrics

INF = math.inf
NAMES = ["top_left", "top_right", "bottom_left", "bottom_right"]

# -- histogram_quantile: Prometheus' interpolation, worked by hand ---------------------------

BUCKETS = [(0.001, 10.0), (0.002, 30.0), (0.005, 40.0), (INF, 40.0)]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.5, 0.0015),  # rank 20 in (0.001, 0.002] holding 20: 0.001 + 0.001 * 10/20
        (0.99, 0.00488),  # rank 39.6 in (0.002, 0.005] holding 10: 0.002 + 0.003 * 9.6/10
        (0.1, 0.0004),  # rank 4 in the first bucket, which starts at 0: 0.001 * 4/10
        (0.25, 0.001),  # rank 10: exactly the first bucket's upper bound
        (1.0, 0.005),  # the last finite bound holding observations
    ],
)
def test_histogram_quantile_interpolates_like_prometheus(q, expected):
    assert histogram_quantile(q, BUCKETS) == pytest.approx(expected)
    assert histogram_quantile(q, list(reversed(BUCKETS))) == pytest.approx(expected)  # any order


def test_histogram_quantile_edge_cases():
    assert histogram_quantile(0.99, [(0.001, 1.0), (INF, 10.0)]) == 0.001  # rank in +Inf
    assert histogram_quantile(0.5, [(0.001, 0.0), (INF, 0.0)]) is None  # no observations
    assert histogram_quantile(0.5, [(0.001, 3.0), (0.002, 5.0)]) is None  # no +Inf bucket
    assert histogram_quantile(0.5, [(INF, 5.0)]) is None  # fewer than two buckets
    assert histogram_quantile(-0.1, BUCKETS) == -INF and histogram_quantile(1.5, BUCKETS) == INF
    # a non-monotonic scrape is made monotonic first, as Prometheus does
    bent = [(0.001, 10.0), (0.002, 8.0), (0.005, 15.0), (INF, 20.0)]  # read as 10, 10, 15, 20
    assert histogram_quantile(0.6, bent) == pytest.approx(0.002 + 0.003 * 2 / 5)


def test_bucket_deltas_per_interval_and_after_a_broker_restart():
    prev = {0.001: 10.0, 0.002: 30.0, INF: 40.0}
    now = [(0.001, 12.0), (0.002, 50.0), (INF, 60.0)]
    assert bucket_deltas(prev, now) == [(0.001, 2.0), (0.002, 20.0), (INF, 20.0)]
    assert bucket_deltas(None, now) == now  # first sample: everything since the broker started
    restarted = [(0.001, 1.0), (0.002, 2.0), (INF, 3.0)]  # counters went down: a new broker
    assert bucket_deltas(prev, restarted) == restarted
    assert histogram_quantile(0.5, bucket_deltas(prev, now)) == pytest.approx(
        0.001 + 0.001 * 8 / 18
    )


# -- metrics.jsonl preparation -----------------------------------------------------------------


def test_continued_keeps_the_resumed_life_and_marks_the_resume():
    first = [{"step": s, "loss": 1.0, "life": 1} for s in (25, 50, 75, 100)]
    second = [{"step": s, "loss": 0.5, "life": 2} for s in (50, 75, 100, 125)]
    kept, resumed = continued([*first, {"no": "step"}, *second])
    assert [r["step"] for r in kept] == [25, 50, 75, 100, 125]
    assert [r["life"] for r in kept] == [1, 2, 2, 2, 2]  # the abandoned stretch is gone
    assert resumed == [50]
    kept, resumed = continued([{"step": 250}, {"step": 500}, {"step": 500, "x": 1}])
    assert kept == [{"step": 250}, {"step": 500, "x": 1}] and resumed == [500]


def test_read_jsonl_skips_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo{"step": 3}\n\n{"step": 4}\n{"step": 5, "lo')
    assert [r["step"] for r in plot.read_jsonl(path)] == [1, 4]  # torn lines dropped


def test_latency_series_in_milliseconds_with_exact_interval_means():
    records = [
        {"time": 100.0, "count": 10, "sum": 0.010, "p50_seconds": 0.0005, "live_experts": 4},
        {"time": 102.0, "count": 30, "sum": 0.050, "p50_seconds": 0.0015, "live_experts": 3},
        {"time": 104.0, "count": 30, "sum": 0.050, "p50_seconds": None, "live_experts": 3},
        {"time": 106.0, "count": 5, "sum": 0.020, "p99_seconds": 0.004, "live_experts": 4},
    ]
    s = latency_series(records)
    assert s["t"] == [0.0, 2.0, 4.0, 6.0]
    assert s["p50_ms"][:2] == pytest.approx([0.5, 1.5]) and math.isnan(s["p50_ms"][2])
    assert s["p99_ms"][3] == pytest.approx(4.0)
    assert s["mean_ms"][0] == pytest.approx(1.0)  # 10 ms over 10
    assert s["mean_ms"][1] == pytest.approx(2.0)  # 40 ms over 20 more
    assert math.isnan(s["mean_ms"][2])  # nothing observed in the interval
    assert s["mean_ms"][3] == pytest.approx(4.0)  # counter reset: 20 ms over 5
    assert s["live"] == [4, 3, 3, 4]


# -- whole runs --------------------------------------------------------------------------------


def write_run(run: Path, *, task: str = "classification", broker: bool = True) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    cls = task == "classification"
    lines = []
    for life, steps in ((1, range(25, 301, 25)), (2, range(225, 501, 25))):  # resumed at 225
        for s in steps:
            att = [0.25 + 0.05 * math.sin(s / 100 + i) * (1 if life == 2 else -1) for i in range(4)]
            rec = {"kind": "train", "step": s, "loss": 1 / s, "loss_avg": 2 / s + life,
                   "samples_per_sec": 1000 + s, "wall_seconds": s / 50, "attention": att,
                   "train_accuracy" if cls else "train_rmse": 1 - 1 / s}  # fmt: skip
            lines.append(json.dumps(rec))
            if s % 100 == 0:
                metric = {"accuracy": 0.9 + s / 10000} if cls else {"rmse": 5 - s / 200}
                metric.update(attention=att[::-1], wall_seconds=s / 50)
                lines.append(json.dumps({"kind": "eval", "step": s, "loss": 3 / s, **metric}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "tra')  # torn last line
    summary = {"run_id": "synthetic", "task": task, "steps": 500, "samples_per_sec": 1234.0,
               "expert_names": NAMES, "test_accuracy" if cls else "test_rmse": 0.95}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    if broker:
        with (run / "broker.jsonl").open("w") as fh:
            for i in range(30):
                p50 = None if i == 7 else 0.0003 + 0.00001 * i
                fh.write(json.dumps({"time": 1e9 + 2 * i, "count": 100 * i, "sum": 0.04 * i,
                                     "interval_count": 100, "p50_seconds": p50,
                                     "p99_seconds": 0.002, "live_experts": 3 if i == 12 else 4})
                         + "\n")  # fmt: skip
    return run


def assert_png(path: Path, min_size=(700, 400), max_size=(1800, 1200)) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    height, width = imread(path).shape[:2]
    assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1], (
        path,
        width,
        height,
    )


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_plot_run_writes_real_pngs(tmp_path, task):
    run = write_run(tmp_path / "run", task=task)
    paths = plot.plot_run(run)
    drawn = plot.NAMES[:4]  # no checkpoints here: no attention_by_class.png (test_plot_attention)
    assert [p.name for p in paths] == list(drawn)
    for path in paths:
        assert path.parent == run / "plots"
        assert_png(path)
    assert not list((run / "plots").glob(".*"))  # no temporary files left behind
    assert plot.describe(paths) == f"plots in {run / 'plots'}: " + ", ".join(drawn)


def test_plotted_data_is_the_continued_run(tmp_path):
    run = plot.load_run(write_run(tmp_path / "run"))
    assert run.resumed == [225] and run.metric == "accuracy" and run.names == NAMES
    fig = plot._loss(run)
    loss_ax, acc_ax = fig.axes
    ema = next(line for line in loss_ax.lines if line.get_label() == "train loss (EMA)")
    assert list(ema.get_xdata()) == list(range(25, 501, 25))
    assert ema.get_ydata()[:8] == pytest.approx([2 / s + 1 for s in range(25, 201, 25)])
    assert ema.get_ydata()[8:] == pytest.approx([2 / s + 2 for s in range(225, 501, 25)])
    evals = next(line for line in acc_ax.lines if "eval accuracy" in line.get_label())
    assert list(evals.get_xdata()) == [100, 200, 300, 400, 500]  # 300 from the resumed life
    assert evals.get_label() == "eval accuracy (final 0.9500)"
    att = plot._attention(run)
    ax = att.axes[0]
    assert ax.lines[0].get_ydata()[-1] == pytest.approx(0.25 + 0.05 * math.sin(5))
    assert any(list(line.get_ydata()) == [0.25, 0.25] for line in ax.lines)  # uniform 1/N
    legend_texts = [t.get_text() for legend in att.legends for t in legend.get_texts()]
    assert NAMES[0] in legend_texts and "uniform 1/4 = 0.250" in legend_texts


def test_without_broker_samples_queue_latency_is_skipped_and_said(tmp_path, caplog):
    run = write_run(tmp_path / "run", broker=False)
    with caplog.at_level(logging.INFO, logger="traci_ml.app.plot"):
        paths = plot.plot_run(run)
    assert [p.name for p in paths] == ["loss.png", "throughput.png", "attention.png"]
    assert "queue_latency.png not written" in caplog.text
    assert "no broker.jsonl" in plot.describe(paths)


def test_an_unfinished_run_plots_without_summary(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "summary.json").unlink()
    loaded = plot.load_run(run)
    assert loaded.names == [f"expert {i}" for i in range(4)]
    assert len(plot.plot_run(run)) == 4


def test_missing_or_empty_inputs_name_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(TraciError, match=r"metrics\.jsonl does not exist"):
        plot.plot_run(run)
    (run / "metrics.jsonl").write_text('{"kind": "tra')
    with pytest.raises(TraciError, match=r"metrics\.jsonl holds no train or eval records"):
        plot.plot_run(run)
    write_run(run)
    (run / "summary.json").write_text("{not json")
    with pytest.raises(TraciError, match=r"summary\.json is not readable JSON"):
        plot.plot_run(run)
    assert plot.main(str(tmp_path / "nowhere")) == 2
    assert "traci plot: error:" in capsys.readouterr().err
    (run / "summary.json").unlink()
    assert plot.main(str(run)) == 0
    assert "plots in" in capsys.readouterr().out


# -- traci up: sampling the broker and plotting at the end -------------------------------------


def test_parse_broker_scrape_reads_the_real_exposition_format():
    metrics = BrokerMetrics(4)
    for value in (0.0002, 0.0003, 0.004):
        metrics.queue_latency.observe(value)
    metrics.live_experts.set(3)
    scrape = launcher.parse_broker_scrape(generate_latest(metrics.registry).decode())
    assert scrape["count"] == 3 and scrape["sum"] == pytest.approx(0.0045)
    assert scrape["live_experts"] == 3
    assert scrape["buckets"][-1] == (INF, 3.0) and scrape["buckets"][2] == (2.5e-4, 1.0)
    assert histogram_quantile(0.5, scrape["buckets"]) == pytest.approx(2.5e-4 + 2.5e-4 * 0.5)


def progress_for(tmp_path: Path, port: int) -> launcher.Progress:
    config = load_config(
        "examples/digits.yaml",
        overrides={"run_dir": str(tmp_path / "run"), "metrics.broker_port": str(port)},
    )
    config.run_path.mkdir(parents=True)
    return launcher.Progress(config, io.StringIO())


def test_progress_samples_queue_latency_into_broker_jsonl(tmp_path):
    metrics = BrokerMetrics(4)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        progress = progress_for(tmp_path, server.server_port)
        metrics.live_experts.set(4)
        for value in [0.0002] * 50 + [0.003] * 50:
            metrics.queue_latency.observe(value)
        assert progress._broker_live() == 4
        for value in [0.0007] * 10:
            metrics.queue_latency.observe(value)
        assert progress._broker_live() == 4
        assert progress._broker_live() == 4  # nothing new in this interval
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    lines = [json.loads(x) for x in (tmp_path / "run" / "broker.jsonl").read_text().splitlines()]
    assert [r["count"] for r in lines] == [100, 110, 110]
    assert [r["interval_count"] for r in lines] == [100, 10, 0]
    assert lines[0]["p50_seconds"] == pytest.approx(2.5e-4)  # rank 50: top of (1e-4, 2.5e-4]
    assert lines[0]["p99_seconds"] == pytest.approx(2.5e-3 + 2.5e-3 * 49 / 50)
    assert lines[1]["p50_seconds"] == pytest.approx(5e-4 + 5e-4 * 0.5)  # only this interval's
    assert lines[2]["p50_seconds"] is None and lines[2]["live_experts"] == 4
    assert lines[0]["time"] <= lines[1]["time"] <= lines[2]["time"]


def test_progress_without_a_broker_writes_nothing_and_does_not_raise(tmp_path):
    from tests.helpers.support import free_ports

    progress = progress_for(tmp_path, free_ports(1)[0])  # nothing listens there
    assert progress._broker_live() is None
    off = progress_for(tmp_path / "off", 0)
    assert off._broker_live() is None
    assert not (tmp_path / "run" / "broker.jsonl").exists()


def test_a_garbled_scrape_is_skipped(tmp_path):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Garbled(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b'traci_broker_queue_latency_seconds_bucket{odd="1"} x\n'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Garbled)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert progress_for(tmp_path, server.server_port)._broker_live() is None
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert not (tmp_path / "run" / "broker.jsonl").exists()


def test_a_failure_to_plot_is_a_warning(tmp_path, monkeypatch, caplog):
    progress = launcher.Progress(load_config("examples/digits.yaml"), io.StringIO())

    def broken(run_dir, **_):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(plot, "plot_run", broken)
    with caplog.at_level(logging.WARNING, logger="traci_ml.app.launcher"):
        launcher._plot(tmp_path, progress, read_data=True)  # returns, does not raise
    assert "plots of" in caplog.text and "no fonts today" in caplog.text
    monkeypatch.undo()
    launcher._plot(write_run(tmp_path / "run"), progress, read_data=True)
    assert f"plots in {tmp_path / 'run' / 'plots'}: loss.png" in progress.out.getvalue()


def test_traci_plot_command(tmp_path, capsys):
    from traci_ml.app.cli import main as cli

    run = write_run(tmp_path / "run")
    assert cli(["plot", str(run)]) == 0
    said = capsys.readouterr()
    assert "plots in" in said.out
    assert said.err.startswith(f"traci plot: drawing {run / 'plots'} (")  # while it draws
    for name in ("loss", "throughput", "attention", "queue_latency"):
        assert_png(run / "plots" / f"{name}.png")
    assert cli(["plot", str(tmp_path / "nowhere")]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
