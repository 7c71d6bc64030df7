"""The deployment files start the services the way the code understands them.

For the rendered Kubernetes manifests (every overlay, with and without CURVE) and for
deploy/docker-compose*.yml: every traci command line is accepted by the real CLI parser,
every TRACI_ variable names a config key and lands in the config, the config file they point
at is really mounted there, the experts' ids are exactly the run's views, and every port
(container ports, Service ports, probes, scrape annotations, PodMonitor, Prometheus targets)
is one the service actually listens on according to that config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.deploytools import (
    DEPLOY,
    GRAFANA,
    PROMETHEUS,
    ROOT,
    compose_files,
    compose_projects,
)
from tests.helpers.invocations import (
    Invocation,
    Resolved,
    compose_invocations,
    is_traci_service,
    k8s_invocations,
    parse,
    resolve,
)
from traci_ml.core import security
from traci_ml.core.config import load_config
from traci_ml.core.data import expert_count
from traci_ml.core.errors import ConfigError

Doc = dict[str, Any]


def resolve_all(invs: list[Invocation]) -> list[Resolved]:
    for inv in invs:
        if inv.parse_only:
            parse(inv)
    return [resolve(inv) for inv in invs if not inv.parse_only]


def check_ports(r: Resolved) -> None:
    """Container ports, probes and scrape annotations name ports the process listens on."""
    where, listening = r.inv.where, set(r.listening.values())
    for name, port in r.inv.container_ports.items():
        assert port in listening, f"{where}: port {name}={port}, but it listens on {r.listening}"
        if name in r.listening:  # named like what it is (metrics, zmq-experts, zmq-reducer)
            assert port == r.listening[name], f"{where}: port {name} is {port}"
    if r.command == "http":  # traci http (Open Inference Protocol): probed on its own port
        assert set(r.inv.probe_ports) <= set(r.listening.values()), f"{where}: probes"
        return
    assert r.metrics_port, f"{where}: metrics are off, but probes and Prometheus need them"
    for port in [*r.inv.probe_ports, *r.inv.scrape_ports]:
        assert port == r.metrics_port, (
            f"{where}: probes/scrapes {port}, metrics on {r.metrics_port}"
        )
    assert r.inv.host_network or not security.is_loopback(r.config.metrics.bind), (
        f"{where}: metrics.bind is {r.config.metrics.bind}: probes and Prometheus cannot reach it"
    )


def check_cluster(resolved: list[Resolved], label: str) -> tuple[Resolved, list[Resolved]]:
    """One broker, one reducer, one expert per view; all on the same run. Returns
    (broker, peers)."""
    by_command: dict[str, list[Resolved]] = {"broker": [], "reducer": [], "expert": [], "http": []}
    for r in resolved:
        by_command[r.command].append(r)
    assert len(by_command["broker"]) == 1, f"{label}: {len(by_command['broker'])} brokers"
    assert len(by_command["reducer"]) == 1, f"{label}: {len(by_command['reducer'])} reducers"
    broker = by_command["broker"][0]
    n = broker.n_experts
    ids = sorted(r.expert_id for r in by_command["expert"])
    assert ids == list(range(n)), (
        f"{label}: experts {ids}, but the run config has {n} views (replicas must match)"
    )
    shared = ("run_id", "seed", "embed_dim", "data", "train")
    for r in resolved:
        for key in shared:
            mine, theirs = getattr(r.config, key), getattr(broker.config, key)
            assert mine == theirs, f"{r.inv.where}: {key} differs from the broker's"
        for key in ("expert_port", "reducer_port"):
            mine, theirs = getattr(r.config.network, key), getattr(broker.config.network, key)
            assert mine == theirs, f"{r.inv.where}: network.{key} {mine} != broker's {theirs}"
    # not the http sidecar: the curve component gives it no client key pair yet (a known
    # gap, docs/serving.md: under CURVE its /infer cannot reach the front door)
    curve = {r.inv.where: r.config.security.curve_dir is not None for r in resolved
             if r.command != "http"}  # fmt: skip
    assert len(set(curve.values())) == 1, f"{label}: CURVE on for some services only: {curve}"
    # The broker must bind where peers can reach it, and be allowed to (CURVE or --insecure).
    net = broker.config.network
    reachable = broker.inv.host_network or not security.is_loopback(net.bind_host)
    assert reachable, f"{label}: the broker binds {net.bind_host}, out of its peers' reach"
    try:
        security.check_bind(
            f"tcp://{net.bind_host}:{net.expert_port}",
            curve=broker.config.security.curve_dir is not None,
            insecure=broker.config.security.insecure,
        )
    except ConfigError as exc:
        raise AssertionError(f"{broker.inv.where}: {exc}") from None
    return broker, [r for r in resolved if r is not broker]


def peer_port(peer: Resolved) -> tuple[str, int]:
    """The broker socket a peer connects to: (listening name, port in its config)."""
    if peer.command == "expert":
        return "zmq-experts", peer.config.network.expert_port
    return "zmq-reducer", peer.config.network.reducer_port


# ---- Kubernetes ---------------------------------------------------------------------------


def test_k8s_commands_env_ports_and_cluster_agree_with_the_code(
    k8s_variants, tmp_path: Path
) -> None:
    for label, docs in k8s_variants:
        resolved = resolve_all(k8s_invocations(docs, tmp_path, label))
        for r in resolved:
            check_ports(r)
        broker, peers = check_cluster(resolved, label)
        services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
        for peer in peers:
            check_k8s_route(peer, broker, services)
        check_pod_monitors(docs, resolved)
        if label.endswith("+curve"):
            check_curve_keys(broker, [p for p in peers if p.command != "http"])  # gap: above


def check_k8s_route(peer: Resolved, broker: Resolved, services: dict[str, Doc]) -> None:
    """network.broker_host is a Service that selects the broker pod and forwards the port the
    peer dials to the broker's socket for it."""
    host = peer.config.network.broker_host.split(".")[0]  # broker or broker.traci.svc...
    where = peer.inv.where
    assert host in services, f"{where}: broker_host {host!r} is no Service"
    svc = services[host]
    assert svc["spec"]["selector"].items() <= broker.inv.labels.items(), (
        f"{where}: Service {host} does not select the broker pod"
    )
    socket, port = peer_port(peer)
    ports = [p for p in svc["spec"]["ports"] if p["port"] == port]
    assert ports, f"{where}: dials {host}:{port}, which Service {host} does not offer"
    target = ports[0].get("targetPort", port)
    target = broker.inv.container_ports.get(target, target) if isinstance(target, str) else target
    assert target == broker.listening[socket], (
        f"{where}: {host}:{port} forwards to {target}, the broker's {socket} is "
        f"{broker.listening[socket]}"
    )


def check_pod_monitors(docs: list[Doc], resolved: list[Resolved]) -> None:
    for monitor in (d for d in docs if d["kind"] == "PodMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        chosen = [r for r in resolved if selector.items() <= r.inv.labels.items()
                  and r.command != "http"]  # the broker pod's sidecar has no metrics  # fmt: skip
        assert {r.command for r in chosen} == {"broker", "reducer", "expert"}
        for r in chosen:
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                port = r.inv.container_ports.get(endpoint["port"])
                assert port == r.metrics_port, f"PodMonitor scrapes {r.inv.where} on {port}"


def check_curve_keys(broker: Resolved, peers: list[Resolved]) -> None:
    """The keys each pod finds at security.curve_dir load through the real security module:
    the broker its pair and authorized/ with every peer, each peer its own pair."""

    def mounted(r: Resolved):  # noqa: ANN202
        path = r.inv.resolve_path(r.config.security.curve_dir)
        assert path is not None and path.is_dir(), f"{r.inv.where}: no keys mounted"
        sec = r.config.security.model_copy(update={"curve_dir": str(path)})
        return r.config.model_copy(update={"security": sec})

    config = mounted(broker)
    keys = security.broker_keys(config)
    admitted = sorted(p.name for p in keys.authorized.glob("*.key"))
    expected = sorted(
        f"{name}.key" for name in [*security.peer_names(broker.n_experts), security.CLIENT]
    )  # the front door's client key is admitted too (its own role, docs/security.md)
    assert admitted == expected, f"the broker admits {admitted}"
    secrets = sorted(p.name for p in Path(config.security.curve_dir).rglob("*.key_secret"))
    assert secrets == ["broker.key_secret"], f"the broker pod holds {secrets}"
    for peer in peers:
        name = "reducer" if peer.command == "reducer" else f"expert-{peer.expert_id}"
        config = mounted(peer)
        assert security.peer_keys(config, name) is not None
        held = {p.name for p in Path(config.security.curve_dir).rglob("*.key_secret")}
        assert "broker.key_secret" not in held, f"{peer.inv.where} holds the broker's secret"


# ---- docker compose -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> list[tuple[str, dict[str, Any]]]:
    if not compose_files():
        pytest.skip(
            "deploy/docker-compose*.yml do not exist yet: nothing to check against the CLI "
            "(the Kubernetes and Prometheus checks still run)"
        )
    return compose_projects()


def test_compose_commands_env_ports_and_cluster_agree_with_the_code(compose) -> None:
    for label, project in compose:
        resolved = resolve_all(compose_invocations(project, label))
        for r in resolved:
            check_ports(r)
        broker, peers = check_cluster(resolved, label)
        names = {broker.inv.workload, broker.inv.hostname}
        names |= set(_aliases(project["services"][broker.inv.workload]))
        for peer in peers:
            host = peer.config.network.broker_host
            if peer.inv.host_network and broker.inv.host_network and security.is_loopback(host):
                continue  # both on the host's network
            assert host in names, f"{peer.inv.where}: broker_host {host!r}, broker is {names}"


def _aliases(service: dict[str, Any]) -> list[str]:
    networks = service.get("networks") or {}
    return [a for n in networks.values() if n for a in n.get("aliases", [])]


def test_compose_prometheus_scrapes_every_service_on_its_metrics_port(compose) -> None:
    targets = static_targets()
    for label, project in compose:
        resolved = resolve_all(compose_invocations(project, label))
        expected = {f"{r.inv.workload}:{r.metrics_port}" for r in resolved if r.command != "http"}
        assert expected <= targets, f"{label}: prometheus.yml misses {expected - targets}"
        traci_services = {n for n, s in project["services"].items() if is_traci_service(s)}
        for target in targets - expected:
            host = target.split(":")[0]
            assert host not in traci_services, f"{label}: prometheus.yml scrapes {target}"


def test_compose_mounts_the_monitoring_config_where_it_is_read(compose) -> None:
    dashboards = yaml.safe_load((GRAFANA / "provisioning/dashboards/traci.yml").read_text())
    dash_path = dashboards["providers"][0]["options"]["path"]
    wanted = {
        "grafana": [
            ("/etc/grafana/provisioning", GRAFANA / "provisioning"),
            (dash_path, GRAFANA / "dashboards"),
        ],
        "prometheus": [
            ("/etc/prometheus/prometheus.yml", PROMETHEUS / "prometheus.yml"),
            ("/etc/prometheus/rules", PROMETHEUS / "rules"),  # rule_files: rules/*.rules.yml
        ],
    }
    for label, project in compose:
        for name, svc in project["services"].items():
            image = str(svc.get("image", "")).rsplit("/", 1)[-1].split(":")[0]
            volumes = svc.get("volumes", [])
            binds = {v["target"]: Path(v["source"]) for v in volumes if v["type"] == "bind"}
            for target, source in wanted.get(image, []):
                if target.endswith("/prometheus.yml"):
                    flags = [c for c in svc.get("command") or [] if c.startswith("--config.file=")]
                    target = flags[0].split("=", 1)[1] if flags else target
                assert _mounted(binds, target) == source.resolve(), (
                    f"{label} service {name}: {target} is not {source.relative_to(ROOT)}"
                )


def _mounted(binds: dict[str, Path], path: str) -> Path | None:
    for target in sorted(binds, key=len, reverse=True):
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return (binds[target] / Path(path).relative_to(target)).resolve()
    return None


# ---- Prometheus's static targets ----------------------------------------------------------


def static_targets() -> set[str]:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    return {
        t
        for job in config["scrape_configs"]
        if job["job_name"].startswith("traci-")
        for group in job["static_configs"]
        for t in group["targets"]
    }


def test_prometheus_targets_are_the_default_runs_services_and_ports() -> None:
    """broker:9100, reducer:9101, expert-<i>:9110+i for every view of the default run."""
    config = load_config(ROOT / "examples" / "digits.yaml", env={})
    m = config.metrics
    expected = {f"broker:{m.broker_port}", f"reducer:{m.reducer_port}"}
    expected |= {f"expert-{i}:{m.expert_base_port + i}" for i in range(expert_count(config))}
    assert static_targets() == expected


def test_the_deploy_folder_has_what_the_docs_name() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for section in ("## Kubernetes", "## Monitoring"):
        assert section in readme
    assert "kubectl apply -k deploy/k8s/overlays/gpu" in readme


# ---- the checks themselves catch what they are for ----------------------------------------


def fake_project() -> dict[str, Any]:
    """A normalised compose project of the default run that passes every check."""
    config = [{"source": "run", "target": "/etc/traci/run.yaml"}]
    env = {"TRACI_NETWORK__BROKER_HOST": "broker", "TRACI_METRICS__BIND": "0.0.0.0"}

    def service(command: list[str], port: int, **extra_env: str) -> dict[str, Any]:
        return {
            "image": "traci:latest",
            "command": [*command, "--config", "/etc/traci/run.yaml"],
            "environment": {**env, **extra_env},
            "configs": config,
            "ports": [{"target": port}],
        }

    services = {
        "broker": service(["broker", "--insecure"], 9100, TRACI_NETWORK__BIND_HOST="0.0.0.0"),
        "reducer": service(["reducer"], 9101),
    }
    for i in range(4):
        services[f"expert-{i}"] = service(["expert", "--id", str(i)], 9110 + i)
    return {"services": services, "configs": {"run": {"file": str(ROOT / "examples/digits.yaml")}}}


def check_project(project: dict[str, Any]) -> None:
    resolved = resolve_all(compose_invocations(project, "fake"))
    for r in resolved:
        check_ports(r)
    check_cluster(resolved, "fake")


@pytest.mark.parametrize(
    ("mistake", "message"),
    [
        (lambda s: s["expert-1"]["command"].__setitem__(1, "--idd"), "traci rejects"),
        (lambda s: s["expert-1"]["environment"].update(TRACI_NETWORK__BROKER_HOSTT="b"),
         "unknown config key 'network.broker_hostt'"),
        (lambda s: s["expert-1"]["environment"].update(TRACI_METRICS__EXPERT_BASE_PORT="x"),
         "expert_base_port"),
        (lambda s: s["expert-2"]["ports"].__setitem__(0, {"target": 9110}), "port port-9110"),
        (lambda s: s.pop("expert-3"), "experts [0, 1, 2]"),
        (lambda s: s.update({"expert-4": {**s.pop("expert-3"), "ports": [{"target": 9114}],
                                          "command": ["expert", "--id", "4", "--config",
                                                      "/etc/traci/run.yaml"]}}),
         "experts [0, 1, 2, 4]"),
        (lambda s: s["broker"]["command"].remove("--insecure"), "refusing to bind 0.0.0.0"),
        (lambda s: s["reducer"]["environment"].update(TRACI_METRICS__BIND="127.0.0.1"),
         "metrics.bind is 127.0.0.1"),
        (lambda s: s["reducer"]["command"].__setitem__(2, "/etc/traci/other.yaml"),
         "no file mounted there"),
        (lambda s: s["broker"]["command"].extend(["--set", "metrics.bind=127.0.0.1"]),
         "TRACI_METRICS__BIND is overridden"),
    ],
)  # fmt: skip
def test_the_checks_catch_mistakes(mistake, message: str) -> None:
    check_project(fake_project())  # the unbroken project passes
    project = fake_project()
    mistake(project["services"])
    with pytest.raises(AssertionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_project(project)
