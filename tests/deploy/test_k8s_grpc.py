"""The serving sidecar with ``serve.grpc_port``: the gRPC side of the Open Inference Protocol
gets a named container port and a port on the broker's Service; with REST off, the probes
fall back to the gRPC port accepting. Every shape passes kubernetes-validate's strict schema."""

from __future__ import annotations

from typing import Any

import pytest

from tests.deploy.test_k8s import validate_strict
from traci_ml.app.k8s_objects import broker_service, pod_template
from traci_ml.core.config import Config


def _serving(serve: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    config = Config.model_validate({"serve": serve, "network": {"serve_port": 5557}})
    template = pod_template(config, "broker", "broker", None, serve=True)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "broker"},
        "spec": {"selector": {"matchLabels": template["metadata"]["labels"]},
                 "template": template},
    }  # fmt: skip
    assert validate_strict([deployment, broker_service(config)]) == []
    sidecars = [c for c in template["spec"]["containers"] if c["name"] == "http"]
    return (sidecars[0] if sidecars else {}), broker_service(config)


def _ports(obj: dict[str, Any], key: str) -> dict[str, int]:
    return {p["name"]: p[key] for p in obj.get("ports", obj.get("spec", {}).get("ports", []))}


def test_grpc_port_is_exposed_beside_rest() -> None:
    sidecar, service = _serving({"http_port": 8080, "grpc_port": 8081})
    assert _ports(sidecar, "containerPort") == {"http": 8080, "grpc": 8081}
    assert {"http": 8080, "grpc": 8081}.items() <= _ports(service, "port").items()
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


def test_grpc_alone_probes_its_port() -> None:
    sidecar, service = _serving({"http_port": 0, "grpc_port": 8081})
    assert _ports(sidecar, "containerPort") == {"grpc": 8081}
    assert "http" not in _ports(service, "port")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["tcpSocket"] == {"port": "grpc"}, probe


@pytest.mark.parametrize("serve", [{"http_port": 8080}, {"http_port": 0, "grpc_port": 0}])
def test_no_grpc_port_without_the_key(serve: dict[str, int]) -> None:
    sidecar, service = _serving(serve)
    assert "grpc" not in _ports(sidecar, "containerPort")
    assert "grpc" not in _ports(service, "port")
    assert bool(sidecar) == bool(serve["http_port"])


def test_one_port_for_both_sides_is_refused() -> None:
    with pytest.raises(ValueError, match="serve.grpc_port 8080 is serve.http_port"):
        Config.model_validate({"serve": {"http_port": 8080, "grpc_port": 8080}})
