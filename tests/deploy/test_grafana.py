"""deploy/grafana: the dashboard is a valid Grafana dashboard model (a round trip through
grafana-foundation-sdk loses no key), shows what the brief asks for, and queries only metric
names that the services export; the provisioning files point at Prometheus and the dashboard."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from tests.helpers.deploytools import GRAFANA, SYNTHETIC, exported_metric_names, promql_metric_names

DASHBOARD = GRAFANA / "dashboards" / "traci.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def round_trip(data: dict[str, Any]) -> dict[str, Any]:
    """Through the SDK's typed model (panel options, field config and Prometheus queries
    included) and back."""
    register_default_plugins()
    return json.loads(json.dumps(Dashboard.from_json(data), cls=JSONEncoder))


def lost(original: Any, back: Any, path: str = "") -> list[str]:
    """Keys and values of ``original`` that ``back`` no longer holds (defaults it adds are
    fine)."""
    if isinstance(original, dict):
        if not isinstance(back, dict):
            return [f"{path or '.'}: became {back!r}"]
        out = []
        for key, value in original.items():
            if key not in back:
                out.append(f"{path}.{key}: unknown to the dashboard model")
            else:
                out += lost(value, back[key], f"{path}.{key}")
        return out
    if isinstance(original, list):
        if not isinstance(back, list) or len(back) != len(original):
            return [f"{path}: list changed"]
        pairs = enumerate(zip(original, back, strict=True))
        return [m for i, (a, b) in pairs for m in lost(a, b, f"{path}[{i}]")]
    return [] if original == back else [f"{path}: {original!r} became {back!r}"]


def test_dashboard_round_trips_through_the_sdk_without_losing_a_key(dashboard) -> None:
    problems = lost(dashboard, round_trip(dashboard))
    assert not problems, "\n".join(problems)


def test_the_round_trip_catches_misspelt_keys(dashboard) -> None:
    broken = json.loads(json.dumps(dashboard))
    timeseries = next(p for p in broken["panels"] if p["type"] == "timeseries")
    timeseries["options"]["legend"]["displayMod"] = "list"  # typo inside a panel plugin's options
    timeseries["targets"][0]["legendFormt"] = "x"  # typo inside a Prometheus query
    broken["refersh"] = "5s"
    problems = lost(broken, round_trip(broken))
    for key in ("displayMod", "legendFormt", "refersh"):
        assert any(key in p for p in problems), f"{key} was not caught: {problems}"


def test_every_query_reads_only_metrics_the_services_export(dashboard) -> None:
    known = exported_metric_names() | SYNTHETIC
    for expr in exprs(dashboard):
        names = promql_metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= known, f"{expr!r} reads {sorted(names - known)}: no service exports it"


def test_dashboard_shows_what_operators_need(dashboard) -> None:
    queries = exprs(dashboard)
    text = "\n".join(queries)
    for q in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({q}," in e and "queue_latency" in e for e in queries), q
    for metric in (
        "traci_broker_join_wait_seconds_bucket",
        "traci_broker_pending_steps",
        "traci_broker_live_experts",
        "traci_broker_expert_up",
        "traci_broker_messages_total",
        "traci_broker_rejections_total",
        "traci_reducer_samples_total",  # throughput
        "traci_reducer_loss",
        "traci_reducer_eval_metric",
        "traci_reducer_attention",
        "traci_expert_grad_roundtrip_seconds_bucket",
    ):
        assert metric in text, f"the dashboard shows no {metric}"


def test_panels_are_laid_out_once_each_and_use_the_datasource_variable(dashboard) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    cells = set()
    for p in panels(dashboard):
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, f"{p['title']} is wider than the grid"
        mine = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert p.get("targets"), f"{p['title']} has no query"


def test_provisioning_points_at_prometheus_and_the_dashboard_folder(dashboard) -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    [prometheus] = sources["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"
    assert prometheus["isDefault"] is True
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/traci.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"  # docker-compose.yml
    assert dashboard["uid"] == "traci" and dashboard["title"] == "TRACI"
