"""The Kubernetes objects of one run, as dicts: the training Jobs, the serving Deployments and
the volumes they share (``traci deploy k8s``, deploy/README.md "Kubernetes").

One object per TRACI process, named after it -- ``broker``, ``reducer``, ``expert-<i>`` -- once
as a Job (training: runs to completion, exit 0 = done, never restarted after it) and once as a
Deployment (serving the finished run with ``--serve``). Both kinds of the same name mount the
same volumes: ``runs-reducer`` and ``runs-expert-<i>`` (checkpoints, accounts, summary), so
serving reads what training wrote. Every pod carries ``traci.dev/workload: <name>``, which
selects it (a Deployment's selector, ``kubectl get pod -l``, the components' patches).

Ports come from the run config (``network.*``, ``metrics.*``); expert pods all serve metrics
on ``metrics.expert_base_port`` (each pod has its own address). No sockets here.
"""

from __future__ import annotations

from typing import Any

from traci_ml.core.config import Config
from traci_ml.core.errors import CONFIG_ERROR, DATA_ERROR, ConfigError

Obj = dict[str, Any]
CONFIG = "/etc/traci/config.yaml"
RUNS = "/var/lib/traci/runs"
WORKLOAD = "traci.dev/workload"  # the label naming a pod's Job / Deployment
# A service's exit codes that no restart can fix (core/errors.py, docs/reliability.md): a
# config or checkpoint error (2), a data error (3). The Jobs fail at once on them; a peer that
# timed out (1) or a crash is retried.
HOPELESS = [CONFIG_ERROR, DATA_ERROR]
RESOURCES = {
    "broker": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    "reducer": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
    "expert": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
}
RUNS_SIZE = {"reducer": "2Gi", "expert": "1Gi"}


def labels(role: str, name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "traci", "app.kubernetes.io/component": role, WORKLOAD: name}


def ports(config: Config, role: str) -> list[dict[str, Any]]:
    """The container's named ports; ``metrics`` is the one every probe and scrape uses."""
    net, m = config.network, config.metrics
    metrics = {"broker": m.broker_port, "reducer": m.reducer_port, "expert": m.expert_base_port}
    if not metrics[role]:
        key = {"broker": "broker_port", "reducer": "reducer_port", "expert": "expert_base_port"}
        raise ConfigError(f"metrics.{key[role]} is 0: the pods' probes and Prometheus need it")
    out = []
    if role == "broker":
        out = [{"name": "zmq-experts", "containerPort": net.expert_port},
               {"name": "zmq-reducer", "containerPort": net.reducer_port}]  # fmt: skip
        if net.serve_port:
            out.append({"name": "zmq-serve", "containerPort": net.serve_port})
    return [*out, {"name": "metrics", "containerPort": metrics[role]}]


def args(role: str, expert_id: int | None, metrics_port: int, serve: bool) -> list[str]:
    # --insecure: plaintext ZeroMQ inside the cluster network, fenced by the NetworkPolicy
    # broker-zmq; components/curve replaces it with CurveZMQ.
    out = [role, "--config", CONFIG]
    if role == "broker":
        out.append("--insecure")
    if role == "expert":
        out += ["--id", str(expert_id), "--metrics-port", str(metrics_port)]
    if serve:
        out.append("--serve")
    elif role != "broker":
        out.append("--resume")  # a replaced pod continues from its checkpoint
    return out


def container(config: Config, role: str, expert_id: int | None, serve: bool) -> Obj:
    port_list = ports(config, role)
    metrics = {"httpGet": {"path": "/metrics", "port": "metrics"}}
    env = [{"name": "TRACI_METRICS__BIND", "value": "0.0.0.0"}]
    if role == "broker":
        env.insert(0, {"name": "TRACI_NETWORK__BIND_HOST", "value": "0.0.0.0"})
    else:
        env.insert(0, {"name": "TRACI_NETWORK__BROKER_HOST", "value": "broker"})
    ready: Obj = {**metrics, "periodSeconds": 5}
    if role == "broker" and serve:  # ready = the front door can answer (a reducer, an expert)
        ready = {"exec": {"command": ["traci", "health", "broker", "--ready", "--config", CONFIG]},
                 "periodSeconds": 5, "timeoutSeconds": 5}  # fmt: skip
    mounts = [{"name": "config", "mountPath": "/etc/traci", "readOnly": True}]
    if role != "broker":
        mounts.append({"name": "runs", "mountPath": RUNS})
    mounts.append({"name": "tmp", "mountPath": "/tmp"})
    return {
        "name": role,
        "image": "traci",
        "imagePullPolicy": "IfNotPresent",
        "command": ["traci"],
        "args": args(role, expert_id, port_list[-1]["containerPort"], serve),
        "workingDir": "/var/lib/traci",  # run_dir runs/{run_id} is relative
        "env": env,
        "ports": port_list,
        "startupProbe": {**metrics, "periodSeconds": 2, "failureThreshold": 90},
        "readinessProbe": ready,
        "livenessProbe": {
            **metrics,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },  # fmt: skip
        # No CPU limit: throttling shows up as queue latency.
        "resources": RESOURCES[role],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },  # fmt: skip
        "volumeMounts": mounts,
    }


def http_container(config: Config) -> Obj:
    """The serving broker's sidecar: ``traci http``, the Open Inference Protocol (KServe v2
    REST on ``serve.http_port``, gRPC on ``serve.grpc_port``) in front of the front door; its
    /v2/health/ready is part of the pod's readiness (gRPC alone: the port accepting, as no
    gRPC health service is served). No run volume here: its metadata lists the ``id`` input
    only (no preprocess.json)."""
    s = config.serve
    ports = [{"name": "http", "containerPort": s.http_port}] if s.http_port else []
    if s.grpc_port:
        ports.append({"name": "grpc", "containerPort": s.grpc_port})
    tls = s.http_tls_cert is not None
    mutual = s.http_tls_client_ca is not None
    if s.http_port and not mutual:
        scheme = {"scheme": "HTTPS"} if tls else {}  # the health checks need no token
        live: Obj = {"httpGet": {"path": "/v2/health/live", "port": "http", **scheme}}
        ready: Obj = {"httpGet": {"path": "/v2/health/ready", "port": "http", **scheme}}
    else:  # kubelet's probes present no client certificate: the port accepting, then
        live = ready = {"tcpSocket": {"port": "http" if s.http_port else "grpc"}}
    # the pod's address is off loopback: plaintext without tokens only by --insecure, fenced
    # by the NetworkPolicy as the broker's ZeroMQ ports are (app/http_auth.py)
    secure = tls and (s.http_token_file is not None or mutual)
    return {
        "name": "http",
        "image": "traci",
        "imagePullPolicy": "IfNotPresent",
        "command": ["traci"],
        "args": ["http", "--config", CONFIG, *(() if secure else ("--insecure",))],
        "workingDir": "/var/lib/traci",
        "env": [
            {"name": "TRACI_SERVE__HTTP_BIND", "value": "0.0.0.0"},
            {"name": "TRACI_NETWORK__BROKER_HOST", "value": "broker"},
        ],  # fmt: skip
        "ports": ports,
        "startupProbe": {**live, "periodSeconds": 2, "failureThreshold": 30},
        "readinessProbe": {**ready, "periodSeconds": 5},
        "livenessProbe": {**live, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"memory": "512Mi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },  # fmt: skip
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/traci", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],  # fmt: skip
    }


def pod_template(config: Config, role: str, name: str, expert_id: int | None, serve: bool) -> Obj:
    main = container(config, role, expert_id, serve)
    metrics_port = main["ports"][-1]["containerPort"]  # ports(): "metrics" is the last
    volumes: list[Obj] = [{"name": "config", "configMap": {"name": "traci-config"}}]
    if role != "broker":
        volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": f"runs-{name}"}})
    volumes.append({"name": "tmp", "emptyDir": {}})
    spec: Obj = {
        "automountServiceAccountToken": False,
        # No <SERVICE>_PORT variables: a Service named traci-... would inject TRACI_* ones,
        # which the config would reject as unknown keys.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,  # a stop writes a checkpoint first
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                            "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [main],
        "volumes": volumes,
    }  # fmt: skip
    if not serve:
        spec["restartPolicy"] = "Never"  # a failed pod is replaced by the Job (podFailurePolicy)
    elif role == "broker" and (config.serve.http_port or config.serve.grpc_port):
        spec["containers"].append(http_container(config))
    return {
        "metadata": {
            "labels": labels(role, name),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(metrics_port),
                "prometheus.io/path": "/metrics",
            },  # fmt: skip
        },
        "spec": spec,
    }


def names(n_experts: int) -> list[tuple[str, str, int | None]]:
    """(role, object name, expert id) of every process of the run."""
    return [("broker", "broker", None), ("reducer", "reducer", None),
            *(("expert", f"expert-{i}", i) for i in range(n_experts))]  # fmt: skip


def job(config: Config, role: str, name: str, expert_id: int | None) -> Obj:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels(role, name)},
        "spec": {
            # A pod that crashes or is killed is replaced (up to 6 times) and resumes from its
            # checkpoint; a config, checkpoint or data error fails the Job at once; a node
            # drain or preemption does not count.
            "backoffLimit": 6,
            "podFailurePolicy": {"rules": [
                {"action": "FailJob",  # onPodConditions: [] for Kubernetes 1.28's schema
                 "onExitCodes": {"containerName": role, "operator": "In", "values": HOPELESS},
                 "onPodConditions": []},
                {"action": "Ignore",
                 "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            ]},
            "template": pod_template(config, role, name, expert_id, serve=False),
        },
    }  # fmt: skip


def deployment(config: Config, role: str, name: str, expert_id: int | None) -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels(role, name)},
        "spec": {
            "replicas": 1,
            # Never two at once: two brokers would split the peers, two reducers or experts
            # of one name would share a volume (ReadWriteOnce) and a broker slot.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {WORKLOAD: name}},
            "template": pod_template(config, role, name, expert_id, serve=True),
        },
    }


def claim(name: str, size: str) -> Obj:
    """A volume. Labelled with the app only: the components' patches select workloads by
    their component label, which a volume must not carry."""
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        # kubectl -n traci delete pvc -l app.kubernetes.io/name=traci: a fresh run next time
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "traci"}},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": size}}},
    }  # fmt: skip


def run_volumes(n_experts: int) -> list[Obj]:
    """Each reducer and expert keeps its run directory on a volume of its own."""
    return [claim(f"runs-{name}", RUNS_SIZE[role])
            for role, name, _ in names(n_experts) if role != "broker"]  # fmt: skip


def broker_service(config: Config) -> Obj:
    """Where the experts and the reducer reach the broker (TRACI_NETWORK__BROKER_HOST=broker),
    and clients its front door. Selects the broker's pod, Job or Deployment."""
    svc_ports = [{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"]}
                 for p in ports(config, "broker")]  # fmt: skip
    for name in ("http", "grpc"):  # the serving Deployment's sidecar (Open Inference Protocol)
        port = getattr(config.serve, f"{name}_port")
        if port:
            svc_ports.append({"name": name, "port": port, "targetPort": name})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "broker", "labels": labels("broker", "broker")},
        "spec": {"selector": {WORKLOAD: "broker"}, "ports": svc_ports},
    }
