"""deploy/k8s: every overlay renders with `kubectl kustomize`, passes kubernetes-validate's
strict schemas, and holds what the deployment promises: training as Jobs that end for good,
serving as Deployments on the same volumes, one broker and one reducer, an expert per view
with its own volume and a GPU where asked, probes and resources everywhere, CURVE from a
Secret."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from tests.helpers.deploytools import (
    K8S,
    OVERLAYS,
    PROMETHEUS,
    binary,
    find,
    kubectl,
    render,
    run,
    workloads,
)

# Kinds kubernetes-validate has no schema for that these manifests may use: the Prometheus
# Operator's CRDs (their content is checked by the tests below and by promtool instead).
KNOWN_CRDS = {
    ("monitoring.coreos.com/v1", kind)
    for kind in ("PodMonitor", "ServiceMonitor", "PrometheusRule")
}
K8S_VERSIONS = ("1.28.0", kubernetes_validate.utils.latest_version())

Doc = dict[str, Any]


def validate_strict(docs: list[Doc], versions: tuple[str, ...] = K8S_VERSIONS) -> list[str]:
    """kubernetes-validate --strict over every object; a kind without a schema is an error
    unless it is a known Prometheus Operator CRD. Returns the errors."""
    errors = []
    for doc in docs:
        kind, api = doc.get("kind"), doc.get("apiVersion")
        name = f"{kind}/{doc.get('metadata', {}).get('name')}"
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                errors.append(f"{name} (Kubernetes {version}): {path}: {exc.message}")
            except SchemaNotFoundError:
                if (api, kind) not in KNOWN_CRDS:
                    errors.append(f"{name}: no schema for {api} {kind}")
                break
    return errors


def containers(docs: list[Doc]) -> list[tuple[str, Doc]]:
    return [
        (f"{w['kind']}/{w['metadata']['name']}", c)
        for w in workloads(docs)
        for c in w["spec"]["template"]["spec"]["containers"]
    ]


def pod_selector(doc: Doc) -> dict[str, str] | None:
    """The pod labels a Service, PodMonitor or NetworkPolicy selects on (None: not one)."""
    if doc["kind"] == "Service":
        return doc["spec"]["selector"]
    if doc["kind"] == "PodMonitor":
        return doc["spec"]["selector"]["matchLabels"]
    if doc["kind"] == "NetworkPolicy":
        return doc["spec"]["podSelector"]["matchLabels"]
    return None


def expected(overlay: str, n_experts: int = 4) -> list[tuple[str, str]]:
    """What an overlay renders: the shared objects, and one Job (training overlays) or one
    Deployment (the -serve overlays) per process, each reducer and expert with its volume."""
    kind = "Deployment" if overlay.endswith("-serve") else "Job"
    names = ["broker", "reducer", *(f"expert-{i}" for i in range(n_experts))]
    return [
        ("Namespace", "traci"),
        ("Service", "broker"),
        ("PodMonitor", "traci"),
        ("PrometheusRule", "traci"),
        ("NetworkPolicy", "broker-zmq"),
        *((kind, name) for name in names),
        *(("PersistentVolumeClaim", f"runs-{name}") for name in names[1:]),
    ]


def by_name(docs: list[Doc], name: str) -> Doc:
    """The one workload called ``name`` (a Job or a Deployment)."""
    (found,) = [w for w in workloads(docs) if w["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_part_in_one_namespace(overlay: str) -> None:
    docs = render(K8S / "overlays" / overlay)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert set(expected(overlay)) == {k for k in kinds if k[0] not in ("ConfigMap",)}, overlay
    configs = [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"]
    assert [c.rsplit("-", 1)[0] for c in configs] == ["traci-config"], configs
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "traci", f"{d['kind']}/{d['metadata']['name']}"


def test_there_is_a_training_and_a_serving_overlay_per_hardware() -> None:
    assert OVERLAYS == ["cpu", "cpu-serve", "gpu", "gpu-serve"]


def test_every_variant_passes_strict_schema_validation(k8s_variants) -> None:
    for label, docs in k8s_variants:
        errors = validate_strict(docs)
        assert not errors, f"{label}:\n" + "\n".join(errors)


def test_the_validation_wrapper_rejects_unknown_kinds_and_fields() -> None:
    unknown = {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "x"}}
    assert validate_strict([unknown]) == [
        "Certificate/x: no schema for cert-manager.io/v1 Certificate"
    ]
    typo = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s"},
        "spec": {"ports": [{"port": 1, "targetport": 1}]},
    }
    assert validate_strict([typo], ("1.28.0",)), "a misspelt field passed strict validation"
    crd = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "p"},
    }
    assert validate_strict([crd]) == []


READY = ["traci", "health", "broker", "--ready", "--config", "/etc/traci/config.yaml"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_resources_probes_and_no_privileges(overlay: str) -> None:
    docs = render(K8S / "overlays" / overlay)
    for where, c in containers(docs):
        requests, limits = c["resources"].get("requests", {}), c["resources"].get("limits", {})
        assert {"cpu", "memory"} <= requests.keys(), f"{where}: requests {requests}"
        assert "memory" in limits, f"{where}: no memory limit"
        if c["name"] == "http":  # the serving broker's sidecar: the Open Inference Protocol
            assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live", where
            assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready", where
            continue
        assert c["livenessProbe"]["httpGet"]["path"] == "/metrics", where
        if where == "Deployment/broker":  # serving: ready = the front door can answer
            assert c["readinessProbe"]["exec"]["command"] == READY
        else:
            assert c["readinessProbe"]["httpGet"]["path"] == "/metrics", where
        ctx = c["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
        assert c["imagePullPolicy"] == "IfNotPresent", f"{where}: pulls {c['image']} every start"
    for w in workloads(docs):
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["enableServiceLinks"] is False, "service links inject variables into every pod"


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_training_jobs_end_for_good_and_fail_fast_on_hopeless_errors(overlay: str) -> None:
    """A finished run is Complete, not restarted (no restart loop, no stalled-steps alert); a
    crashed pod is replaced and resumes; exit 2 (config, checkpoint) or 3 (data) fails the Job
    at once; evictions do not count."""
    from traci_ml.app.supervisor import CONFIG_ERROR, DATA_ERROR

    for job in workloads(render(K8S / "overlays" / overlay)):
        name = job["metadata"]["name"]
        assert job["kind"] == "Job", name
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never", name  # podFailurePolicy requires it
        rules = job["spec"]["podFailurePolicy"]["rules"]
        fail = next(r for r in rules if r["action"] == "FailJob")["onExitCodes"]
        assert fail["operator"] == "In" and set(fail["values"]) == {CONFIG_ERROR, DATA_ERROR}
        assert fail["containerName"] == pod["containers"][0]["name"], name
        evicted = [{"type": "DisruptionTarget", "status": "True"}]
        assert {"action": "Ignore", "onPodConditions": evicted} in rules
        assert job["spec"]["backoffLimit"] >= 1
        args = pod["containers"][0]["args"]
        assert "--serve" not in args and ("--resume" in args) == (name != "broker"), name


@pytest.mark.parametrize("overlay", ["cpu-serve", "gpu-serve"])
def test_serving_deployments_run_the_finished_run_one_pod_each(overlay: str) -> None:
    for d in workloads(render(K8S / "overlays" / overlay)):
        name = d["metadata"]["name"]
        assert d["kind"] == "Deployment", name
        assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate", name
        args = d["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--serve" in args and "--resume" not in args, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_process_keeps_its_run_on_its_own_volume(overlay: str) -> None:
    """Training and serving of one name mount the same claim: serving reads what training
    wrote; no two processes share one."""
    docs = render(K8S / "overlays" / overlay)
    claims = []
    for w in workloads(docs):
        name, pod = w["metadata"]["name"], w["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["workingDir"] == "/var/lib/traci", "run_dir runs/{run_id} is relative"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        if name == "broker":
            assert "runs" not in mounts
            continue
        assert mounts["runs"] == "/var/lib/traci/runs", name
        claim = volumes["runs"]["persistentVolumeClaim"]["claimName"]
        assert claim == f"runs-{name}", name
        find(docs, "PersistentVolumeClaim", claim)
        claims.append(claim)
    assert len(claims) == len(set(claims)) == 5


@pytest.mark.parametrize("phase", ["", "-serve"])
def test_gpu_overlay_gives_each_expert_one_gpu_and_cpu_overlay_none(phase: str) -> None:
    gpu = render(K8S / "overlays" / f"gpu{phase}")
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for w in workloads(gpu):
        pod, name = w["spec"]["template"]["spec"], w["metadata"]["name"]
        limits = pod["containers"][0]["resources"].get("limits", {})
        if name.startswith("expert-"):
            assert limits["nvidia.com/gpu"] == 1 and toleration in pod["tolerations"], name
        else:
            assert "nvidia.com/gpu" not in limits, name
        assert pod["containers"][0]["image"] == "traci:latest", name
    for where, c in containers(render(K8S / "overlays" / f"cpu{phase}")):
        assert c["image"] == "traci:cpu", where
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_select_the_pods_they_are_meant_for(overlay: str) -> None:
    docs = render(K8S / "overlays" / overlay)
    pods = {
        w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs)
    }
    for w in workloads(docs):
        if w["kind"] == "Job":
            assert "selector" not in w["spec"], "a Job's selector is generated"
            continue
        selector = w["spec"]["selector"]["matchLabels"]
        chosen = [name for name, labels in pods.items() if selector.items() <= labels.items()]
        assert chosen == [w["metadata"]["name"]], f"{w['metadata']['name']} selects {chosen}"
    for d in docs:
        selector = pod_selector(d)
        if selector is None:
            continue
        where = f"{d['kind']}/{d['metadata']['name']}"
        chosen = [name for name, labels in pods.items() if selector.items() <= labels.items()]
        assert chosen, f"{where} selects no pod"
        if d["kind"] == "Service":
            assert chosen == [d["metadata"]["name"]], f"{where} selects {chosen}"


def test_prometheus_rule_is_the_rules_file(tmp_path: Path) -> None:
    """The PrometheusRule carries exactly deploy/prometheus/rules/traci.rules.yml, and promtool
    accepts it as a rules file."""
    rule = find(render(K8S / "overlays" / OVERLAYS[0]), "PrometheusRule", "traci")
    rules_file = yaml.safe_load((PROMETHEUS / "rules" / "traci.rules.yml").read_text())
    assert rule["spec"] == rules_file, "PrometheusRule and rules/traci.rules.yml differ"
    path = tmp_path / "from-k8s.rules.yml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    run([binary("promtool"), "check", "rules", str(path)])


def test_pod_monitor_scrapes_the_named_metrics_port_with_the_component_label() -> None:
    monitor = find(render(K8S / "overlays" / OVERLAYS[0]), "PodMonitor", "traci")
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == ["metrics"]
    targets = {r["targetLabel"] for r in endpoints[0]["relabelings"]}
    assert "component" in targets, "alerts and dashboard select on component=..."


def test_curve_variant_drops_insecure_and_mounts_the_secret(k8s_variants) -> None:
    for label, docs in k8s_variants:
        curve = label.endswith("+curve")
        broker = by_name(docs, "broker")["spec"]["template"]["spec"]["containers"][0]
        assert ("--insecure" in broker["args"]) != curve, label
        assert len([d for d in docs if d["kind"] == "Secret"]) == (1 if curve else 0), label
        for where, c in containers(docs):  # the serving broker's http sidecar too
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            curve_dir = env.get("TRACI_SECURITY__CURVE_DIR")
            assert (curve_dir == "/run/secrets/traci-curve") == curve, (where, c["name"])


def test_curve_sidecar_holds_the_client_key_and_none_of_the_brokers(curve_tree: Path) -> None:
    """`traci http` is a front-door client: with CURVE on it needs the client's secret key and
    the broker's public key (else it connects in plaintext to a CURVE broker and the pod is
    never ready), in a volume of its own, so the broker's secret key stays in the broker's
    container."""
    for overlay in ("cpu-serve", "gpu-serve"):
        docs = render(curve_tree / "overlays" / overlay)
        secret = next(d for d in docs if d["kind"] == "Secret")
        assert "client.key_secret" in secret["data"], overlay
        pod = by_name(docs, "broker")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounted = {c["name"]: {m["name"] for m in c["volumeMounts"]} for c in pod["containers"]}
        assert "curve-client" in mounted["http"] and "curve" not in mounted["http"], overlay
        assert "curve-client" not in mounted["broker"], overlay
        items = {i["path"] for i in volumes["curve-client"]["secret"]["items"]}
        assert items == {"broker.key", "client.key_secret"}, overlay
        assert "client.key_secret" not in {i["path"] for i in volumes["curve"]["secret"]["items"]}


def test_curve_component_without_keys_fails_loudly(tmp_path: Path, curve_tree: Path) -> None:
    """Turning CURVE on without generating keys is an error, not pods without keys."""
    copy = tmp_path / "k8s"
    shutil.copytree(curve_tree, copy)
    (copy / "components" / "curve" / "keys" / "broker.key_secret").unlink()
    argv = [kubectl(), "kustomize", str(copy / "overlays" / "gpu")]
    proc = subprocess.run(argv, capture_output=True, text=True)
    assert proc.returncode != 0 and "broker.key_secret" in proc.stderr, proc.stderr


def test_curve_keys_stay_out_of_git() -> None:
    ignore = (K8S / "components" / "curve" / "keys" / ".gitignore").read_text().splitlines()
    assert "*" in ignore and "!.gitignore" in ignore


def test_no_volume_is_mounted_inside_another(k8s_variants) -> None:
    """ConfigMap and Secret volumes are read-only: the runtime cannot create a mount point
    inside one, so a pod with nested mounts never starts."""
    for label, docs in k8s_variants:
        for where, c in containers(docs):
            paths = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
            nested = [(a, b) for a in paths for b in paths if a != b and b.startswith(a)]
            assert not nested, f"{label} {where}: {nested}"
