"""``traci deploy k8s CONFIG``: the kustomize tree of one run, generated from its config.

Training runs as Jobs, serving the finished run as Deployments, both over the same volumes
(k8s_objects.py). The tree::

    base/          namespace, run config (ConfigMap), broker Service + NetworkPolicy, volumes
    train/         base + one Job per process: broker, reducer, expert-<i>
    serve/         base + one Deployment per process, started with --serve
    components/    cpu, gpu (devices), monitoring (PodMonitor, PrometheusRule), curve (keys
                   per role), data (this run's files, when it reads any), modules (the
                   user's expert modules, when it has any)
    overlays/      cpu, gpu (train), cpu-serve, gpu-serve (serve)

* ``base/run-config.yaml``: the run config; with files, each data path where the pods see it
  (``/var/lib/traci/data/<file>``);
* one expert Job and Deployment per data view, each with its own volume;
* ``components/curve``: one key per expert in the Secret, the broker's ``authorized/``, and
  each pod only its own secret key;
* ``components/data``: every process that reads a file (expert *i*: its party's file; the
  reducer: the labels; with one csv table the reducer and every expert) gets its own volume
  at ``/var/lib/traci/data`` and an init container ``data`` that waits until the file is
  there. No pod ever holds another party's file;
* ``components/modules``: a ConfigMap of the user's module files at ``/opt/traci/user`` on
  the expert pods, with ``PYTHONPATH`` set.

``deploy/k8s`` is this generator's output for ``examples/digits.yaml`` (``traci deploy k8s
examples/digits.yaml --out deploy/k8s``; tests/deploy/test_generate_k8s.py keeps them
identical). No sockets here; nothing is applied.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from traci_ml.app import k8s_objects as obj
from traci_ml.app.compose import (
    DEPLOY,
    REPO,
    data_files,
    run_config_with,
    user_modules,
    write_files,
)
from traci_ml.app.k8s_components import (
    POD_DATA,
    DataPod,
    curve_component,
    data_component,
    modules_component,
)
from traci_ml.app.k8s_text import (
    BASE,
    device_components,
    dump,
    overlay,
    phase_kustomization,
    run_config_text,
)
from traci_ml.core.config import Config, load_config
from traci_ml.core.data import expert_count
from traci_ml.core.errors import ConfigError

K8S = DEPLOY / "k8s"
# Files of deploy/k8s that do not depend on the run: copied as they are.
STATIC = (
    "base/namespace.yaml",
    "base/network-policy.yaml",
    "components/monitoring/kustomization.yaml",
    "components/monitoring/pod-monitor.yaml",
    "components/monitoring/prometheus-rule.yaml",
    "components/curve/keys/.gitignore",
)
JOBS_HEAD = """# Training: one Job per TRACI process. Written by `traci deploy k8s`
# (k8s_objects.py). Each pod runs --resume: a replaced pod continues from its checkpoint.
"""
SERVE_HEAD = """# Serving the finished run: one Deployment per TRACI process, each started with
# --serve on the volume its Job trained into. Written by `traci deploy k8s` (k8s_objects.py).
"""


def data_pods(config: Config) -> tuple[list[DataPod], dict[str, Any]]:
    """(the processes that read files, with the file each waits for; the run config with the
    paths the pods see, {} when the run reads no file)."""
    files = data_files(config)
    if not files:
        return [], {}
    role = lambda service: service.partition("-")[0]  # noqa: E731
    pods = [DataPod(f.service, role(f.service), f.host) for f in files]
    return pods, run_config_with(config, files, lambda f: f"{POD_DATA}/{f.name}")


def render_tree(config_path: Path) -> dict[str, str]:
    """Path (relative to the tree) -> text of every file of the run's kustomize tree."""
    return _render(config_path)[0]


def _render(config_path: Path) -> tuple[dict[str, str], list[DataPod]]:
    config = load_config(config_path, env={})
    n = expert_count(config)
    procs = obj.names(n)
    files = {rel: (K8S / rel).read_text() for rel in STATIC}
    pods, run_config = data_pods(config)
    files["base/kustomization.yaml"] = BASE
    files["base/run-config.yaml"] = run_config_text(config_path, run_config)
    files["base/broker-service.yaml"] = dump(
        obj.broker_service(config),
        head="# Where the experts and the reducer reach the broker "
        "(TRACI_NETWORK__BROKER_HOST=broker)\n# and clients its front door, "
        "whether a Job (training) or a Deployment (serving) runs it.\n",
    )
    files["base/volumes.yaml"] = dump(
        *obj.run_volumes(n),
        head="# The run directory of the reducer and of each expert (checkpoints, accounts, "
        "summary):\n# written by its Job, read by its Deployment when serving.\n",
    )
    files["train/kustomization.yaml"] = phase_kustomization("train")
    files["train/jobs.yaml"] = dump(*(obj.job(config, *p) for p in procs), head=JOBS_HEAD)
    files["serve/kustomization.yaml"] = phase_kustomization("serve")
    files["serve/deployments.yaml"] = dump(
        *(obj.deployment(config, *p) for p in procs), head=SERVE_HEAD
    )
    files.update(device_components())
    port = obj.ports(config, "broker")[-1]["containerPort"]
    secure = {serve: [a for a in obj.args("broker", None, port, serve) if a != "--insecure"]
              for serve in (False, True)}  # fmt: skip
    sidecar = bool(config.serve.http_port or config.serve.grpc_port)  # k8s_objects.pod_template
    files.update(curve_component(n, secure, sidecar=sidecar))
    extra = []
    if pods:
        files.update(data_component(pods))
        extra.append("data  # this run's files")
    modules = user_modules(config)
    if modules:
        files.update(modules_component(modules))
        extra.append("modules  # this run's expert modules")
    for hardware in ("cpu", "gpu"):
        for phase, suffix in (("train", ""), ("serve", "-serve")):
            path = f"overlays/{hardware}{suffix}/kustomization.yaml"
            files[path] = overlay(hardware, phase, extra)
    return files, pods


def generate_k8s(config_path: Path, out: Path) -> tuple[list[Path], list[str]]:
    """Write the run's kustomize tree into ``out``; returns (the files written, the ``kubectl
    cp`` lines that put each pod's file in place)."""
    if out.resolve() == K8S.resolve() and Path(config_path).resolve() != (
        REPO / "examples" / "digits.yaml"
    ):
        raise ConfigError("deploy/k8s is the digits run's tree: write yours elsewhere (--out)")
    files, pods = _render(config_path)
    return write_files(out, files), [p.copy_line() for p in pods]
