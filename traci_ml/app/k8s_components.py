# ruff: noqa: E501 (the files' own lines, as they are written)
"""The run-specific components of ``traci deploy k8s``: ``data`` (a volume and a waiting init
container for every pod that reads a file), ``modules`` (the user's expert modules as a
ConfigMap) and ``curve`` (CurveZMQ keys from a Secret, each pod only its own). Each patches
the Job and the Deployment of the same name alike (the kustomization's targets select by the
``traci.dev/workload`` label), so training and serving see the same files and keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from traci_ml.app.k8s_objects import WORKLOAD, claim
from traci_ml.app.k8s_text import NS, PLACEHOLDER, by_role, dump, target

POD_DATA = "/var/lib/traci/data"
USER = "/opt/traci/user"  # the user's expert modules (PYTHONPATH), as in compose
CURVE = "/run/secrets/traci-curve"  # the path docker-compose.curve.yml uses too


@dataclass(frozen=True)
class DataPod:
    """A process that reads a file: ``name`` ("reducer", "expert-<i>"), its role and the
    host file it waits for."""

    name: str
    role: str
    host: str

    @property
    def file(self) -> str:
        return f"{POD_DATA}/{Path(self.host).name}"

    def copy_line(self) -> str:
        """The ``kubectl cp`` that puts the file in place (the pod's name is looked up: a Job's
        or a Deployment's pod is named <name>-<random>)."""
        pod = (
            f"$(kubectl -n {NS} get pod -l {WORKLOAD}={self.name} -o name | head -n1 | cut -d/ -f2)"
        )
        return f'kubectl -n {NS} cp {self.host} "{pod}:{self.file}" -c data'


def _wait_script(pod: DataPod) -> str:
    return f"""p="{pod.file}"
last=""
while true; do
  if [ -s "$p" ]; then
    size="$(stat -c %s "$p")"
    [ "$size" = "$last" ] && break
    last="$size"
  else
    echo "waiting for $p: kubectl -n {NS} cp YOUR_FILE $HOSTNAME:$p -c data"
  fi
  sleep 5
done
echo "data: $p is there ($last bytes)"
"""


def _data_patch(pod: DataPod) -> dict[str, Any]:
    init = {
        "name": "data",
        "image": "traci",
        "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", _wait_script(pod)],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "data", "mountPath": POD_DATA}],
    }  # fmt: skip
    return {**PLACEHOLDER, "metadata": {"name": pod.name}, "spec": {"template": {"spec": {
        "initContainers": [init],
        "containers": [{"name": pod.role, "volumeMounts": [
            {"name": "data", "mountPath": POD_DATA, "readOnly": True}]}],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": f"data-{pod.name}"}}],
    }}}}  # fmt: skip


def data_component(pods: list[DataPod]) -> dict[str, str]:
    """components/data: path -> text."""
    lines = "".join(f"#   {pod.copy_line()}\n" for pod in pods)
    kustomization = (
        "# This run's files, one volume per process that reads one (written by `traci deploy k8s`).\n"
        "# Each pod waits in its init container `data` until its file is there; put them with\n"
        f"{lines}"
        "# (a pod's volume holds only its own file: no party's file reaches another's pod). The\n"
        "# files stay on the volumes: the serving pods and a replaced pod find them there.\n"
        "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\n\n"
        "resources:\n  - volumes.yaml\n\npatches:\n"
        + "".join(f"  - path: {p.name}.yaml\n    target: {target({'labelSelector': f'{WORKLOAD}={p.name}'})}\n"
                  for p in pods)
    )  # fmt: skip
    files = {
        "components/data/kustomization.yaml": kustomization,
        "components/data/volumes.yaml": dump(*(claim(f"data-{p.name}", "1Gi") for p in pods)),
    }
    for pod in pods:
        files[f"components/data/{pod.name}.yaml"] = dump(_data_patch(pod))
    return files


def modules_component(sources: list[Path]) -> dict[str, str]:
    """components/modules: the user's expert modules (package folders or module files) as a
    ConfigMap mounted at /opt/traci/user on every expert pod, with PYTHONPATH set (code, not
    data: every expert gets all of them)."""
    entries: list[tuple[str, str, str]] = []  # (ConfigMap key, path under /opt/traci/user, text)
    for src in sources:
        found = sorted(src.rglob("*.py")) if src.is_dir() else [src]
        for f in found:
            if "__pycache__" in f.parts:
                continue
            rel = (Path(src.name) / f.relative_to(src)).as_posix() if src.is_dir() else f.name
            entries.append((rel.replace("/", "."), rel, f.read_text()))
    files = {f"components/modules/files/{key}": text for key, _, text in entries}
    kustomization = (
        "# The user's expert modules (written by `traci deploy k8s` from the run config's\n"
        "# model.module entries): a ConfigMap mounted at /opt/traci/user on the expert pods.\n"
        "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\n\n"
        f"configMapGenerator:\n  - name: traci-user-modules\n    namespace: {NS}\n    files:\n"
        + "".join(f"      - files/{key}\n" for key, _, _ in entries)
        + f"\npatches:\n  - path: expert.yaml\n    target: {by_role('expert')}\n"
    )
    patch = {**PLACEHOLDER, "metadata": {"name": "expert"}, "spec": {"template": {"spec": {
        "containers": [{"name": "expert",
                        "env": [{"name": "PYTHONPATH", "value": USER}],
                        "volumeMounts": [{"name": "user-modules", "mountPath": USER, "readOnly": True}]}],
        "volumes": [{"name": "user-modules", "configMap": {
            "name": "traci-user-modules", "items": [{"key": k, "path": rel} for k, rel, _ in entries]}}],
    }}}}  # fmt: skip
    files["components/modules/kustomization.yaml"] = kustomization
    files["components/modules/expert.yaml"] = dump(patch)
    return files


def _curve_mount(container: str, volume: str, items: list[tuple[str, str]], args: list[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """A container's patch (CURVE_DIR and the mount) and the Secret volume it mounts, which
    holds only ``items`` (key in the Secret, path under CURVE)."""
    patch: dict[str, Any] = {"name": container}
    if args is not None:
        patch["args"] = args
    patch["env"] = [{"name": "TRACI_SECURITY__CURVE_DIR", "value": CURVE}]
    patch["volumeMounts"] = [{"name": volume, "mountPath": CURVE, "readOnly": True}]
    secret = {"secretName": "traci-curve", "defaultMode": 0o440,
              "items": [{"key": k, "path": p} for k, p in items]}  # fmt: skip
    return patch, {"name": volume, "secret": secret}


def _curve_patch(name: str, mounts: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    return dump({**PLACEHOLDER, "metadata": {"name": name}, "spec": {"template": {"spec": {
        "containers": [c for c, _ in mounts], "volumes": [v for _, v in mounts]}}}})  # fmt: skip


def curve_component(
    n_experts: int, broker_args: dict[bool, list[str]], *, sidecar: bool = False
) -> dict[str, str]:
    """components/curve: the Secret of every role's keys and, per process, a mount of only the
    files its role needs (the broker: its pair and authorized/; a peer: its own secret key and
    the broker's public key); the broker drops --insecure. ``broker_args``: the broker's args
    without --insecure, for training (False) and serving (True). ``sidecar``: the serving
    broker's pod runs ``traci http``, a front-door client: it gets a volume of its own with
    the client's secret key and the broker's public key (none of the broker's keys)."""
    experts = [f"expert-{i}" for i in range(n_experts)]
    keys = ["broker.key", "broker.key_secret", "reducer.key", "reducer.key_secret", "client.key"]
    keys += ["client.key_secret"] if sidecar else []
    keys += [f"{e}.{s}" for e in experts for s in ("key", "key_secret")]
    head = f"""# CurveZMQ between the broker and its peers (docs/security.md), keys from a Secret.
#
#   traci keys generate deploy/k8s/components/curve/keys --config deploy/k8s/base/run-config.yaml
#
# then add this component to the overlays (the commented line in each). The keys stay out of
# git (keys/.gitignore). Every pod gets TRACI_SECURITY__CURVE_DIR={CURVE} holding only
# the files its role needs; the broker drops --insecure. `traci deploy k8s` writes one key
# pair per expert of the run (generate keys for that many: --config reads it). The Secret's
# name carries a hash of the keys: replacing or revoking one restarts the pods that mount it.
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component

secretGenerator:
  - name: traci-curve
    namespace: {NS}  # where base puts the pods that mount it
    files:
"""
    kust = head + "".join(f"      - keys/{k}\n" for k in keys) + "\npatches:\n"
    files: dict[str, str] = {}
    broker_items = [("broker.key", "broker.key"), ("broker.key_secret", "broker.key_secret"),
                    ("reducer.key", "authorized/reducer.key"),
                    ("client.key", "authorized/client.key")]  # the front door's client  # fmt: skip
    broker_items += [(f"{e}.key", f"authorized/{e}.key") for e in experts]
    client = [("broker.key", "broker.key"), ("client.key_secret", "client.key_secret")]
    for serve, args in broker_args.items():
        where = "broker-serve" if serve else "broker"
        kind = "Deployment" if serve else "Job"
        mounts = [_curve_mount("broker", "curve", broker_items, args)]
        if serve and sidecar:
            mounts.append(_curve_mount("http", "curve-client", client))
        files[f"components/curve/{where}.yaml"] = _curve_patch("broker", mounts)
        kust += f"  - path: {where}.yaml\n    target: {target({'kind': kind, 'name': 'broker'})}\n"
    peers = [("reducer", "reducer"), *((e, "expert") for e in experts)]
    for name, role in peers:
        items = [("broker.key", "broker.key"), (f"{name}.key_secret", f"{name}.key_secret")]
        files[f"components/curve/{name}.yaml"] = _curve_patch(
            name, [_curve_mount(role, "curve", items)]
        )
        kust += f"  - path: {name}.yaml\n    target: {target({'labelSelector': f'{WORKLOAD}={name}'})}\n"
    files["components/curve/kustomization.yaml"] = kust
    return files
