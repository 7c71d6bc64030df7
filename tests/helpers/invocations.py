"""Every ``traci`` process the deployment files start, and what the real CLI makes of it.

An ``Invocation`` is one container (per StatefulSet pod, since the ordinal is the expert id)
or one compose service: its argv, environment, hostname, ports, probes and the files it
would see at its mount paths. ``resolve`` runs it through ``traci_ml.app.cli`` exactly as the
container would: parse the arguments, resolve ``--id-from-hostname``, build the config from
the mounted file, the environment and the flags, and returns what it would listen on.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import posixpath
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from tests.helpers.deploytools import DEPLOY
from traci_ml.app import cli
from traci_ml.core.config import ENV_PREFIX, Config
from traci_ml.core.data import expert_count

PathResolver = Callable[[str], Path | None]


@dataclass
class Invocation:
    where: str  # for messages: "overlays/gpu StatefulSet/expert pod expert-2"
    workload: str  # compose service or Kubernetes workload name
    argv: list[str]  # arguments after `traci`
    env: dict[str, str]
    resolve_path: PathResolver  # container path -> the file a test can read
    hostname: str | None = None
    container_ports: dict[str, int] = field(default_factory=dict)  # name -> port
    probe_ports: list[int] = field(default_factory=list)
    scrape_ports: list[int] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # pod labels (Kubernetes)
    parse_only: bool = False  # a healthcheck command: the parser must accept it, no more
    host_network: bool = False  # shares the host's network: loopback addresses are fine


@dataclass
class Resolved:
    inv: Invocation
    command: str  # broker | reducer | expert
    expert_id: int | None
    config: Config
    listening: dict[str, int]  # what it binds: zmq-experts, zmq-reducer, zmq-serve, metrics

    @property
    def metrics_port(self) -> int | None:
        return self.listening.get("metrics")

    @property
    def n_experts(self) -> int:
        return expert_count(self.config)


class Mismatch(AssertionError):
    pass


# ---- the image ----------------------------------------------------------------------------


def dockerfile() -> tuple[list[str], list[str], dict[str, str]]:
    """ENTRYPOINT, CMD and ENV of deploy/Dockerfile (["traci"] when there is none yet)."""
    path = DEPLOY / "Dockerfile"
    entry, cmd, env = ["traci"], [], {}
    if not path.exists():
        return entry, cmd, env
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENTRYPOINT":
            entry = yaml.safe_load(rest)
        elif word == "CMD":
            cmd = yaml.safe_load(rest)
        elif word == "ENV":
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                if sep:
                    env[key] = value
    return entry, cmd, env


def traci_argv(where: str, argv: list[str]) -> list[str]:
    if not argv or posixpath.basename(argv[0]) != "traci":
        raise Mismatch(f"{where}: runs {argv!r}, not the traci command")
    return argv[1:]


# ---- resolving one invocation through the real CLI ----------------------------------------


def parse(inv: Invocation) -> Any:
    """``traci_ml.app.cli.build_parser().parse_args`` of the invocation's argv."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return cli.build_parser().parse_args(inv.argv)
    except SystemExit:
        raise Mismatch(f"{inv.where}: traci rejects {inv.argv}: {stderr.getvalue()}") from None


def resolve(inv: Invocation) -> Resolved:
    args = parse(inv)
    if args.command not in (*cli.SERVICES, "http"):  # http: the Open Inference Protocol
        raise Mismatch(f"{inv.where}: `traci {args.command}` is not a service")
    if getattr(args, "id_from_hostname", False):
        if inv.hostname is None:
            raise Mismatch(f"{inv.where}: --id-from-hostname, but the host name is not fixed")
        args.expert_id = cli.expert_id_from_hostname(inv.hostname)
    if args.config:
        mapped = inv.resolve_path(args.config)
        if mapped is None or not mapped.is_file():
            raise Mismatch(f"{inv.where}: --config {args.config} is no file mounted there")
        args.config = str(mapped)
    traci_env = {k: v for k, v in inv.env.items() if k.startswith(ENV_PREFIX)}
    other_env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    try:
        with mock.patch.dict(os.environ, {**other_env, **traci_env}, clear=True):
            config = cli.config_from_args(args)
    except Exception as exc:  # ConfigError, or a flag combination the CLI refuses
        raise Mismatch(f"{inv.where}: traci {' '.join(inv.argv)}: {exc}") from None
    _check_env_lands(inv, traci_env, args, config)
    expert_id = getattr(args, "expert_id", None)
    ports = listening(args.command, config, expert_id)
    return Resolved(inv, args.command, expert_id, config, ports)


def _check_env_lands(inv: Invocation, env: dict[str, str], args: Any, config: Config) -> None:
    """Each TRACI_ variable names a config key, and its value is what the service runs with
    (not silently replaced by a flag)."""
    from traci_ml.core.config import _scalar, parse_set

    flags = set(parse_set(args.overrides))
    for name, value in env.items():
        key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if key in flags:
            raise Mismatch(f"{inv.where}: {name} is overridden by --set {key}")
        node: Any = config
        for part in key.split("."):
            node = getattr(node, part)
        node = node.model_dump() if hasattr(node, "model_dump") else node
        if node != _scalar(value):
            raise Mismatch(f"{inv.where}: {name}={value!r}, but {key} is {node!r} (a flag wins)")


def listening(command: str, config: Config, expert_id: int | None) -> dict[str, int]:
    net, metrics = config.network, config.metrics
    if command == "broker":
        ports = {"zmq-experts": net.expert_port, "zmq-reducer": net.reducer_port}
        ports["zmq-serve"] = net.serve_port  # 0: the front door is off
        ports["metrics"] = metrics.broker_port
    elif command == "reducer":
        ports = {"metrics": metrics.reducer_port}
    elif command == "http":  # traci http: no metrics of its own
        ports = {"http": config.serve.http_port}
    else:
        base = metrics.expert_base_port
        ports = {"metrics": base + (expert_id or 0) if base else 0}
    return {k: v for k, v in ports.items() if v}


# ---- Kubernetes ---------------------------------------------------------------------------


def k8s_invocations(docs: list[dict[str, Any]], root: Path, label: str) -> list[Invocation]:
    """One invocation per traci container (per pod of a StatefulSet); each pod's mounted
    ConfigMaps and Secrets are written under ``root`` so the config and keys can be read."""
    entry, cmd, image_env = dockerfile()
    by_kind: dict[str, dict[str, dict[str, Any]]] = {"ConfigMap": {}, "Secret": {}}
    for doc in docs:
        if doc["kind"] in by_kind:
            by_kind[doc["kind"]][doc["metadata"]["name"]] = doc
    out = []
    for w in docs:
        if w["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        name, template = w["metadata"]["name"], w["spec"]["template"]
        spec = template["spec"]
        replicas = w["spec"].get("replicas", 1)
        pods = [f"{name}-{i}" for i in range(replicas)] if w["kind"] == "StatefulSet" else [name]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            where = f"{label} {w['kind']}/{name} container {c['name']}"
            argv = traci_argv(where, (c.get("command") or entry) + (c.get("args") or cmd))
            env = dict(image_env)
            for e in c.get("env", []):
                if "value" in e:
                    env[e["name"]] = str(e["value"])
                elif e["name"].startswith(ENV_PREFIX):
                    raise Mismatch(f"{where}: {e['name']} comes from valueFrom: not checkable")
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef", {}).get("name")
                env.update(by_kind["ConfigMap"].get(ref, {}).get("data", {}))
            ports = {p.get("name", str(p["containerPort"])): p["containerPort"]
                     for p in c.get("ports", [])}  # fmt: skip
            probes = [c[p]["httpGet"]["port"] for p in _PROBES if "httpGet" in c.get(p, {})]
            for p in _PROBES:
                if p in c and "exec" in c[p]:  # e.g. traci health broker --ready
                    out.append(Invocation(
                        where=f"{where} {p}", workload=name, resolve_path=lambda _: None,
                        argv=traci_argv(f"{where} {p}", c[p]["exec"]["command"]), env={},
                        parse_only=True,
                    ))  # fmt: skip
                elif p in c and "httpGet" not in c[p]:
                    raise Mismatch(f"{where}: {p} is neither an HTTP probe nor a traci command")
            annotations = template["metadata"].get("annotations", {})
            scrape = [int(v) for k, v in annotations.items() if k == "prometheus.io/port"]
            for pod in pods:
                pod_root = root / label.replace("/", "_") / pod / c["name"]
                mounts = _materialize(where, pod_root, spec, c, by_kind)
                out.append(Invocation(
                    where=f"{where}" + (f" pod {pod}" if len(pods) > 1 or pod != name else ""),
                    workload=name, argv=argv, env=env,
                    resolve_path=_resolver(mounts),
                    hostname=pod if w["kind"] == "StatefulSet" else None,
                    container_ports=ports,
                    probe_ports=[ports[p] if isinstance(p, str) else p for p in probes],
                    scrape_ports=scrape,
                    labels=template["metadata"].get("labels", {}),
                ))  # fmt: skip
    return out


_PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _materialize(where: str, pod_root: Path, spec: dict, container: dict, by_kind: dict) -> dict:
    """Write each mounted ConfigMap/Secret under pod_root; returns mountPath -> host dir."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {}
    for m in container.get("volumeMounts", []):
        target = pod_root / m["mountPath"].lstrip("/")
        files = _volume_files(where, volumes.get(m["name"], {}), by_kind)
        if "subPath" in m:
            files = {"": files[m["subPath"]]} if m["subPath"] in files else {}
        if not files:  # emptyDir, a PersistentVolumeClaim
            target.mkdir(parents=True, exist_ok=True)
        for rel, data in files.items():
            path = target / rel if rel else target
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        mounts[m["mountPath"]] = target
    return mounts


def _volume_files(where: str, volume: dict, by_kind: dict) -> dict[str, bytes]:
    sources = []
    if "configMap" in volume:
        sources.append(("ConfigMap", volume["configMap"]))
    if "secret" in volume:
        sources.append(("Secret", {**volume["secret"], "name": volume["secret"]["secretName"]}))
    for src in volume.get("projected", {}).get("sources", []):
        for kind, key in (("ConfigMap", "configMap"), ("Secret", "secret")):
            if key in src:
                sources.append((kind, src[key]))
    files: dict[str, bytes] = {}
    for kind, ref in sources:
        obj = by_kind[kind].get(ref["name"])
        if obj is None:
            if ref.get("optional"):
                continue
            raise Mismatch(f"{where}: mounts {kind} {ref['name']}, which is not in the manifests")
        data = {k: v.encode() for k, v in obj.get("data", {}).items()}
        if kind == "Secret":
            data = {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}
        items = ref.get("items")
        if items is None:
            files.update(data)
            continue
        for item in items:
            if item["key"] not in data:
                raise Mismatch(f"{where}: {kind} {ref['name']} has no key {item['key']}")
            files[item["path"]] = data[item["key"]]
    return files


def _resolver(mounts: dict[str, Path]) -> PathResolver:
    def resolve_path(path: str) -> Path | None:
        path = posixpath.normpath(path)
        for mount in sorted(mounts, key=len, reverse=True):
            if path == mount:
                return mounts[mount]
            if path.startswith(mount.rstrip("/") + "/"):
                return mounts[mount] / posixpath.relpath(path, mount)
        return None

    return resolve_path


# ---- docker compose -----------------------------------------------------------------------


def is_traci_service(service: dict[str, Any]) -> bool:
    image = str(service.get("image", "")).rsplit("/", 1)[-1].split(":")[0]
    return image == "traci" or (image == "" and "build" in service)


def compose_invocations(project: dict[str, Any], label: str) -> list[Invocation]:
    entry, cmd, image_env = dockerfile()
    out = []
    for name, svc in project["services"].items():
        if not is_traci_service(svc):
            continue
        where = f"{label} service {name}"
        argv = traci_argv(where, (svc.get("entrypoint") or entry) + (svc.get("command") or cmd))
        env = dict(image_env)
        env.update({k: str(v) for k, v in (svc.get("environment") or {}).items() if v is not None})
        published = [int(p["target"]) for p in svc.get("ports", [])]
        exposed = [int(str(e).split("/")[0]) for e in svc.get("expose", []) if "-" not in str(e)]
        inv = Invocation(
            where=where, workload=name, argv=argv, env=env,
            resolve_path=_resolver(compose_mounts(project, svc)),
            hostname=svc.get("hostname"),
            container_ports={f"port-{p}": p for p in [*exposed, *published]},
            host_network=svc.get("network_mode") == "host",
        )  # fmt: skip
        out.append(inv)
        test = (svc.get("healthcheck") or {}).get("test") or []
        health = test[1:] if test[:1] == ["CMD"] else []
        if test[:1] == ["CMD-SHELL"]:
            health = shlex.split(test[1])
        if health and posixpath.basename(health[0]) == "traci":
            out.append(Invocation(where=f"{where} healthcheck", workload=name,
                                  argv=health[1:], env=env, resolve_path=inv.resolve_path,
                                  hostname=inv.hostname, parse_only=True))  # fmt: skip
    return out


def compose_mounts(project: dict[str, Any], service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts, configs and secrets."""
    volumes = service.get("volumes", [])
    mounts = {v["target"]: Path(v["source"]) for v in volumes if v["type"] == "bind"}
    for kind, default_dir in (("configs", "/"), ("secrets", "/run/secrets")):
        for ref in service.get(kind, []):
            source = (project.get(kind) or {}).get(ref["source"], {})
            if "file" in source:
                target = ref.get("target") or ref["source"]
                mounts[posixpath.join(default_dir, target)] = Path(source["file"])
    return mounts
