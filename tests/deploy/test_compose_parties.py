"""A user's own run in containers: `traci deploy compose` on a three-party config (each party
its own CSV with its own ids, one party with a user-written expert module), brought up for
real with the generated CPU and CI overrides. Each container sees only its own party's file
(checked on the live containers), the run trains to completion, the host's Prometheus
scrapes exactly the generated targets, and then the same stack with the generated serve
override answers a request by ids at the front door."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import compose_env as ce
from tests.helpers.compose_run import (
    Phases,
    clean_env,
    containers,
    prepare_build,
    volume_dir,
    watch_run,
)
from traci_ml.app import partygen
from traci_ml.app.client import Client, Prediction
from traci_ml.app.compose import DATA, generate
from traci_ml.app.compose_text import USER
from traci_ml.core.errors import TraciError

PROJECT = "traci-ci-parties"
STEPS = 400
N = 3
SERVICES = ["broker", "reducer", *(f"expert-{i}" for i in range(N))]


def party_run(root: Path) -> Path:
    """Three parties' CSVs (85% of the ids each, own row order), the labels, a package with
    a custom expert module, and the run config naming them -- as a user has them."""
    info = partygen.generate(root / "data", rows=3000, parties=N, features=24, overlap=0.85,
                             classes=3, fmt="csv", seed=3)  # fmt: skip
    pkg = root / "myexperts"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "gated.py").write_text((ce.ROOT / "examples" / "experts.py").read_text())
    views = []
    for k, party in enumerate(info["parties"]):
        view = {"name": f"party{k}", "path": os.path.relpath(party["path"], root),
                "columns": party["columns"]}  # fmt: skip
        if k == 1:
            view["model"] = {"module": "myexperts.gated:GatedExpert", "kwargs": {"hidden": 32}}
        views.append(view)
    labels = os.path.relpath(info["labels"]["path"], root)
    cfg = {
        "run_id": "parties", "seed": 0, "embed_dim": 32,
        "data": {"source": "parties", "labels": {"path": labels, "label": "label"},
                 "views": views},
        "train": {"batch_size": 64, "log_every": 25},
    }  # fmt: skip
    path = root / "parties.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def labels_ids(root: Path) -> list[int]:
    """The label holder's ids, in its file's order."""
    lines = (root / "data" / "labels.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


def ask_by_ids(ids: list[int], timeout: float = 180.0) -> Prediction:
    """Ask the front door on 127.0.0.1:5557 until it answers (the served services load their
    checkpoints first): the answer for ``ids``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with Client("tcp://127.0.0.1:5557", timeout=10) as client:
                return client.predict_ids(ids)
        except TraciError as exc:  # ServeError too: not ready yet
            if time.monotonic() > deadline:
                raise AssertionError(f"the front door never answered: {exc}") from exc
            time.sleep(2)


def wait_healthy(docker: str, compose: list[str], env: dict[str, str], name: str,
                 timeout: float = 300.0) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = containers(docker, compose, env)[name]["State"].get("Health") or {}
        if health.get("Status") == "healthy":
            return
        time.sleep(1)
    raise AssertionError(f"{name} never became healthy: {health}")


def mounts(container: dict) -> dict[str, str]:
    """container path -> host path of a container's bind mounts, less the run config every
    service gets (compose binds its ``configs:`` outside swarm)."""
    binds = {m["Destination"]: m["Source"] for m in container["Mounts"] if m["Type"] == "bind"}
    assert binds.pop("/etc/traci/run.yaml", "").endswith("/stack/run.yaml"), binds
    return binds


@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_generated_party_stack_trains_each_party_on_its_own_file(
    engine, phases: Phases, tmp_path: Path, monkeypatch
) -> None:
    dockerd, tools = engine
    busy = [p for p in (5555, 5556, 9100, 9101, 9110, 9111, 9112) if ce.port_in_use(p)]
    assert not busy, f"ports {busy} on 127.0.0.1 are taken: the CI stack needs them"
    monkeypatch.chdir(tmp_path)  # data paths are read from where the user runs the command
    config = party_run(tmp_path)
    out = tmp_path / "stack"
    with phases("traci deploy compose"):
        generate(Path(config.name), out)
    compose = [str(ce.compose_binary()), "-p", PROJECT, "--project-directory", str(out)]
    for name in ("docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.ci.yml"):
        compose += ["-f", str(out / name)]

    stand_in = clean_env(TRACI_CI_FIND_LINKS="http://127.0.0.1:1/")
    rendered = json.loads(ce.run([*compose, "config", "--format", "json"], env=stand_in,
                                 timeout=60).stdout)  # fmt: skip
    base = rendered["services"]["broker"]["build"]["args"]["BASE_IMAGE"]
    wheels = prepare_build(dockerd, tools, phases, base, tmp_path)
    env = clean_env(
        **{k: v for k, v in dockerd.env.items() if k.startswith("DOCKER_")},
        TRACI_CI_FIND_LINKS=wheels.url,
        TRACI_CI_STEPS=str(STEPS),
        TRACI_CI_EVAL_EVERY=str(STEPS),
    )
    # The generated scrape targets, as the host's Prometheus reaches them (network_mode host)
    generated = yaml.safe_load((out / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in generated["scrape_configs"]}
    assert jobs["traci-expert"] == [f"expert-{i}:{9110 + i}" for i in range(N)]
    loopback = {
        job: [f"127.0.0.1:{t.split(':')[1]}" for t in targets]
        for job, targets in jobs.items()
        if job.startswith("traci-")
    }
    prometheus = ce.Prometheus(tools["prometheus"], tmp_path, loopback)
    try:
        with phases("compose build"):
            ce.run([*compose, "build"], env=env, timeout=900, log=tmp_path / "build.log")
        prometheus.wait_ready()
        with phases("compose up"):
            ce.run([*compose, "up", "-d"], env=env, timeout=300)
        # each container holds only its own files: checked on the live containers
        state = containers(dockerd.docker, compose, env)
        data = tmp_path / "data"
        assert mounts(state["broker"]) == {}
        assert mounts(state["reducer"]) == {f"{DATA}/labels/labels.csv": str(data / "labels.csv")}
        for k in range(N):
            want = {f"{DATA}/expert-{k}/party-{k}.csv": str(data / f"party-{k}.csv")}
            if k == 1:
                want[f"{USER}/myexperts"] = str(tmp_path / "myexperts")
            assert mounts(state[f"expert-{k}"]) == want, f"expert-{k}"
        with phases("training (up -> every container exited)"):
            seen = watch_run(dockerd.docker, compose, env, prometheus, phases, SERVICES)
        assert seen["healthy"] == set(SERVICES), f"never healthy: {set(SERVICES) - seen['healthy']}"
        assert seen["up"] == {t for targets in loopback.values() for t in targets}, seen["up"]
        run_dir = volume_dir(dockerd.docker, PROJECT, env) / "ci"
        # expert-1 trained the user's module (a GatedExpert's layers), the others the MLP
        gated = torch.load(run_dir / "checkpoints" / "expert-1.pt", weights_only=False)
        assert any(k.startswith("blocks.") for k in gated["online"]), list(gated["online"])
        plain = torch.load(run_dir / "checkpoints" / "expert-0.pt", weights_only=False)
        assert not any(k.startswith("blocks.") for k in plain["online"])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == STEPS
        assert summary["test_accuracy"] >= 0.6, summary["test_accuracy"]  # 3 classes
        assert set(summary["participation"]) == {str(k) for k in range(N)}
        # the whole run out of the stack, as deploy/README.md says: every checkpoint is there
        # (the services share the run volume)
        ce.run([*compose, "cp", "reducer:/var/lib/traci/runs/ci", str(tmp_path / "collected")],
               env=env, timeout=120)  # fmt: skip
        got = {p.name for p in (tmp_path / "collected" / "checkpoints").iterdir()}
        assert {"reducer.pt", *(f"expert-{k}.pt" for k in range(N))} <= got, got
        # then serving: the same stack with the serve override, asked by id at the front door
        serve = [*compose, "-f", str(out / "docker-compose.serve.yml")]
        with phases("serving (up -> the broker is ready: healthy)"):
            ce.run([*serve, "up", "-d"], env=env, timeout=300)
            wait_healthy(dockerd.docker, serve, env, "broker")  # --ready: can answer
        with phases("serving (a request by ids)"):
            answer = ask_by_ids(labels_ids(tmp_path)[:50], timeout=30)
        assert answer.outputs.shape == (50, 3) and answer.task == "classification"
        assert np.allclose(answer.outputs.sum(axis=1), 1.0, atol=1e-4)
        assert answer.row_experts is not None
        assert any(len(e) == N for e in answer.row_experts)  # rows every party holds
        state = containers(dockerd.docker, serve, env)
        for name in SERVICES:
            assert state[name]["State"]["Status"] == "running", name
            assert state[name]["Config"]["Cmd"][-1] == "--serve", name
        accuracy, skipped = summary["test_accuracy"], summary.get("rows_skipped")
        phases.say(f"[compose test] party run: {STEPS} steps, test_accuracy {accuracy:.4f}, "
                   f"rows skipped {skipped}")  # fmt: skip
    except BaseException:
        logs = subprocess.run([*compose, "logs", "--no-color", "--tail", "40"], env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        phases.say(f"[compose test] container logs:\n{logs.stdout[-8000:]}")
        raise
    finally:
        with phases("compose down (cleanup)"):
            subprocess.run([*compose, "down", "--volumes", "--remove-orphans", "--timeout", "30"],
                           env=env, capture_output=True, timeout=180)  # fmt: skip
        prometheus.stop()
        wheels.stop()
