"""Running a compose stack for real in a test: timed phases, the containers' state, and
watching a run until every TRACI container has exited (tests/deploy/test_compose*.py)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import compose_env as ce

LATENCY_P99 = (
    "histogram_quantile(0.99, sum(rate(traci_broker_queue_latency_seconds_bucket[1m])) by (le))"
)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that would change what the compose files mean."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TRACI_", "COMPOSE_", "GRAFANA_", "PROMETHEUS_"))
    }
    return {**env, **extra}


class Phases:
    """Wall time of each phase, printed as it ends (straight to the terminal)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.times[name] = time.monotonic() - t0
            self.say(f"[compose test] {name}: {self.times[name]:.1f}s")

    def say(self, line: str) -> None:
        with self.capsys.disabled():
            print(line, flush=True)


def containers(docker: str, compose: list[str], env: dict[str, str]) -> dict[str, dict]:
    """service -> docker inspect of its container."""
    ids = ce.run([*compose, "ps", "-a", "-q"], env=env, timeout=60).stdout.split()
    if not ids:
        return {}
    out = ce.run([docker, "inspect", *ids], env=env, timeout=60).stdout
    return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in json.loads(out)}


def watch_run(docker, compose, env, prometheus, phases, services, timeout=600.0) -> dict:  # noqa: ANN001
    """Poll containers and Prometheus until every TRACI container has exited. Returns what was
    seen while they ran: healthy services, scraped targets, the queue latency p99."""
    seen: dict = {"healthy": set(), "up": set(), "p99": None}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = containers(docker, compose, env)
        assert set(state) == set(services), f"containers: {sorted(state)}"
        for name, c in state.items():
            assert c["RestartCount"] == 0, f"{name} restarted (exit {c['State']['ExitCode']})"
            if c["State"]["Status"] == "exited":
                assert c["State"]["ExitCode"] == 0, f"{name} exited {c['State']['ExitCode']}"
            if (c["State"].get("Health") or {}).get("Status") == "healthy":
                seen["healthy"].add(name)
        try:
            for r in prometheus.query("up == 1") if prometheus else []:
                seen["up"].add(r["metric"]["instance"])
            if prometheus and seen["p99"] is None:
                result = prometheus.query(LATENCY_P99)
                if result and math.isfinite(float(result[0]["value"][1])):
                    seen["p99"] = float(result[0]["value"][1])
                    phases.say(f"[compose test] Prometheus: queue latency p99 {seen['p99']:.6f}s")
        except OSError:
            pass  # a slow answer: ask again next round
        if all(c["State"]["Status"] == "exited" for c in state.values()):
            return seen
        time.sleep(2)
    raise AssertionError(f"the run did not finish within {timeout:.0f}s; seen {seen}")


def prepare_build(dockerd: ce.Dockerd, tools: dict[str, str], phases: Phases, base: str,
                  tmp_path: Path) -> ce.WheelServer:  # fmt: skip
    """The stand-in for the CPU base image ``base`` (debootstrap rootfs, cached) and a
    loopback server of the torch wheel the image build installs."""
    with phases("base image (debootstrap rootfs, cached)"):
        tarball, built = ce.rootfs_tarball(tools["debootstrap"])
        phases.say(f"[compose test] rootfs {tarball} ({'built now' if built else 'from cache'})")
        links, ca_bundle = ce.pip_settings()
        wheel = ce.torch_wheel(links)
        ce.build_standin(dockerd, tarball, base, ca_bundle)
    return ce.WheelServer(wheel, tmp_path)


def volume_dir(docker: str, project: str, env: dict[str, str]) -> Path:
    """Where the project's run volume (traci-runs) lies on the host."""
    volume = ce.run([docker, "volume", "inspect", f"{project}_traci-runs"], env=env, timeout=60)
    return Path(json.loads(volume.stdout)[0]["Mountpoint"])
