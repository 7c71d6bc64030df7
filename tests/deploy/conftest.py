"""Fixtures of the deployment tests: the rendered Kubernetes variants, with and without CURVE."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import compose_env as ce
from tests.helpers.compose_run import Phases
from tests.helpers.deploytools import K8S, OVERLAYS, render

CURVE_LINE = "# - ../../components/curve"


def curve_copy(root: Path) -> Path:
    """A copy of deploy/k8s with CurveZMQ keys generated and the curve component switched on
    in every overlay, the way deploy/README.md tells a user to."""
    from traci_ml.core.config import load_config
    from traci_ml.core.data import expert_count
    from traci_ml.core.security import generate

    copy = root / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("*.key", "*.key_secret"))
    n_experts = expert_count(load_config(copy / "base" / "run-config.yaml", env={}))
    generate(copy / "components" / "curve" / "keys", n_experts)
    for overlay in OVERLAYS:
        path = copy / "overlays" / overlay / "kustomization.yaml"
        text = path.read_text()
        assert CURVE_LINE in text, f"overlays/{overlay} lost its commented curve component line"
        path.write_text(text.replace(CURVE_LINE, CURVE_LINE.replace("# ", ""), 1))
    return copy


@pytest.fixture(scope="session")
def curve_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return curve_copy(tmp_path_factory.mktemp("curve"))


@pytest.fixture(scope="session")
def k8s_variants(curve_tree: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """(label, rendered objects) for every overlay as shipped and with CURVE on."""
    plain = [(f"overlays/{o}", render(K8S / "overlays" / o)) for o in OVERLAYS]
    curve = [(f"overlays/{o}+curve", render(curve_tree / "overlays" / o)) for o in OVERLAYS]
    return plain + curve


@pytest.fixture
def phases(capsys: pytest.CaptureFixture[str]) -> Iterator[Phases]:
    p = Phases(capsys)
    yield p
    total = sum(p.times.values())
    p.say(
        "[compose test] phases: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in p.times.items())
        + f"; total {total:.0f}s"
    )


@pytest.fixture
def engine(phases: Phases) -> Iterator[tuple[ce.Dockerd, dict[str, str]]]:
    """A private dockerd; skip (fail when CI=true) if this machine cannot run one."""
    try:
        tools = ce.require_tools()
        with phases("dockerd start"):
            dockerd = ce.Dockerd(tools["dockerd"], tools["docker"])
            try:
                dockerd.wait_ready()
            except BaseException:
                dockerd.stop()
                raise
    except ce.Unavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"compose test cannot run in CI: {exc}")
        pytest.skip(f"compose test cannot run here: {exc}")
    try:
        yield dockerd, tools
    finally:
        with phases("dockerd stop"):
            dockerd.stop()
