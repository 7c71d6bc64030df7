"""`traci deploy compose CONFIG`: the compose stack generated from a run config -- one expert
service per view, each mounting only its own files, Prometheus scraping exactly those
experts -- and the shipped deploy/ files are its output for examples/digits.yaml."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.compose_env import Unavailable, compose_binary
from tests.helpers.deploytools import DEPLOY, ROOT, binary, missing, run
from traci_ml.app.cli import main
from traci_ml.app.compose import DATA, generate, stack_for
from traci_ml.app.compose_text import USER, render
from traci_ml.core.config import load_config
from traci_ml.core.errors import ConfigError

pytestmark = pytest.mark.timeout(300)

OVERRIDES = ["docker-compose.cpu.yml", "docker-compose.gpu.yml", "docker-compose.curve.yml",
             "docker-compose.ci.yml", "docker-compose.serve.yml"]  # fmt: skip


def test_the_shipped_files_are_the_generators_output_for_digits(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    config_path = Path("examples/digits.yaml")
    stack, run_config = stack_for(load_config(config_path, env={}), config_path, DEPLOY)
    assert run_config == {}  # digits reads no file: the config serves as it is
    for name, text in render(stack).items():
        assert (DEPLOY / name).read_text() == text, (
            f"deploy/{name} differs from `traci deploy compose examples/digits.yaml --out "
            "deploy`: change the generator (traci_ml/app/compose_text.py), then run that"
        )


def compose_config(folder: Path, *files: str) -> dict[str, Any]:
    """``docker compose config`` of ``folder``'s docker-compose.yml plus ``files``."""
    try:
        compose = str(compose_binary())
    except Unavailable as exc:
        missing(str(exc))
    argv = [compose, "--project-directory", str(folder), "-f", "docker-compose.yml"]
    for f in files:
        argv += ["-f", f]
    env = {**os.environ, "TRACI_CI_FIND_LINKS": "http://127.0.0.1:1/stand-in"}
    proc = subprocess.run([*argv, "config", "--format", "json"], capture_output=True,
                          text=True, cwd=folder, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, f"compose config {files}: {proc.stderr}"
    return json.loads(proc.stdout)


def experts_of(project: dict[str, Any]) -> list[str]:
    return sorted((s for s in project["services"] if s.startswith("expert-")),
                  key=lambda s: int(s.split("-")[1]))  # fmt: skip


def scrape_targets(folder: Path) -> list[str]:
    prom = yaml.safe_load((folder / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "traci-expert")
    return job["static_configs"][0]["targets"]


@pytest.mark.parametrize("n", [2, 3, 8])
def test_n_experts_make_n_services_every_override_and_n_scrape_targets(
    n: int, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "stack"
    generate(synthetic_run(tmp_path, n), out)
    want = [f"expert-{i}" for i in range(n)]
    base = compose_config(out)
    assert experts_of(base) == want
    for i in range(n):
        svc = base["services"][f"expert-{i}"]
        assert svc["command"][-3:] == ["--id", str(i), "--resume"]
        assert [p["published"] for p in svc["ports"]] == [str(9110 + i)]
    for override in OVERRIDES:
        assert experts_of(compose_config(out, override)) == want, override
    gpu = compose_config(out, "docker-compose.gpu.yml")["services"]
    ids = [gpu[e]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for e in want]
    assert ids == [[str(i)] for i in range(n)]  # one GPU each, by default GPU i
    assert scrape_targets(out) == [f"expert-{i}:{9110 + i}" for i in range(n)]
    run([binary("promtool"), "check", "config", "prometheus.yml"], cwd=out / "prometheus")
    # the run config needs no rewrite: the compose file names it where it lies
    assert base["configs"]["traci-run"]["file"] == str(tmp_path / "run.yaml")


def synthetic_run(root: Path, n: int) -> Path:
    """A run config of ``n`` experts over generated data (no file to carry): root/run.yaml."""
    cfg = {"run_id": f"synthetic-{n}", "embed_dim": 16,
           "data": {"source": "synthetic", "views": "even",
                    "synthetic": {"rows": 200, "features": 4 * n, "experts": n}}}  # fmt: skip
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_parties(root: Path, n: int = 3) -> Path:
    """``n`` parties' CSVs with their own ids (partly overlapping), the labels, a config whose
    second view uses the example's custom module."""
    data = root / "data"
    data.mkdir()
    views = []
    for i in range(n):
        rows = [f"{k},{k * 0.1 + i},{k % 7}" for k in range(i, 60 + i)]
        (data / f"party{i}.csv").write_text(f"id,a{i},b{i}\n" + "\n".join(rows) + "\n")
        view: dict[str, Any] = {"name": f"p{i}", "path": f"data/party{i}.csv",
                                "columns": [f"a{i}", f"b{i}"]}  # fmt: skip
        if i == 1:
            view["model"] = {"module": "userexperts.gated:GatedExpert", "kwargs": {"hidden": 8}}
        views.append(view)
    labels = "\n".join(f"{k},{k % 2}" for k in range(64))
    (data / "labels.csv").write_text("id,label\n" + labels + "\n")
    pkg = root / "userexperts"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "gated.py").write_text((ROOT / "examples" / "experts.py").read_text())
    cfg = {"run_id": "three", "embed_dim": 8,
           "data": {"source": "parties", "labels": {"path": "data/labels.csv", "label": "label"},
                    "views": views}}  # fmt: skip
    path = root / "three.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def binds(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path of a service's bind mounts."""
    return {v["target"]: v["source"] for v in service.get("volumes", []) if v["type"] == "bind"}


def test_each_party_mounts_only_its_own_file_and_the_user_module(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_parties(tmp_path)
    assert main(["deploy", "compose", "three.yaml", "--out", "stack"]) == 0
    assert "docker compose -f stack/docker-compose.yml up -d --build" in capsys.readouterr().out
    out = tmp_path / "stack"
    services = compose_config(out)["services"]
    assert experts_of({"services": services}) == ["expert-0", "expert-1", "expert-2"]
    data = tmp_path / "data"
    assert binds(services["broker"]) == {}  # the broker reads no table
    assert binds(services["reducer"]) == {f"{DATA}/labels/labels.csv": str(data / "labels.csv")}
    for i in range(3):
        svc = services[f"expert-{i}"]
        want = {f"{DATA}/expert-{i}/party{i}.csv": str(data / f"party{i}.csv")}
        if i == 1:
            want[f"{USER}/userexperts"] = str(tmp_path / "userexperts")
            assert svc["environment"]["PYTHONPATH"] == USER
        else:
            assert "PYTHONPATH" not in svc["environment"]
        assert binds(svc) == want, f"expert-{i}"
        assert all(v["read_only"] for v in svc["volumes"] if v["type"] == "bind")
        assert any(v["source"] == "traci-runs" for v in svc["volumes"])  # the run volume kept
    # serving the finished run: the same services and files, each with --serve, kept up
    serving = compose_config(out, "docker-compose.serve.yml")["services"]
    for name in ("broker", "reducer", "expert-0", "expert-1", "expert-2"):
        assert serving[name]["command"][-1] == "--serve", name
        assert serving[name]["restart"] == "unless-stopped", name
        assert binds(serving[name]) == binds(services[name]), name
    assert "--ready" in serving["broker"]["healthcheck"]["test"]  # healthy = can answer
    # the services' config: the same run with the container paths, and it loads
    assert compose_config(out)["configs"]["traci-run"]["file"] == str(out / "run.yaml")
    run_config = load_config(out / "run.yaml", env={})
    assert run_config.data.labels.path == f"{DATA}/labels/labels.csv"
    assert [v.path for v in run_config.data.views] == [
        f"{DATA}/expert-{i}/party{i}.csv" for i in range(3)
    ]
    assert run_config.data.views[1].model.module == "userexperts.gated:GatedExpert"
    assert scrape_targets(out) == ["expert-0:9110", "expert-1:9111", "expert-2:9112"]
    assert (out / "prometheus" / "rules").is_dir() and (out / "grafana" / "dashboards").is_dir()


def test_a_one_table_csv_is_mounted_into_every_service_that_reads_it(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "stack"
    generate(Path("examples/heterogeneous.yaml"), out)
    services = compose_config(out)["services"]
    table = str(ROOT / "examples" / "data" / "breast_cancer.csv")
    for name in ("reducer", "expert-0", "expert-1", "expert-2"):
        assert table in binds(services[name]).values(), name
    assert binds(services["broker"]) == {}  # the broker reads no data
    assert f"{USER}/examples" in binds(services["expert-1"])  # examples.experts:GatedExpert
    assert f"{USER}/examples" not in binds(services["expert-0"])


def test_a_missing_file_or_module_is_named(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_parties(tmp_path)
    (tmp_path / "data" / "party2.csv").unlink()
    with pytest.raises(ConfigError, match="data/party2.csv: no such file"):
        generate(config, tmp_path / "stack")
    (tmp_path / "data" / "party2.csv").write_text("id,a2,b2\n1,0,0\n")
    text = config.read_text().replace("userexperts.gated", "nowhere.gated")
    config.write_text(text)
    with pytest.raises(ConfigError, match="'nowhere' is not importable"):
        generate(config, tmp_path / "stack")
