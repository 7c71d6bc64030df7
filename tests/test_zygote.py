"""The zygote (traci_ml/app/zygote.py): a forked service runs the command it was given, with
its own environment, session and log, and reports its exit like subprocess would."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from bench.e2e import free_ports
from traci_ml.app.supervisor import service_env
from traci_ml.app.zygote import CLI, Zygote

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork: Linux")
TRACI = [sys.executable, "-m", CLI]


@pytest.fixture
def zygote(tmp_path: Path):
    z = Zygote([CLI], service_env(), tmp_path / "zygote.log")
    yield z
    z.close()


def broker_argv() -> list[str]:
    expert, reducer, serve = free_ports(3)
    sets = {"network.expert_port": expert, "network.reducer_port": reducer,
            "network.serve_port": serve, "metrics.broker_port": 0}  # fmt: skip
    return [*TRACI, "broker", *(f"--set={k}={v}" for k, v in sets.items())]


def wait_for(path: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}:\n{content}")


def test_a_command_runs_with_its_arguments_and_exit_code(zygote: Zygote, tmp_path: Path):
    log = tmp_path / "keys.log"
    argv = [*TRACI, "keys", "generate", str(tmp_path / "keys"), "--experts", "1"]
    proc = zygote.spawn("keys", argv, service_env(), log)
    assert proc is not None and proc.wait(60) == 0 and proc.returncode == 0
    assert "wrote CurveZMQ key pairs" in log.read_text()
    assert (tmp_path / "keys" / "broker.key").exists()
    assert zygote.ready_after is not None and zygote.ready_after >= 0


def test_its_own_environment_reaches_the_command(zygote: Zygote, tmp_path: Path):
    log = tmp_path / "broker.log"
    env = {**service_env(), "TRACI_NETWORK__BROKER_HOSTT": "x"}
    proc = zygote.spawn("broker", broker_argv(), env, log)
    assert proc is not None and proc.wait(60) == 2
    assert "TRACI_NETWORK__BROKER_HOSTT" in log.read_text()


def test_a_service_has_its_own_session_and_name_and_stops_on_signals(
    zygote: Zygote, tmp_path: Path
):
    log = tmp_path / "broker.log"
    first = zygote.spawn("broker-a", broker_argv(), service_env(), log)
    assert first is not None and first.poll() is None
    wait_for(log, "experts on")
    assert os.getsid(first.pid) == first.pid  # start_new_session, as for a plain child
    assert Path(f"/proc/{first.pid}/comm").read_text().strip() == "broker-a"
    assert os.getppid() != first.pid and zygote.proc.pid != first.pid
    first.send_signal(signal.SIGTERM)  # the service's own handler: a clean stop
    assert first.wait(30) == 0
    assert "broker: exit (stopped)" in log.read_text()
    second = zygote.spawn("broker-b", broker_argv(), service_env(), tmp_path / "b.log")
    assert second is not None
    wait_for(tmp_path / "b.log", "experts on")
    second.kill()
    assert second.wait(30) == -signal.SIGKILL


def test_services_end_with_their_zygote(tmp_path: Path):
    zygote = Zygote([CLI], service_env(), tmp_path / "zygote.log")
    log = tmp_path / "broker.log"
    proc = zygote.spawn("broker", broker_argv(), service_env(), log)
    assert proc is not None
    wait_for(log, "experts on")
    zygote.close()  # its services get SIGTERM (core.signals.die_with_parent)
    wait_for(log, "broker: exit (stopped)")
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is not None
    assert zygote.spawn("late", broker_argv(), service_env(), log) is None


def test_what_is_not_a_traci_command_is_left_to_subprocess(zygote: Zygote, tmp_path: Path):
    argv = [sys.executable, "-c", "pass"]
    assert zygote.spawn("other", argv, service_env(), tmp_path / "x.log") is None


def test_a_zygote_stuck_in_its_imports_is_dropped(tmp_path: Path, monkeypatch):
    from traci_ml.app import zygote as Z

    (tmp_path / "stuck_module.py").write_text("import time\ntime.sleep(120)\n")
    env = {**service_env(), "PYTHONPATH": str(tmp_path)}
    monkeypatch.setattr(Z, "PATIENCE", 2.0)
    z = Zygote(["stuck_module"], env, tmp_path / "zygote.log")
    try:
        assert z.spawn("broker", broker_argv(), service_env(), tmp_path / "b.log") is None
        assert z.proc.wait(10) is not None  # killed: a late fork can never double a service
        assert z.spawn("broker", broker_argv(), service_env(), tmp_path / "b.log") is None
    finally:
        z.close()
