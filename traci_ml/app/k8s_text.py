# ruff: noqa: E501 (the files' own lines, as they are written)
"""The text of the run-specific files ``traci deploy k8s`` writes: the run config the
ConfigMap carries and the ``data`` component (a volume and a waiting init container for
every pod that reads a file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

POD_DATA = "/var/lib/traci/data"
USER = "/opt/traci/user"  # the user's expert modules (PYTHONPATH), as in compose
RUNS_SIZE = {"expert": "1Gi", "reducer": "2Gi"}  # base/*.yaml's run volumes (re-listed)


@dataclass
class DataPod:
    """A StatefulSet whose pods read files: ``files`` maps a pod's ordinal to its host file."""

    kind: str  # "expert" | "reducer" (the StatefulSet and its container)
    files: dict[int, str]

    def pod_name(self, ordinal: int) -> str:
        return f"{self.kind}-{ordinal}"


def run_config_text(config_path: Path, run_config: dict[str, Any]) -> str:
    head = f"""# The run every TRACI pod reads (ConfigMap traci-config, mounted at /etc/traci/config.yaml).
# Written by `traci deploy k8s {config_path}`. Where things run is not set here but
# in the pods' environment (TRACI_NETWORK__BROKER_HOST=broker, TRACI_METRICS__BIND=0.0.0.0, ...).
# The number of data views is the number of experts: the generator keeps the expert
# StatefulSet's replicas and the CURVE keys in step with it (deploy/README.md).
#
"""
    if not run_config:
        return head + Path(config_path).read_text()
    note = "# The data paths are where the pods see their files (components/data).\n"
    return head + note + yaml.safe_dump(run_config, sort_keys=False)


def _wait_script(pod: DataPod) -> str:
    cases = "".join(f'  {i}) f="{Path(host).name}" ;;\n' for i, host in sorted(pod.files.items()))
    return f"""i="${{HOSTNAME##*-}}"
case "$i" in
{cases}  *) echo "no data file is planned for $HOSTNAME"; exit 1 ;;
esac
p="{POD_DATA}/$f"
last=""
while true; do
  if [ -s "$p" ]; then
    size="$(stat -c %s "$p")"
    [ "$size" = "$last" ] && break
    last="$size"
  else
    echo "waiting for $p: kubectl -n traci cp YOUR_FILE $HOSTNAME:$p -c data"
  fi
  sleep 5
done
echo "data: $p is there ($last bytes)"
"""


def _patch(pod: DataPod) -> dict[str, Any]:
    claim = lambda name, size: {  # noqa: E731
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "traci"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
    }
    init = {
        "name": "data",
        "image": "traci",
        "imagePullPolicy": "IfNotPresent",
        "command": ["sh", "-c", _wait_script(pod)],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },  # fmt: skip
        "volumeMounts": [{"name": "data", "mountPath": POD_DATA}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": pod.kind},
        "spec": {
            "template": {"spec": {
                "initContainers": [init],
                "containers": [{"name": pod.kind, "volumeMounts": [
                    {"name": "data", "mountPath": POD_DATA, "readOnly": True}]}],
            }},
            # the list is replaced, not merged: the run volume is listed again
            "volumeClaimTemplates": [claim("runs", RUNS_SIZE[pod.kind]), claim("data", "1Gi")],
        },
    }  # fmt: skip


def data_component(pods: list[DataPod]) -> dict[str, str]:
    """components/data: path -> text."""
    lines = [f"#   {line}" for pod in pods for line in _cp_lines(pod)]
    kustomization = (
        "# This run's files, one volume per pod that reads one (written by `traci deploy k8s`).\n"
        "# Each pod waits in its init container `data` until its file is there; put them with\n"
        + "\n".join(lines)
        + "\n# (a pod's volume holds only its own file: no party's file reaches another's pod).\n"
        "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\n\npatches:\n"
        + "".join(f"  - path: {pod.kind}.yaml\n" for pod in pods)
    )
    files = {"components/data/kustomization.yaml": kustomization}
    for pod in pods:
        files[f"components/data/{pod.kind}.yaml"] = yaml.safe_dump(_patch(pod), sort_keys=False)
    return files


def _cp_lines(pod: DataPod) -> list[str]:
    return [f"kubectl -n traci cp {host} {pod.pod_name(i)}:{POD_DATA}/{Path(host).name} -c data"
            for i, host in sorted(pod.files.items())]  # fmt: skip


def copy_lines(pods: list[DataPod]) -> list[str]:
    """The ``kubectl cp`` commands that put every pod's file in place."""
    return [line for pod in pods for line in _cp_lines(pod)]


def modules_component(sources: list[Path]) -> dict[str, str]:
    """components/modules: the user's expert modules (package folders or module files) as a
    ConfigMap mounted at /opt/traci/user on the expert pods, with PYTHONPATH set. The
    experts share one pod template, so every expert pod gets them (code, not data)."""
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
        "configMapGenerator:\n  - name: traci-user-modules\n    namespace: traci\n    files:\n"
        + "".join(f"      - files/{key}\n" for key, _, _ in entries)
        + "\npatches:\n  - path: expert.yaml\n"
    )
    patch = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "expert"},
        "spec": {"template": {"spec": {
            "containers": [{"name": "expert",
                            "env": [{"name": "PYTHONPATH", "value": USER}],
                            "volumeMounts": [{"name": "user-modules", "mountPath": USER,
                                              "readOnly": True}]}],
            "volumes": [{"name": "user-modules", "configMap": {
                "name": "traci-user-modules",
                "items": [{"key": key, "path": rel} for key, rel, _ in entries]}}],
        }}},
    }  # fmt: skip
    files["components/modules/kustomization.yaml"] = kustomization
    files["components/modules/expert.yaml"] = yaml.safe_dump(patch, sort_keys=False)
    return files
