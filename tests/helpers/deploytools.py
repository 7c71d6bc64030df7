"""Helpers of the deployment tests: where deploy/ is, the tools they need (kubectl, promtool,
docker-compose), rendering kustomize overlays and compose files, and the metric names the
services export versus the ones a PromQL expression reads.

A missing tool skips its tests on a developer's machine but fails them in CI (``CI=true``),
where deploy/ci/install-monitoring.sh must have installed it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
IN_CI = os.environ.get("CI", "").lower() == "true"
MIN_KUSTOMIZE = 5  # the manifests use components, labels and patches (kustomize v5)


def missing(what: str) -> None:
    """Skip on a developer's machine, fail in CI: a test that cannot run there is a gap."""
    if IN_CI:
        pytest.fail(f"{what}; CI installs it with deploy/ci/install-monitoring.sh")
    pytest.skip(what)


def binary(name: str) -> str:
    """Path of ``name`` on PATH (or in this venv's bin)."""
    venv_bin = str(Path(sys.executable).parent)
    found = shutil.which(name) or shutil.which(name, path=venv_bin)
    if found is None:
        missing(f"{name} is not installed")
    return found  # type: ignore[return-value]


def run(argv: list[str], *, cwd: Path | None = None, timeout: float = 120) -> str:
    """Run a tool; a non-zero exit fails the test with its output."""
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


# ---- kubectl kustomize --------------------------------------------------------------------


@functools.cache
def kubectl() -> str:
    """kubectl with kustomize >= v5 built in ($KUBECTL, else the one on PATH)."""
    path = os.environ.get("KUBECTL") or binary("kubectl")
    proc = subprocess.run([path, "version", "--client"], capture_output=True, text=True)
    found = re.search(r"Kustomize Version: v(\d+)\S*", proc.stdout)
    if found is None or int(found.group(1)) < MIN_KUSTOMIZE:
        version = found.group(0) if found else "no kustomize version"
        missing(f"{path} reports {version!r}: the manifests need kustomize v{MIN_KUSTOMIZE}+")
    return path


@functools.cache
def _render(path: str) -> str:
    return run([kubectl(), "kustomize", path])


def render(path: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize PATH`` renders (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_render(str(path))) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in the rendered manifests")


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


# ---- docker compose -----------------------------------------------------------------------


def compose_files() -> list[Path]:
    return sorted([*DEPLOY.glob("docker-compose*.yml"), *DEPLOY.glob("docker-compose*.yaml")])


def compose_projects() -> list[tuple[str, dict[str, Any]]]:
    """Every way the compose files are meant to be used, normalised by ``docker-compose
    config`` (interpolation, anchors, merges): the base file alone and the base with each
    override file. Empty when there are no compose files."""
    files = compose_files()
    if not files:
        return []
    base = next((f for f in files if f.stem == "docker-compose"), files[0])
    combos = [[base]] + [[base, f] for f in files if f != base]
    compose = binary("docker-compose")
    # Variables a file insists on (${NAME:?...}) get a stand-in: only their place is checked.
    required = {m for f in files for m in re.findall(r"\$\{(\w+):?\?", f.read_text())}
    env = {**os.environ, **{name: f"stand-in-for-{name}" for name in required}}
    out = []
    for combo in combos:
        argv = [compose, "--project-directory", str(DEPLOY)]
        for f in combo:
            argv += ["-f", str(f)]
        proc = subprocess.run([*argv, "config", "--format", "json"], capture_output=True,
                              text=True, cwd=DEPLOY, env=env, timeout=120)  # fmt: skip
        label = " + ".join(f.name for f in combo)
        if proc.returncode != 0:
            pytest.fail(f"docker-compose config of {label} failed:\n{proc.stderr}")
        out.append((label, json.loads(proc.stdout)))
    return out


# ---- metric names -------------------------------------------------------------------------

# Series Prometheus makes itself for every target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


@functools.cache
def exported_metric_names() -> frozenset[str]:
    """Every sample name the broker, reducer and an expert serve (``_bucket``, ``_total``...)."""
    from traci_ml.services.broker.metrics import BrokerMetrics
    from traci_ml.services.expert.metrics import ExpertMetrics
    from traci_ml.services.reducer.metrics import ReducerMetrics

    names = set()
    registries = (BrokerMetrics(4).registry, ExpertMetrics(0).registry, ReducerMetrics(4).registry)
    for registry in registries:
        for family in registry.collect():
            names.update(sample.name for sample in family.samples)
    return frozenset(names)


_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names, strings, durations or Grafana variables."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors ([5m], [$__rate_interval])
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\w+", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", s):
        if s[m.end() :].lstrip().startswith("(") or m.group().lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        names.add(m.group())
    return names
