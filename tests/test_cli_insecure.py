"""`traci up --insecure` on a non-loopback bind_host says so on the console (issue 9): the
broker's own warning goes to runs/<id>/logs/broker.log, which nobody watching `traci up`
reads. Each run here stops before any process starts: the run directory already holds
checkpoints, so `up` refuses after the security check (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from traci_ml.app import cli
from traci_ml.core.config import load_config

pytestmark = pytest.mark.timeout(60)


def up(tmp_path: Path, *flags: str) -> int:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    return cli.main(["up", "--run-dir", str(run), *flags])


def test_up_insecure_off_loopback_warns_on_stderr(tmp_path, capsys) -> None:
    flags = ["--insecure", "--set", "network.bind_host=0.0.0.0", "--log-level", "ERROR"]
    assert up(tmp_path, *flags) == 2
    err = capsys.readouterr().err
    assert (
        "traci up: warning: --insecure: the broker binds 0.0.0.0 (ports 5555, 5556, 5557) "
        "without CURVE keys: anyone who can reach it can inject embeddings, read gradients "
        "and query the model (docs/security.md)"
    ) in err
    assert err.count("without CURVE") == 1  # once, not again as a log line
    assert "already holds checkpoints" in err  # it went on past the check


def test_up_on_loopback_does_not_warn(tmp_path, capsys) -> None:
    assert up(tmp_path, "--insecure") == 2  # bind_host 127.0.0.1 by default
    err = capsys.readouterr().err
    assert "without CURVE" not in err and "already holds checkpoints" in err


def test_up_off_loopback_without_insecure_is_still_refused(tmp_path, capsys) -> None:
    assert up(tmp_path, "--set", "network.bind_host=0.0.0.0") == 2
    err = capsys.readouterr().err
    assert "refusing to bind 0.0.0.0 without CURVE keys" in err
    assert "warning" not in err and "already holds checkpoints" not in err


def test_warn_insecure_leaves_out_a_closed_front_door_and_keyed_brokers(capsys) -> None:
    sets = {"network.bind_host": "10.0.0.5", "security.insecure": "true"}
    config = load_config(overrides={**sets, "network.serve_port": "0"}, env={})
    assert cli.warn_insecure(config, "serve")
    assert "traci serve: warning: --insecure: the broker binds 10.0.0.5 (ports 5555, 5556) " in (
        capsys.readouterr().err
    )
    assert not cli.warn_insecure(config, "up", curve=True)
    keyed = load_config(overrides={**sets, "security.curve_dir": "/keys"}, env={})
    assert not cli.warn_insecure(keyed, "up")
    assert capsys.readouterr().err == ""
