"""`traci deploy k8s CONFIG`: the kustomize tree generated from a run config. deploy/k8s is its
output for digits; for 2, 3 and 8 experts every overlay (training and serving) renders and
passes strict schema validation, with CURVE on too (each pod only its own key); a per-party
run gives each process that reads a file its own volume and a waiting init container, in
training and in serving, and the user's expert modules a ConfigMap."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.deploy.test_generate import synthetic_run, write_parties
from tests.deploy.test_k8s import by_name, validate_strict
from tests.helpers.deploytools import K8S, ROOT, find, render, workloads
from traci_ml.app.cli import main
from traci_ml.app.k8s import generate_k8s, render_tree
from traci_ml.app.k8s_components import POD_DATA, USER
from traci_ml.core.config import load_config
from traci_ml.core.security import generate as generate_keys

pytestmark = pytest.mark.timeout(300)
CURVE_LINE = "# - ../../components/curve"
OVERLAYS = ("cpu", "gpu", "cpu-serve", "gpu-serve")


def test_deploy_k8s_is_the_generators_output_for_digits(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    files = render_tree(Path("examples/digits.yaml"))
    shipped = {
        p.relative_to(K8S).as_posix()
        for p in K8S.rglob("*")
        if p.is_file() and (p.suffix != ".key" and not p.name.endswith(".key_secret"))
    }
    assert set(files) == shipped
    for rel, text in files.items():
        assert (K8S / rel).read_text() == text, (
            f"deploy/k8s/{rel} differs from `traci deploy k8s examples/digits.yaml --out "
            "deploy/k8s`: change the generator (traci_ml/app/k8s*.py), then run that"
        )


def with_curve(tree: Path, n: int) -> None:
    """Keys for ``n`` experts and the curve component on in every overlay."""
    generate_keys(tree / "components" / "curve" / "keys", n)
    for overlay in OVERLAYS:
        path = tree / "overlays" / overlay / "kustomization.yaml"
        path.write_text(path.read_text().replace(CURVE_LINE, CURVE_LINE.replace("# ", ""), 1))


@pytest.mark.parametrize("n", [2, 3, 8])
def test_n_experts_render_and_validate_with_and_without_curve(n: int, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree = tmp_path / "k8s"
    generate_k8s(synthetic_run(tmp_path, n), tree)
    assert not (tree / "components" / "data").exists()  # synthetic: no file to carry
    for overlay in OVERLAYS:
        docs = render(tree / "overlays" / overlay)
        assert validate_strict(docs) == [], overlay
        experts = sorted(w["metadata"]["name"] for w in workloads(docs)
                         if w["metadata"]["name"].startswith("expert-"))  # fmt: skip
        assert experts == sorted(f"expert-{i}" for i in range(n)), overlay
        config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"]
        assert yaml.safe_load(config)["data"]["synthetic"]["experts"] == n
    curve = tmp_path / "k8s-curve"  # a tree of its own: renders are cached by path
    shutil.copytree(tree, curve)
    with_curve(curve, n)
    for overlay in ("cpu", "gpu-serve"):
        docs = render(curve / "overlays" / overlay)
        assert validate_strict(docs) == [], overlay
        secret = next(d for d in docs if d["kind"] == "Secret")
        assert {k for k in secret["data"] if k.startswith("expert-")} == {
            f"expert-{i}.{s}" for i in range(n) for s in ("key", "key_secret")
        }

        def items(name: str, docs=docs) -> set[str]:
            volumes = by_name(docs, name)["spec"]["template"]["spec"]["volumes"]
            curve = next(v for v in volumes if v["name"] == "curve")
            return {i["path"] for i in curve["secret"]["items"]}

        assert {f"authorized/expert-{i}.key" for i in range(n)} <= items("broker")
        for i in range(n):  # each expert pod holds its own secret key, no other
            assert items(f"expert-{i}") == {"broker.key", f"expert-{i}.key_secret"}, overlay
        assert items("reducer") == {"broker.key", "reducer.key_secret"}


def test_party_pods_get_only_their_own_file_and_the_module(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_parties(tmp_path)
    assert main(["deploy", "k8s", "three.yaml", "--out", "k8s"]) == 0
    said = capsys.readouterr().out
    look = "$(kubectl -n traci get pod -l traci.dev/workload={} -o name | head -n1 | cut -d/ -f2)"
    for i in range(3):  # the command says how each file gets to its pod
        pod = look.format(f"expert-{i}")
        want = f'kubectl -n traci cp data/party{i}.csv "{pod}:{POD_DATA}/party{i}.csv" -c data'
        assert want in said
    assert f'cp data/labels.csv "{look.format("reducer")}:{POD_DATA}/labels.csv" -c data' in said
    for overlay in OVERLAYS:
        docs = render(tmp_path / "k8s" / "overlays" / overlay)
        assert validate_strict(docs) == [], overlay
        for i in range(3):
            pod = by_name(docs, f"expert-{i}")["spec"]["template"]["spec"]
            (init,) = pod["initContainers"]
            script = init["command"][-1]
            assert f'p="{POD_DATA}/party{i}.csv"' in script, overlay
            others = [f"party{j}" for j in range(3) if j != i] + ["labels.csv"]
            assert not any(o in script for o in others)  # a pod never waits for another's file
            data = next(v for v in pod["volumes"] if v["name"] == "data")
            assert data["persistentVolumeClaim"]["claimName"] == f"data-expert-{i}"
            find(docs, "PersistentVolumeClaim", f"data-expert-{i}")
            main_mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
            assert main_mounts[POD_DATA]["readOnly"] is True
            assert main_mounts[USER]["readOnly"] is True
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert env["PYTHONPATH"] == USER
        reducer = by_name(docs, "reducer")["spec"]["template"]["spec"]
        assert f'p="{POD_DATA}/labels.csv"' in reducer["initContainers"][0]["command"][-1]
        assert "party" not in reducer["initContainers"][0]["command"][-1]
        broker = by_name(docs, "broker")["spec"]["template"]["spec"]
        assert "initContainers" not in broker
        assert all(v["name"] != "data" for v in broker["volumes"])
        modules = next(d for d in docs if d["metadata"]["name"].startswith("traci-user-modules"))
        assert set(modules["data"]) == {"userexperts.__init__.py", "userexperts.gated.py"}
        config = next(d for d in docs if d["metadata"]["name"].startswith("traci-config"))
        run = yaml.safe_load(config["data"]["config.yaml"])
        assert [v["path"] for v in run["data"]["views"]] == [
            f"{POD_DATA}/party{i}.csv" for i in range(3)
        ]
        assert run["data"]["labels"]["path"] == f"{POD_DATA}/labels.csv"
    # the ConfigMap's config is a valid run config
    (tmp_path / "pod-run.yaml").write_text(config["data"]["config.yaml"])
    assert load_config(tmp_path / "pod-run.yaml", env={}).data.views[1].model.module == (
        "userexperts.gated:GatedExpert"
    )


@pytest.mark.integration
def test_the_init_container_waits_for_its_own_file_then_lets_the_pod_start(tmp_path, monkeypatch):
    """The init container's script, run by sh with the data folder moved to tmp_path: it
    waits (saying which kubectl cp to run) until expert-1's file is there and stable."""
    monkeypatch.chdir(tmp_path)
    write_parties(tmp_path)
    tree = tmp_path / "k8s"
    generate_k8s(Path("three.yaml"), tree)
    patch = yaml.safe_load((tree / "components" / "data" / "expert-1.yaml").read_text())
    script = patch["spec"]["template"]["spec"]["initContainers"][0]["command"][-1]
    folder = tmp_path / "pod-data"
    folder.mkdir()
    script = script.replace(POD_DATA, str(folder))
    env = {**os.environ, "HOSTNAME": "expert-1-x7k2p"}  # a Job's pod
    with subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.PIPE, text=True) as proc:
        try:
            first = proc.stdout.readline()  # type: ignore[union-attr]
            assert f"waiting for {folder}/party1.csv: kubectl -n traci cp" in first
            assert "expert-1-x7k2p:" in first
            (folder / "party0.csv").write_text("id\n1\n")  # another party's file: not awaited
            time.sleep(1)
            assert proc.poll() is None
            shutil.copy(tmp_path / "data" / "party1.csv", folder / "party1.csv")
            assert proc.wait(timeout=30) == 0
        finally:
            proc.kill()
