"""The one supervisor loop (``traci_ml.app.supervisor``) with real child processes: tiny Python
commands that exit with a given code on each start, or sleep. ``traci up``'s and ``traci serve``'s
own policies are exercised through ``up`` and ``serve`` with their ``children`` swapped for these
(everything else real); the loop itself through ``supervise`` with a hand-made ``Policy``."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from traci_ml.app import launcher, serving, supervisor
from traci_ml.app.supervisor import Child, Console, Policy, stop_all, supervise
from traci_ml.core import fits
from traci_ml.core.config import Config, LauncherConfig, load_config
from traci_ml.core.rundir import RunDir

# Each start appends its extra argv to a runs file, prints "run <n>", then exits with the n-th
# code of a comma list (n from 0), or sleeps once the list is used up.
SCRIPT = (
    "import pathlib, sys, time\n"
    "runs = pathlib.Path(sys.argv[1])\n"
    "with runs.open('a') as fh:\n"
    "    fh.write(' '.join(sys.argv[3:]) + '\\n')\n"
    "n = len(runs.read_text().splitlines()) - 1\n"
    "print(f'run {n}', flush=True)\n"
    "codes = [int(c) for c in sys.argv[2].split(',') if c]\n"
    "sys.exit(codes[n]) if n < len(codes) else time.sleep(120)\n"
)
IGNORES_TERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)
DEADLINE = 20.0  # seconds a test waits for something the supervisor should do in about one
pytestmark = pytest.mark.timeout(60)  # a supervisor that never ends fails the test, not the run


def tiny(tmp_path: Path, name: str, codes: str = "") -> Child:
    """A supervised child that exits with ``codes`` on its successive starts, then sleeps. Its
    first start runs with the argument ``first``, every restart with ``again``."""
    runs = tmp_path / f"{name}.runs"
    argv = [sys.executable, "-c", SCRIPT, str(runs), codes]
    return Child(name, [*argv, "first"], [*argv, "again"], tmp_path / f"{name}.log",
                 dict(os.environ))  # fmt: skip


def runs(child: Child) -> list[str]:
    """The extra argv of each start of a ``tiny`` child so far."""
    path = Path(child.argv[3])
    return path.read_text().splitlines() if path.exists() else []


def gone(pid: int | None) -> bool:
    assert pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_all_stopped(kids: list[Child]) -> None:
    for c in kids:
        assert c.proc is not None and c.proc.returncode is not None, c.name
        assert gone(c.pid), f"{c.name} (pid {c.pid}) still running"
        assert c.log_file is not None and c.log_file.closed


def logged(starts: int) -> str:
    """What a ``tiny`` child's log holds after ``starts`` starts (the log tail of a give-up)."""
    return "".join(f"run {n}\n" for n in range(starts))


def read_pids(path: Path) -> dict[str, int]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def config(tmp_path: Path, **sets: str) -> Config:
    """The default config, its run in ``tmp_path``, restarts fast (0.1 s back-off, 3 at most)."""
    base = {"run_dir": str(tmp_path / "run"), "launcher.max_restarts": "3",
            "launcher.restart_delay": "0.1", "metrics.broker_port": "0"}  # fmt: skip
    return load_config(overrides={**base, **sets}, env={})


@pytest.fixture(autouse=True)
def harmless_sigterm() -> Iterator[None]:
    """A SIGTERM that reaches this process outside ``supervise`` (whose own handler it restores
    on return) does nothing instead of ending pytest; both handlers are put back afterwards."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda *_: None)
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.fixture
def sigterm_when() -> Iterator[Callable[[Callable[[], bool]], None]]:
    """``sigterm_when(ready)``: SIGTERM to this process once ``ready()`` (polled from a thread),
    or after ``DEADLINE`` seconds regardless, so a supervisor that never gets there still ends
    (and the test's assertions fail)."""
    threads: list[threading.Thread] = []

    def arm(ready: Callable[[], bool]) -> None:
        def run() -> None:
            end = time.monotonic() + DEADLINE
            while time.monotonic() < end and not ready():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)

        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()

    yield arm
    for t in threads:
        t.join(DEADLINE + 5)


# -- traci up's policy -------------------------------------------------------------------------


def run_up(monkeypatch: pytest.MonkeyPatch, cfg: Config, kids: list[Child]) -> int:
    """``traci up`` (fresh run) with these children in place of broker, reducer and experts."""
    monkeypatch.setattr(launcher, "children", lambda *a, **k: kids)
    args = argparse.Namespace(fresh=False, resume=False, gpus=0)
    return launcher.up(cfg, argv=[], args=args)


@pytest.mark.parametrize(
    ("codes", "starts"),
    [
        ("3", 1),  # a data error on the first start
        ("1,3", 2),  # ... or after a restart: a restart reads the same data again
        ("2", 1),  # a config or checkpoint error on the first start
        ("1,2", 2),  # ... or after a restart (a checkpoint that does not fit stays so)
    ],
)
def test_up_never_restarts_a_data_or_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    codes: str, starts: int,
) -> None:  # fmt: skip
    broker, reducer = tiny(tmp_path, "broker"), tiny(tmp_path, "reducer", codes)
    assert run_up(monkeypatch, config(tmp_path), [broker, reducer]) == 1
    out = capsys.readouterr().out
    code = codes[-1]
    after = f" after {starts - 1} restarts" if starts > 1 else ""
    assert f"reducer exited with code {code}{after}; last log lines:\n{logged(starts)}" in out
    assert out.count("reducer exited with code 1: restart") == starts - 1
    assert f"with code {code}: restart" not in out
    assert len(runs(reducer)) == starts and runs(broker) == ["first"]
    assert broker.proc is not None and broker.proc.returncode == -signal.SIGTERM
    assert_all_stopped([broker, reducer])


@pytest.mark.parametrize("never", [False, True])
def test_up_restarts_a_crash_with_backoff_then_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    never: bool,
) -> None:  # fmt: skip
    broker, reducer = tiny(tmp_path, "broker"), tiny(tmp_path, "reducer")
    crasher = tiny(tmp_path, "expert-0", "1,1,1,1,1")
    kids = [broker, reducer, crasher]
    sets = {"launcher.restart": "never"} if never else {}
    cfg = config(tmp_path, **sets)
    assert run_up(monkeypatch, cfg, kids) == 1
    out = capsys.readouterr().out
    restarts = 0 if never else 3
    delays = ["0.1", "0.2", "0.4"]  # restart_delay doubling while the service keeps failing
    for n in range(1, 4):
        line = f"expert-0 exited with code 1: restart {n}/3 in {delays[n - 1]}s"
        assert (line in out) is not never
    assert out.count("expert-0 exited with code 1: restart") == restarts
    after = f" after {restarts} restarts" if restarts else ""
    assert f"expert-0 exited with code 1{after}; last log lines:\n{logged(restarts + 1)}" in out
    assert runs(crasher) == ["first"] + ["again"] * restarts  # restarts run restart_argv
    assert crasher.restarts == restarts
    # the pid file lists every service started (the crasher's last start included)
    assert read_pids(RunDir(cfg.run_path).pids) == {c.name: c.pid for c in kids}
    assert_all_stopped(kids)


def test_up_is_done_when_the_reducer_exits_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reducer fails twice (restarted), then exits 0: the run is done, the others (a broker
    that would run on, an expert that ended its part with 0 and was not restarted) stopped."""
    cfg = config(tmp_path)
    run = RunDir(cfg.run_path)
    run.path.mkdir(parents=True)
    run.summary.write_text(json.dumps(
        {"test_accuracy": 0.9, "steps": 10, "wall_seconds": 1.5, "samples_per_sec": 100.0}
    ))  # fmt: skip
    plotted: list[Path] = []
    monkeypatch.setattr(launcher, "_plot", lambda path, progress, **_: plotted.append(path))
    monkeypatch.setattr(supervisor, "GRACE", 1.0)  # the broker here never finishes by itself
    broker = tiny(tmp_path, "broker")
    reducer = tiny(tmp_path, "reducer", "1,1,0")
    expert = tiny(tmp_path, "expert-0", "0")
    assert run_up(monkeypatch, cfg, [broker, reducer, expert]) == 0
    out = capsys.readouterr().out
    assert out.count("reducer exited with code 1: restart") == 2
    assert "expert-0 exited" not in out and runs(expert) == ["first"]
    assert "done: test_accuracy 0.9000, 10 steps in 1.5s" in out
    assert runs(reducer) == ["first", "again", "again"] and reducer.code == 0
    assert plotted == [run.path]
    assert broker.proc is not None and broker.proc.returncode == -signal.SIGTERM
    assert_all_stopped([broker, reducer, expert])


# -- the loop itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_stops_every_child(tmp_path: Path, sig: int) -> None:
    """Once every child runs (the pid file lists them all), a signal to the supervisor stops
    every one and ``supervise`` says so and returns None; no child is left running."""
    kids = [tiny(tmp_path, name) for name in ("broker", "reducer", "expert-0")]
    pid_file = tmp_path / "pids.json"
    seen: list[dict[str, int]] = []

    def tick(children: list[Child]) -> None:
        seen.append(read_pids(pid_file))
        if all(runs(c) for c in children):  # each one got going
            os.kill(os.getpid(), sig)

    out = io.StringIO()
    policy = Policy(LauncherConfig(), pid_file, Console(out), "started", on_tick=tick)
    assert supervise(kids, policy) is None
    assert out.getvalue() == "started\ninterrupted: stopping every service\n"
    assert seen[0] == {c.name: c.pid for c in kids}
    for c in kids:
        assert c.proc is not None and c.proc.returncode == -signal.SIGTERM
        assert c.restarts == 0
    assert_all_stopped(kids)
    assert signal.getsignal(signal.SIGTERM) is not supervisor._interrupt  # handlers put back


def test_stop_all_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", IGNORES_TERM]
    stubborn = Child("stubborn", argv, argv, tmp_path / "stubborn.log", dict(os.environ))
    stubborn.start()
    end = time.monotonic() + DEADLINE
    while "ready" not in stubborn.tail() and time.monotonic() < end:
        time.sleep(0.05)
    assert stubborn.tail() == "ready"
    stop_all([stubborn], timeout=0.5)
    assert stubborn.proc is not None and stubborn.proc.returncode == -signal.SIGKILL
    assert_all_stopped([stubborn])


# -- traci serve's policy ----------------------------------------------------------------------


def run_serve(
    monkeypatch: pytest.MonkeyPatch, cfg: Config, kids: list[Child], out: io.StringIO
) -> int:
    """``traci serve`` (its checkpoints present) with these children, printing to ``out``."""
    run = RunDir(cfg.run_path)
    for path in run.model_checkpoints(4):  # the default config: digits in 4 views
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    asked: list[dict[str, object]] = []

    def fake_children(*args: object, **kwargs: object) -> list[Child]:
        asked.append(kwargs)
        return kids

    monkeypatch.setattr(serving, "children", fake_children)
    monkeypatch.setattr(fits, "check_run", lambda *a, **k: None)  # empty files: not checked
    code = serving.serve(cfg, out=out)
    assert asked == [{"serve": True, "fork": True}]
    return code


def test_serve_leaves_a_failed_expert_down_and_restarts_an_exit_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_when
) -> None:
    """Serving: a data error is retried like any failure; an expert that fails for good is left
    down (serving goes on, the live-only pid file drops it); exit 0 is restarted too (a served
    service has no end of its own); SIGTERM is the normal end (0)."""
    cfg = config(tmp_path, **{"launcher.max_restarts": "2"})
    broker, reducer = tiny(tmp_path, "broker"), tiny(tmp_path, "reducer", "0")
    bad, good = tiny(tmp_path, "expert-0", "3,3,3"), tiny(tmp_path, "expert-1")
    kids = [broker, reducer, bad, good]
    pid_file = RunDir(cfg.run_path).serve_pids
    printed = io.StringIO()

    def settled() -> bool:  # expert-0 given up on, the reducer restarted and running
        pids = read_pids(pid_file)
        return (
            "expert-0 exited with code 3; last" in printed.getvalue()
            and set(pids) == {"broker", "reducer", "expert-1"}
            and len(runs(reducer)) == 2
        )

    sigterm_when(settled)
    code = run_serve(monkeypatch, cfg, kids, printed)
    out = printed.getvalue()
    assert code == 0
    assert out.startswith(f"serving {cfg.run_path} on ")
    assert "expert-0 exited with code 3: restart 1/2 in 0.1s" in out
    assert "expert-0 exited with code 3: restart 2/2 in 0.2s" in out
    assert f"expert-0 exited with code 3; last log lines:\n{logged(3)}" in out  # no count
    assert "reducer exited with code 0: restart 1/2 in 0.1s" in out
    assert out.endswith("interrupted: stopping every service\n")
    assert runs(bad) == ["first", "again", "again"] and runs(reducer) == ["first", "again"]
    assert read_pids(pid_file) == {c.name: c.pid for c in (broker, reducer, good)}
    for c in (broker, reducer, good):  # still serving when SIGTERM came
        assert c.proc is not None and c.proc.returncode == -signal.SIGTERM
    assert_all_stopped(kids)


def test_serve_ends_when_the_broker_fails_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, **{"launcher.max_restarts": "1"})
    broker, expert = tiny(tmp_path, "broker", "1,1,1"), tiny(tmp_path, "expert-0")
    printed = io.StringIO()
    assert run_serve(monkeypatch, cfg, [broker, expert], printed) == 1
    out = printed.getvalue()
    assert "broker exited with code 1: restart 1/1 in 0.1s" in out
    assert f"broker exited with code 1; last log lines:\n{logged(2)}" in out
    assert "interrupted" not in out and runs(broker) == ["first", "again"]
    assert expert.proc is not None and expert.proc.returncode == -signal.SIGTERM
    assert_all_stopped([broker, expert])
