"""What `traci up` shows (traci_ml/app/view.py, follow.py) and `traci serve`'s ready line
(ready.py), without a cluster: the plain lines, the rich live view rendered into a recording
console, the state read from a real broker metrics endpoint, ready lines read from logs."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import start_http_server
from rich.console import Console

from traci_ml.app import view as V
from traci_ml.app.follow import Progress
from traci_ml.app.ready import LogReady, ServeReady
from traci_ml.app.supervisor import Child
from traci_ml.app.supervisor import Console as Lines
from traci_ml.core.config import load_config
from traci_ml.services.broker.metrics import BrokerMetrics

RUNNING = {"broker": "running", "reducer": "running"} | {f"expert-{i}": "running" for i in range(4)}
BASE = V.RunState(steps=1500, batch_size=64, n_experts=4, processes=RUNNING)


def states() -> list[V.RunState]:
    waiting = replace(BASE, phase=V.WAITING, registered=(0, 1), reducer_registered=True, live=2)
    training = replace(waiting, phase=V.TRAINING, registered=(0, 1, 2, 3), live=4, step=750,
                       loss=0.0341, samples_per_sec=3853.0, eval_value=0.9916, eval_step=750,
                       first_step_after=4.25)  # fmt: skip
    return [
        replace(BASE, phase=V.STARTING),
        waiting,
        replace(waiting, registered=(0, 1, 3)),
        training,
        replace(training, phase=V.EVALUATING, step=1500),
        replace(training, phase=V.PLOTTING, step=1500),
        replace(training, phase=V.DONE, step=1500),
    ]


def test_plain_view_prints_phases_missing_experts_and_status_lines():
    out = io.StringIO()
    view = V.PlainView(out, every=0.0)
    for state in states():
        view.show(state)
    view.eval_record({"kind": "eval", "step": 250, "accuracy": 0.98889, "loss": 0.0542},
                     "accuracy")  # fmt: skip
    view.line("expert-2 exited with signal 9: restart 1/5 in 1.0s")
    lines = out.getvalue().splitlines()
    assert lines[0] == "waiting for experts: expert-2, expert-3 missing (2/4 registered; " \
        "reducer registered)"  # fmt: skip
    assert lines[1].startswith("waiting for experts: expert-2 missing (3/4 registered")
    assert lines[2] == "training: 1500 steps; first step 4.2s after start"
    assert lines[3] == ("step   750/1500 | loss 0.0341 | 3,853 samples/s | eval accuracy 0.9916 "
                        "| experts 4/4 running, 4 live at broker")  # fmt: skip
    assert lines[4] == "evaluating: training done at step 1500"
    assert lines[5].endswith("| evaluating")
    assert lines[6].startswith("plotting ")
    assert lines[-2] == "eval after step 250: accuracy 0.9889 (loss 0.0542)"
    assert lines[-1] == "expert-2 exited with signal 9: restart 1/5 in 1.0s"


def test_a_first_look_during_an_evaluation_still_says_training_began():
    out = io.StringIO()
    view = V.PlainView(out, every=60.0)
    view.show(replace(BASE, phase=V.WAITING, registered=(0, 1, 2, 3)))
    view.show(replace(BASE, phase=V.EVALUATING, step=30, first_step_after=2.0))
    assert out.getvalue().splitlines()[1:] == [
        "training: 1500 steps; first step 2.0s after start",
        "step    30/1500 | experts 4/4 running | evaluating",
    ]


def test_plain_view_without_broker_metrics_names_who_is_not_running():
    out = io.StringIO()
    procs = {**RUNNING, "expert-3": "restarting"}
    V.PlainView(out).show(replace(BASE, phase=V.WAITING, processes=procs))
    assert out.getvalue() == (
        "waiting for experts: expert-3 not running; who has registered is unknown "
        "(metrics.broker_port 0)\n"
    )


def recording() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, record=True, width=110)


def test_live_view_renders_each_phase_into_a_terminal():
    console = recording()
    view = V.LiveView(io.StringIO(), console=console)
    frames = []
    for state in states():
        view.show(state)
        view._live.refresh()
        frames.append(console.export_text(clear=True))
    view.line("expert-2 exited with signal 9: restart 1/5 in 1.0s")
    printed = console.export_text(clear=True)
    view.close()
    assert "starting services" in frames[0]
    assert "waiting for experts" in frames[1] and "expert-2, expert-3 missing" in frames[1]
    assert "○ expert-2" in frames[1] and "● expert-0" in frames[1]
    assert "2/4 live at broker" in frames[1]
    assert "training" in frames[3] and "750/1500" in frames[3] and "3,853 samples/s" in frames[3]
    assert "eta 12s" in frames[3]  # 750 steps * 64 rows / 3,853 rows/s
    assert "eval accuracy 0.9916 (step 750)" in frames[3]
    assert "first step 4.2s after start" in frames[3]
    assert "━" in frames[3]  # the bar
    assert "evaluating" in frames[4] and "plotting" in frames[5]
    assert "✓ done" in frames[6] and "✓ expert-3" in frames[6]
    assert "restart 1/5" in printed


def test_live_view_shows_a_process_that_is_restarting():
    console = recording()
    console.print(V.render(replace(BASE, phase=V.WAITING, registered=(0, 1, 2), restarts=1,
                                   processes={**RUNNING, "expert-3": "restarting"})))  # fmt: skip
    text = console.export_text()
    assert "○ expert-3 (restarting)" in text and "1 restarts" in text


def test_a_pipe_gets_plain_lines():
    assert type(V.make_view(io.StringIO())) is V.PlainView
    assert type(V.make_view(io.StringIO(), live=False)) is V.PlainView


def child(tmp_path: Path, name: str, code: int | None = None) -> Child:
    c = Child(name, [], [], tmp_path / f"{name}.log")
    argv = [sys.executable, "-c", "import time; time.sleep(60)" if code is None else
            f"raise SystemExit({code})"]  # fmt: skip
    c.proc = subprocess.Popen(argv)
    if code is not None:
        c.proc.wait()
    return c


@pytest.fixture
def kids(tmp_path: Path):
    made = [child(tmp_path, n) for n in ("broker", "reducer", "expert-0", "expert-1")]
    yield made
    for c in made:
        c.signal(signal.SIGKILL)
        assert c.proc is not None
        c.proc.wait()


def test_progress_reads_who_has_registered_from_the_broker(tmp_path, kids):
    metrics = BrokerMetrics(2)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        config = load_config("examples/digits.yaml", overrides={
            "run_dir": str(tmp_path / "run"), "metrics.broker_port": str(server.server_port),
            "metrics.reducer_port": "0", "data.views": "halves"})  # fmt: skip
        config.run_path.mkdir(parents=True)
        out = io.StringIO()
        progress = Progress(config, out)
        metrics.set_state(pending=0, dispatched=0, registered=1, live=1,
                          expert_up={0: True, 1: False}, reducer_up=True)  # fmt: skip
        progress.update(kids)
        assert progress.state.phase == V.WAITING and progress.state.missing() == ["expert-1"]
        metrics.steps_released.inc()
        progress.looked = float("-inf")
        progress.update(kids)
        assert progress.state.phase == V.TRAINING
        assert progress.state.first_step_after is not None
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    lines = out.getvalue().splitlines()
    assert lines[0] == "waiting for experts: expert-1 missing (1/2 registered; reducer registered)"
    assert lines[1].startswith("training: 1500 steps; first step")


def test_serve_ready_from_the_services_own_lines(tmp_path, kids):
    """Broker metrics off: the reducer's and an expert's "ready" line since their last start."""
    config = load_config("examples/digits.yaml", overrides={
        "run_dir": str(tmp_path / "run"), "metrics.broker_port": "0"})  # fmt: skip
    out = io.StringIO()
    ready = ServeReady(config, Lines(out), "tcp://127.0.0.1:5557")

    def tick() -> None:
        ready.looked = float("-inf")
        ready.update(kids)

    reducer, expert = kids[1], kids[2]
    reducer.log_path.write_text("... INFO reducer traci_ml.core.link: reducer ready: regis")
    tick()  # half a line: not yet
    assert out.getvalue() == ""
    with reducer.log_path.open("a") as fh:
        fh.write("tered with broker tcp://127.0.0.1:5556, start at seq 0\n")
    tick()
    assert out.getvalue() == ""  # no expert yet
    expert.log_path.write_text("x INFO expert-0 traci_ml.core.link: expert-0 ready: registered\n")
    tick()
    assert out.getvalue().startswith(
        "ready: answering on tcp://127.0.0.1:5557 (reducer and 1 of 2 experts registered)"
    )
    reducer.restarts += 1  # a new reducer process: not ready until it says so again
    tick()
    assert out.getvalue().splitlines()[-1].startswith("not ready: tcp://127.0.0.1:5557 cannot")
    tick()
    assert len(out.getvalue().splitlines()) == 2  # one line per change


def test_log_ready_needs_a_running_process(tmp_path):
    done = child(tmp_path, "expert-0", code=0)
    done.log_path.write_text("x INFO expert-0 traci_ml.core.link: expert-0 ready: registered\n")
    assert LogReady().ready(done) is False
