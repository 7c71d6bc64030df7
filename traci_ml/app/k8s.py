"""``traci deploy k8s CONFIG``: the kustomize tree of one run, generated from its config.

The tree has ``deploy/k8s``'s shape -- ``base/``, ``overlays/{cpu,gpu}``, ``components/{curve,
monitoring}`` -- with what depends on the run written for it:

* ``base/run-config.yaml``: the run config (the ConfigMap every pod reads); with files, each
  data path where the pods see it (``/var/lib/traci/data/<file>``);
* ``base/experts.yaml``: the expert StatefulSet's ``replicas`` = the number of data views;
* ``components/curve``: one key per expert in the Secret, the broker's ``authorized/`` and
  the experts' mounts;
* the user's expert modules (``model.module`` outside ``traci_ml``) go into
  ``components/modules``: a ConfigMap mounted at ``/opt/traci/user`` on the expert pods, with
  ``PYTHONPATH`` set;
* a run that reads files gets ``components/data``, switched on in both overlays: every pod
  that reads a file (expert *i*: its party's file; the reducer: the labels; with one csv
  table every service) gets its own volume ``data`` at ``/var/lib/traci/data`` and an init
  container ``data`` that waits until that pod's file is there, saying which ``kubectl cp``
  puts it there. No pod ever holds another party's file.

``deploy/k8s`` is this generator's output for ``examples/digits.yaml`` (``traci deploy k8s
examples/digits.yaml --out deploy/k8s``; tests/deploy/test_generate_k8s.py keeps them
identical). No sockets here; nothing is applied.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from traci_ml.app.compose import (
    DEPLOY,
    REPO,
    data_files,
    run_config_with,
    user_modules,
    write_files,
)
from traci_ml.app.k8s_text import (
    POD_DATA,
    DataPod,
    copy_lines,
    data_component,
    modules_component,
    run_config_text,
)
from traci_ml.core.config import Config, load_config
from traci_ml.core.data import expert_count
from traci_ml.core.errors import ConfigError

K8S = DEPLOY / "k8s"


def data_pods(config: Config) -> tuple[list[DataPod], dict[str, Any]]:
    """(the pods that read files, with the file each waits for; the run config with the
    paths the pods see, {} when the run reads no file)."""
    files = data_files(config)
    if not files:
        return [], {}
    pods: dict[str, DataPod] = {}  # StatefulSet -> its pods' files, the reducer first
    for f in files:
        kind, _, ordinal = f.service.partition("-")
        pods.setdefault(kind, DataPod(kind, {})).files[int(ordinal or 0)] = f.host
    return list(pods.values()), run_config_with(config, files, lambda f: f"{POD_DATA}/{f.name}")


def render_tree(config_path: Path) -> dict[str, str]:
    """Path (relative to the tree) -> text of every file of the run's kustomize tree."""
    return _render(config_path)[0]


def _render(config_path: Path) -> tuple[dict[str, str], list[DataPod]]:
    """(the tree's files, the pods that wait for a file)."""
    config = load_config(config_path, env={})
    n = expert_count(config)
    files: dict[str, str] = {}
    for path in sorted(K8S.rglob("*")):
        rel = path.relative_to(K8S).as_posix()
        if (
            path.is_file()
            and not rel.startswith("components/data/")
            and (not rel.startswith("components/curve/keys/") or rel.endswith(".gitignore"))
        ):
            files[rel] = path.read_text()
    pods, run_config = data_pods(config)
    files["base/run-config.yaml"] = run_config_text(config_path, run_config)
    files["base/experts.yaml"] = _one(
        files["base/experts.yaml"], r"\n  replicas: \d+\n", f"\n  replicas: {n}\n"
    )
    files["base/experts.yaml"] = _one(
        files["base/experts.yaml"],
        r"# must equal the number of data views in the run config \([^)]*\)",
        f"# must equal the number of data views in the run config ({n} for this run)",
    )
    _curve(files, n)
    modules = user_modules(config)
    extra = []
    if pods:
        files.update(data_component(pods))
        extra.append("  - ../../components/data  # this run's files\n")
    if modules:
        files.update(modules_component(modules))
        extra.append("  - ../../components/modules  # this run's expert modules\n")
    for overlay in ("cpu", "gpu"):
        key = f"overlays/{overlay}/kustomization.yaml"
        files[key] = _one(files[key], r"\ncomponents:\n", "\ncomponents:\n" + "".join(extra))
    return files, pods


def _one(text: str, pattern: str, replacement: str) -> str:
    out, count = re.subn(pattern, lambda _: replacement, text)
    if count != 1:
        raise RuntimeError(f"deploy/k8s changed: {pattern!r} matched {count} times, not once")
    return out


def _curve(files: dict[str, str], n: int) -> None:
    """One key per expert in the CURVE component's three lists."""
    experts = range(n)
    kust = "components/curve/kustomization.yaml"
    keys = "".join(f"      - keys/expert-{i}.key\n      - keys/expert-{i}.key_secret\n"
                   for i in experts)  # fmt: skip
    files[kust] = _one(files[kust], r"(      - keys/expert-\d+\.key(_secret)?\n)+", keys)
    broker = "components/curve/broker.yaml"
    auth = "".join(f"              - {{key: expert-{i}.key, path: authorized/expert-{i}.key}}\n"
                   for i in experts)  # fmt: skip
    files[broker] = _one(
        files[broker], r"(              - \{key: expert-\d+\.key, path: [^}]*\}\n)+", auth
    )
    mounts = "components/curve/experts.yaml"
    own = "".join(f"              - {{key: expert-{i}.key_secret, path: expert-{i}.key_secret}}\n"
                  for i in experts)  # fmt: skip
    files[mounts] = _one(
        files[mounts], r"(              - \{key: expert-\d+\.key_secret, [^}]*\}\n)+", own
    )


def generate_k8s(config_path: Path, out: Path) -> tuple[list[Path], list[str]]:
    """Write the run's kustomize tree into ``out``; returns (the files written, the ``kubectl
    cp`` lines that put each pod's file in place)."""
    if out.resolve() == K8S.resolve() and Path(config_path).resolve() != (
        REPO / "examples" / "digits.yaml"
    ):
        raise ConfigError("deploy/k8s is the digits run's tree: write yours elsewhere (--out)")
    files, pods = _render(config_path)
    return write_files(out, files), copy_lines(pods)
