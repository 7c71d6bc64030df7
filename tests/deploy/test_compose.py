"""The compose deployment (deploy/): its files render as intended, `traci health` tells a
service from another, and the whole stack really comes up, trains and is scraped.

`test_compose_up_trains_and_is_scraped` starts its own dockerd (own data/exec roots, no
iptables, no bridge), builds a stand-in for the CPU base image from Debian packages
(debootstrap, cached under /var/cache/traci-ci), runs `docker compose build` and `up` with
deploy/docker-compose.ci.yml (every container on the host's network, on loopback), and has
the host's prometheus scrape the services. Prometheus and Grafana images cannot be pulled
here, so their compose services are not started; tests/helpers/compose_env.py has the pieces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
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
from tests.helpers.support import free_ports
from traci_ml.core import security

FILES = {
    "base": ["docker-compose.yml"],
    "cpu": ["docker-compose.yml", "docker-compose.cpu.yml"],
    "gpu": ["docker-compose.yml", "docker-compose.gpu.yml"],
    "curve": ["docker-compose.yml", "docker-compose.curve.yml"],
    "ci": ["docker-compose.yml", "docker-compose.cpu.yml", "docker-compose.ci.yml"],
    "ci+curve": [
        "docker-compose.yml",
        "docker-compose.cpu.yml",
        "docker-compose.curve.yml",
        "docker-compose.ci.yml",
    ],
}
TRACI = ["broker", "reducer", *(f"expert-{i}" for i in range(4))]
PROJECT = "traci-ci"
STEPS = 600  # CI run length (TRACI_CI_STEPS): ~20 s of training once every service is up
CURVE_STEPS = 200  # the second, CURVE run: only that it trains at all


def compose_argv(variant: str) -> list[str]:
    argv = [str(ce.compose_binary()), "-p", PROJECT]
    for name in FILES[variant]:
        argv += ["-f", str(ce.DEPLOY / name)]
    return argv


def rendered(variant: str) -> dict:
    env = clean_env(TRACI_CI_FIND_LINKS="http://127.0.0.1:1/")
    out = ce.run([*compose_argv(variant), "config", "--format", "json"], env=env, timeout=60)
    return json.loads(out.stdout)


# ---- the files, rendered (no engine needed) ---------------------------------------------


def test_default_stack_services_ports_restarts_and_volume() -> None:
    cfg = rendered("base")
    services = cfg["services"]
    assert set(services) == {*TRACI, "prometheus", "grafana"}
    views = yaml.safe_load((ce.ROOT / "examples/digits.yaml").read_text())["data"]["views"]
    assert views == "quadrants"  # 4 views = 4 expert services
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} beyond loopback"
    for name in TRACI:
        svc = services[name]
        assert svc["restart"] == "on-failure", name
        assert svc["image"] == services["broker"]["image"]
        (volume,) = svc["volumes"]
        assert (volume["source"], volume["target"]) == ("traci-runs", "/var/lib/traci/runs")
        assert svc["healthcheck"]["test"][:3] == ["CMD", "traci", "health"]
    assert [s for s in services if "build" in services[s]] == ["broker"]  # built once
    for i in range(4):
        cmd = services[f"expert-{i}"]["command"]
        assert cmd[cmd.index("--id") + 1] == str(i)
        assert services[f"expert-{i}"]["ports"][0]["target"] == 9110 + i
    args = services["broker"]["build"]["args"]
    assert args["BASE_IMAGE"].startswith("pytorch/pytorch:") and args["TORCH"] == ""


def test_cpu_gpu_and_curve_overrides() -> None:
    cpu = rendered("cpu")["services"]
    assert cpu["broker"]["build"]["args"]["TORCH"].startswith("torch==")
    assert {cpu[s]["image"] for s in TRACI} == {"traci:cpu"}

    gpu = rendered("gpu")["services"]
    ids = []
    for i in range(4):
        (device,) = gpu[f"expert-{i}"]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
        ids += device["device_ids"]
    assert ids == ["0", "1", "2", "3"]  # one GPU each
    assert "deploy" not in rendered("base")["services"]["expert-0"]  # CPU hosts by default

    curve = rendered("curve")
    services = curve["services"]
    assert services["broker"]["environment"]["TRACI_SECURITY__INSECURE"] == "false"
    targets = {s: {x["target"] for x in services[s]["secrets"]} for s in TRACI}
    where = "/run/secrets/traci-curve"
    assert targets["broker"] == {f"{where}/broker.key_secret", f"{where}/authorized"}
    assert targets["expert-2"] == {f"{where}/broker.key", f"{where}/expert-2.key_secret"}
    for s in TRACI:
        assert services[s]["environment"]["TRACI_SECURITY__CURVE_DIR"] == where


def test_ci_override_keeps_everything_on_loopback() -> None:
    cfg = rendered("ci")
    services = cfg["services"]
    assert set(services) == set(TRACI)  # prometheus and grafana: profile "monitoring"
    for name in TRACI:
        svc = services[name]
        assert svc["network_mode"] == "host" and not svc.get("ports")
        env = svc["environment"]
        assert env["TRACI_METRICS__BIND"] == "127.0.0.1"
        assert env["TRACI_NETWORK__BROKER_HOST"] == "127.0.0.1"
    assert services["broker"]["environment"]["TRACI_NETWORK__BIND_HOST"] == "127.0.0.1"
    assert services["broker"]["build"]["network"] == "host"


# ---- `traci health` against real metrics endpoints -------------------------------------


def health(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "traci_ml.app.cli", "health", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )


def test_health_asks_the_service_not_the_port() -> None:
    from prometheus_client import start_http_server

    from traci_ml.services.broker.metrics import BrokerMetrics
    from traci_ml.services.expert.metrics import ExpertMetrics

    broker_port, expert_base = free_ports(2)
    servers = [
        start_http_server(broker_port, addr="127.0.0.1", registry=BrokerMetrics(4).registry),
        start_http_server(expert_base + 2, addr="127.0.0.1", registry=ExpertMetrics(2).registry),
    ]
    try:
        up = health("broker", "--set", f"metrics.broker_port={broker_port}")
        assert up.returncode == 0, up.stderr
        assert "broker up" in up.stdout
        wrong = health("reducer", "--set", f"metrics.reducer_port={broker_port}")
        assert wrong.returncode == 1 and "not reducer" in wrong.stderr
        base = f"metrics.expert_base_port={expert_base}"
        assert health("expert", "--id", "2", "--set", base).returncode == 0
        other = health(
            "expert", "--id", "1", "--set", f"metrics.expert_base_port={expert_base + 1}"
        )
        assert other.returncode == 1 and "not expert" in other.stderr  # expert 2's endpoint
        down = health("broker", "--set", f"metrics.broker_port={free_ports(1)[0]}")
        assert down.returncode == 1 and "broker at http://127.0.0.1:" in down.stderr
    finally:
        for server, thread in servers:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)


def test_health_ready_says_whether_the_front_door_can_answer() -> None:
    """`traci health broker --ready` (the serving healthcheck): up is not enough, the
    broker's front door must be able to answer (traci_broker_serve_ready)."""
    from prometheus_client import start_http_server

    from traci_ml.services.broker.metrics import BrokerMetrics

    (port,) = free_ports(1)
    metrics = BrokerMetrics(3)
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        at = ("--set", f"metrics.broker_port={port}")
        state = dict(pending=0, dispatched=0, registered=3, live=3,
                     expert_up={0: True, 1: True, 2: True}, reducer_up=True)  # fmt: skip
        metrics.set_state(**state, serve_ready=False)
        assert health("broker", *at).returncode == 0  # up
        waiting = health("broker", "--ready", *at)
        assert waiting.returncode == 1 and "cannot answer yet" in waiting.stderr
        metrics.set_state(**state, serve_ready=True)
        ready = health("broker", "--ready", *at)
        assert ready.returncode == 0 and "ready to answer" in ready.stdout
        other = health("reducer", "--ready", "--set", f"metrics.reducer_port={port}")
        assert other.returncode == 1  # the broker's endpoint is not the reducer's
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# ---- compose, really up -----------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_compose_up_trains_and_is_scraped(engine, phases: Phases, tmp_path: Path) -> None:
    """The CI stack trains a short run, healthy and scraped; then again with CURVE on."""
    dockerd, tools = engine
    busy = [p for p in (5555, 5556, 9100, 9101, 9110, 9111, 9112, 9113) if ce.port_in_use(p)]
    assert not busy, f"ports {busy} on 127.0.0.1 are taken: the CI stack needs them"
    compose = compose_argv("ci")

    base = rendered("ci")["services"]["broker"]["build"]["args"]["BASE_IMAGE"]
    wheels = prepare_build(dockerd, tools, phases, base, tmp_path)
    env = clean_env(
        **{k: v for k, v in dockerd.env.items() if k.startswith("DOCKER_")},
        TRACI_CI_FIND_LINKS=wheels.url,
        TRACI_CI_STEPS=str(STEPS),
    )
    prometheus = None
    try:
        with phases("compose build"):
            ce.run([*compose, "build"], env=env, timeout=900, log=tmp_path / "build.log")
        prometheus = ce.Prometheus(
            tools["prometheus"],
            tmp_path,
            {
                "traci-broker": ["127.0.0.1:9100"],
                "traci-reducer": ["127.0.0.1:9101"],
                "traci-expert": [f"127.0.0.1:{9110 + i}" for i in range(4)],
            },
        )
        prometheus.wait_ready()
        with phases("compose up"):
            ce.run([*compose, "up", "-d"], env=env, timeout=300)
        with phases("training (up -> every container exited)"):
            seen = watch_run(dockerd.docker, compose, env, prometheus, phases, TRACI)
        check_run(dockerd.docker, compose, env, seen, steps=STEPS, accuracy=0.9)
        with phases("after the run: finished, not down"):
            check_finished_not_down(prometheus)
        with phases("compose down -v"):
            ce.run([*compose, "down", "--volumes", "--timeout", "30"], env=env, timeout=180)

        # The same stack with docker-compose.curve.yml: keys as compose secrets, readable
        # only by their owner, uid 10001 (a host user's keys, as deploy/README.md says).
        keys = tmp_path / "keys"
        security.generate(keys, 4)
        for path in [keys, *keys.rglob("*")]:
            os.chown(path, 10001, 0)
        env = {**env, "TRACI_CURVE_DIR": str(keys), "TRACI_UID": "10001"}
        env |= {"TRACI_CI_STEPS": str(CURVE_STEPS), "TRACI_CI_EVAL_EVERY": str(CURVE_STEPS)}
        compose = compose_argv("ci+curve")
        with phases("CURVE run (up -> every container exited)"):
            ce.run([*compose, "up", "-d"], env=env, timeout=300)
            watch_run(dockerd.docker, compose, env, None, phases, TRACI)
        check_run(dockerd.docker, compose, env, None, steps=CURVE_STEPS, accuracy=0.5)
        broker_log = ce.run([*compose, "logs", "--no-color", "broker"], env=env, timeout=60)
        # 4 experts, the reducer and the front door's client, each admitted in its own role
        assert "CURVE on: admitting the 6 peer keys" in broker_log.stdout, broker_log.stdout
    except BaseException:
        logs = subprocess.run(
            [*compose, "logs", "--no-color", "--tail", "40"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        phases.say(f"[compose test] container logs:\n{logs.stdout[-8000:]}")
        raise
    finally:
        with phases("compose down (cleanup)"):
            subprocess.run(
                [*compose, "down", "--volumes", "--remove-orphans", "--timeout", "30"],
                env=env, capture_output=True, timeout=180,
            )  # fmt: skip
        if prometheus is not None:
            prometheus.stop()
        wheels.stop()


def check_finished_not_down(prometheus: ce.Prometheus, timeout: float = 30.0) -> None:
    """Every service exited 0 with its run: Prometheus finds each target down, and read
    traci_run_finished 1 in its last scrape (metrics.final_scrape), so TraciTargetDown's
    expression -- read from the rules file -- selects none of them."""
    rules = yaml.safe_load((ce.DEPLOY / "prometheus" / "rules" / "traci.rules.yml").read_text())
    alerts = {r.get("alert"): r for g in rules["groups"] for r in g["rules"]}
    rule = alerts["TraciTargetDown"]
    instances = {"127.0.0.1:9100", "127.0.0.1:9101", *(f"127.0.0.1:{9110 + i}" for i in range(4))}
    deadline = time.monotonic() + timeout
    while True:
        down = {r["metric"]["instance"] for r in prometheus.query('up{component!=""} == 0')}
        if down == instances or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert down == instances, f"down after the run: {sorted(down)}"
    said = prometheus.query("last_over_time(traci_run_finished[1h]) == 1")
    assert {r["metric"]["instance"] for r in said} == instances, said
    firing = prometheus.query(rule["expr"])
    assert firing == [], f"TraciTargetDown would fire after a successful run: {firing}"


def check_run(docker, compose, env, seen, *, steps: int, accuracy: float) -> None:  # noqa: ANN001
    """After the run: what was seen while it ran (when given), then the reducer's final
    evaluation, summary.json and the experts' accounts in the run volume."""
    if seen is not None:
        assert seen["healthy"] == set(TRACI), f"never healthy: {set(TRACI) - seen['healthy']}"
        targets = {"127.0.0.1:9100", "127.0.0.1:9101"}
        targets |= {f"127.0.0.1:{9110 + i}" for i in range(4)}
        assert seen["up"] == targets, f"never scraped: {targets - seen['up']}"
        assert seen["p99"] is not None and seen["p99"] > 0, "no queue latency p99 from Prometheus"
    for name, c in containers(docker, compose, env).items():
        user = env.get("TRACI_UID", "10001")
        assert c["Config"]["User"].split(":")[0] == user, f"{name} runs as {c['Config']['User']}"

    logs = ce.run([*compose, "logs", "--no-color", "reducer"], env=env, timeout=60).stdout
    assert f"reducer eval after step {steps}:" in logs, logs[-3000:]
    run_dir = volume_dir(docker, PROJECT, env) / "ci"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    assert summary["test_accuracy"] >= accuracy, summary["test_accuracy"]
    for i in range(4):
        acc = json.loads((run_dir / "experts" / f"expert-{i}.json").read_text())
        assert acc["applied"] == steps, acc
    print(f"compose run: {steps} steps, test_accuracy {summary['test_accuracy']:.4f}")
