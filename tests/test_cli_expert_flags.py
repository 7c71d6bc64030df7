"""`traci expert --id-from-hostname` and `--metrics-port`: what a StatefulSet pod runs
(deploy/k8s/base/experts.yaml). Pod expert-<i> is expert i; every pod serves metrics on the
same port."""

from __future__ import annotations

import pytest

from traci_ml.app import cli
from traci_ml.core.errors import ConfigError


@pytest.mark.parametrize(
    ("hostname", "expert_id"),
    [("expert-0", 0), ("expert-3", 3), ("traci-expert-12", 12), ("expert-2.expert.traci.svc", 2)],
)
def test_the_ordinal_suffix_is_the_expert_id(hostname: str, expert_id: int) -> None:
    assert cli.expert_id_from_hostname(hostname) == expert_id


@pytest.mark.parametrize("hostname", ["expert", "expert-", "expert-a1", "3c9f0e2b1a7d", ""])
def test_a_hostname_without_an_ordinal_is_refused(hostname: str) -> None:
    with pytest.raises(ConfigError, match="--id-from-hostname"):
        cli.expert_id_from_hostname(hostname)


def test_id_and_id_from_hostname_exclude_each_other_and_one_is_required() -> None:
    parser = cli.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["expert", "--id", "1", "--id-from-hostname"])
    with pytest.raises(SystemExit):
        parser.parse_args(["expert"])
    assert parser.parse_args(["expert", "--id-from-hostname"]).id_from_hostname


@pytest.mark.parametrize("expert_id", [0, 3])
def test_metrics_port_lands_every_expert_on_that_port(expert_id: int) -> None:
    args = cli.build_parser().parse_args(
        ["expert", "--id", str(expert_id), "--metrics-port", "9110"]
    )
    config = cli.config_from_args(args)
    assert config.metrics.expert_base_port + expert_id == 9110


def test_metrics_port_zero_disables_and_a_port_below_the_id_is_refused() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["expert", "--id", "2", "--metrics-port", "0"])
    assert cli.config_from_args(args).metrics.expert_base_port == 0
    args = parser.parse_args(["expert", "--id", "2", "--metrics-port", "2"])
    with pytest.raises(ConfigError, match="--metrics-port"):
        cli.config_from_args(args)


def test_main_reports_a_bad_hostname_as_a_usage_error(monkeypatch, capsys) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "laptop")
    assert cli.main(["expert", "--id-from-hostname"]) == 2
    assert "does not end in -<ordinal>" in capsys.readouterr().err
