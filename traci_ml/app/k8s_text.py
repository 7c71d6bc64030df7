# ruff: noqa: E501 (the files' own lines, as they are written)
"""The text of the files ``traci deploy k8s`` writes around the objects of k8s_objects.py: the
kustomizations (base, train, serve, the four overlays), the device components and the run
config the ConfigMap carries. No sockets here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

NS = "traci"


class _Dumper(yaml.SafeDumper):
    """Block style as people write manifests: lists indented under their key, no anchors."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(*objs: dict[str, Any], head: str = "") -> str:
    """YAML documents (``---`` between them), after a comment header."""
    body = yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return head + body


def run_config_text(config_path: Path, run_config: dict[str, Any]) -> str:
    head = f"""# The run every TRACI pod reads (ConfigMap traci-config, mounted at /etc/traci/config.yaml).
# Written by `traci deploy k8s {config_path}`. Where things run is not set here but
# in the pods' environment (TRACI_NETWORK__BROKER_HOST=broker, TRACI_METRICS__BIND=0.0.0.0, ...).
# The number of data views is the number of experts: the generator writes one Job and one
# Deployment per expert, and the CURVE keys, for exactly that many (deploy/README.md).
#
"""
    if not run_config:
        return head + Path(config_path).read_text()
    note = "# The data paths are where the pods see their files (components/data).\n"
    return head + note + yaml.safe_dump(run_config, sort_keys=False)


BASE = f"""# What training and serving share: the namespace, the run config (a ConfigMap whose name
# carries a hash of the content), the broker's Service and NetworkPolicy, and the volumes
# that hold each reducer's and expert's run directory (checkpoints, accounts, summary).
# ../train (Jobs) and ../serve (Deployments) add the processes; the overlays pick the
# hardware. See deploy/README.md, "Kubernetes".
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization

namespace: {NS}

resources:
  - namespace.yaml
  - broker-service.yaml
  - network-policy.yaml
  - volumes.yaml

configMapGenerator:
  - name: traci-config
    files:
      - config.yaml=run-config.yaml

labels:
  - pairs:
      app.kubernetes.io/part-of: traci
    includeTemplates: true
"""

_PHASE = {
    "train": (
        "jobs.yaml",
        """# Training: one Job per process (broker, reducer, expert-<i>). Each runs until the run is
# done and exits 0; the Job is then Complete and nothing restarts it. A pod that crashes or
# is killed is replaced and resumes from the checkpoint on its volume; a config, checkpoint or
# data error (exit 2 or 3) fails its Job at once instead of retrying.
#   kubectl -n traci wait --for=condition=complete job --all --timeout=24h
""",
    ),
    "serve": (
        "deployments.yaml",
        """# Serving the finished run: one Deployment per process, started with --serve (load the
# checkpoints on the same volumes, answer queries, train nothing). The broker is ready when
# its front door can answer (a reducer and a live expert): `traci health broker --ready`.
""",
    ),
}


def phase_kustomization(phase: str) -> str:
    resource, head = _PHASE[phase]
    return f"""{head}apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization

namespace: {NS}

resources:
  - ../base
  - {resource}

labels:
  - pairs:
      app.kubernetes.io/part-of: traci
    includeTemplates: true
"""


_HARDWARE = {
    "cpu": (
        "cpu",
        "CPU nodes: the CPU image (traci:cpu, see deploy/Dockerfile) and torch on the CPU",
    ),
    "gpu": (
        "latest",
        "GPU nodes: one GPU per expert (the CUDA image traci:latest, see deploy/Dockerfile)",
    ),
}


def overlay(hardware: str, phase: str, extra: list[str]) -> str:
    """overlays/<hardware>[-serve]/kustomization.yaml; ``extra``: the run's own components."""
    tag, what = _HARDWARE[hardware]
    name = hardware if phase == "train" else f"{hardware}-serve"
    verb = "Trains the run (Jobs)" if phase == "train" else "Serves the finished run (Deployments)"
    then = (
        f"\n# When every Job is complete: kubectl apply -k deploy/k8s/overlays/{hardware}-serve"
        if phase == "train"
        else f"\n# After overlays/{hardware} has trained it (the Jobs are complete)."
    )
    comps = "".join(f"  - ../../components/{c}\n" for c in extra)
    return f"""# {verb} on {what}.
#   kubectl apply -k deploy/k8s/overlays/{name}{then}
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization

# Also the namespace of what the components add (the CURVE Secret).
namespace: {NS}

resources:
  - ../../{phase}

components:
  - ../../components/{hardware}
  - ../../components/monitoring
{comps}  # - ../../components/curve     # CurveZMQ: generate the keys first (deploy/README.md)

images:
  - name: traci
    newTag: {tag}
"""


# A patch's kind and name are placeholders: the kustomization's target picks the Jobs or
# Deployments it applies to.
PLACEHOLDER = {"apiVersion": "apps/v1", "kind": "Deployment"}


def _env_patch(role: str, env: dict[str, str], *, pod: dict[str, Any] | None = None,
               resources: dict[str, Any] | None = None) -> str:  # fmt: skip
    """A patch of ``role``'s container environment (and resources), and of its pod spec."""
    container: dict[str, Any] = {"name": role,
                                 "env": [{"name": k, "value": v} for k, v in env.items()]}  # fmt: skip
    if resources:
        container["resources"] = resources
    spec = {**(pod or {}), "containers": [container]}
    return dump({**PLACEHOLDER, "metadata": {"name": role},
                 "spec": {"template": {"spec": spec}}})  # fmt: skip


def device_components() -> dict[str, str]:
    """components/cpu and components/gpu: the device settings of the expert (and reducer)
    pods, Job or Deployment alike."""
    cpu = """# torch on the CPU for the experts and the reducer (training Jobs and serving Deployments).
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component

patches:
  - path: expert.yaml
    target: {labelSelector: app.kubernetes.io/component=expert}
  - path: reducer.yaml
    target: {labelSelector: app.kubernetes.io/component=reducer}
"""
    gpu = """# Each expert pod gets one GPU (the NVIDIA device plugin makes it the pod's cuda:0) and
# tolerates the taint GPU node pools usually carry. expert.device=cuda (not auto): an expert
# that finds no GPU stops with an error instead of training on the CPU unnoticed. The reducer
# stays on the CPU (its Transformer over a handful of tokens is small); to give it a GPU too,
# patch it the same way.
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component

patches:
  - path: expert.yaml
    target: {labelSelector: app.kubernetes.io/component=expert}
"""
    toleration = {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]}  # fmt: skip
    return {
        "components/cpu/kustomization.yaml": cpu,
        "components/cpu/expert.yaml": _env_patch("expert", {"TRACI_EXPERT__DEVICE": "cpu"}),
        "components/cpu/reducer.yaml": _env_patch("reducer", {"TRACI_REDUCER__DEVICE": "cpu"}),
        "components/gpu/kustomization.yaml": gpu,
        "components/gpu/expert.yaml": _env_patch(
            "expert",
            {"TRACI_EXPERT__DEVICE": "cuda"},
            pod=toleration,
            resources={"limits": {"nvidia.com/gpu": 1}},
        ),  # fmt: skip
    }


def target(kind_free: dict[str, str]) -> str:
    """A kustomize patch target, written inline."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in kind_free.items()) + "}"


def by_role(role: str) -> str:
    """The target of every workload (Job or Deployment) of ``role``."""
    return target({"labelSelector": f"app.kubernetes.io/component={role}"})
