"""deploy/prometheus: promtool accepts the configs and the rules, the rules' unit tests pass,
every alert is tested and reads real metrics, and (integration) a real Prometheus server on
loopback scrapes a live `traci up` cluster and answers the queries the alerts and the
dashboard are built on."""

from __future__ import annotations

import json
import math
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.cluster import Cluster
from tests.helpers.deploytools import (
    GRAFANA,
    PROMETHEUS,
    SYNTHETIC,
    binary,
    exported_metric_names,
    promql_metric_names,
    run,
)
from tests.helpers.support import free_ports

RULES = PROMETHEUS / "rules" / "traci.rules.yml"


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_accepts_the_compose_config_and_its_rules() -> None:
    out = run([binary("promtool"), "check", "config", "prometheus.yml"], cwd=PROMETHEUS)
    assert "1 rule files found" in out, "prometheus.yml loads no rules file"


def test_promtool_accepts_the_kubernetes_config(tmp_path: Path) -> None:
    """kubernetes.yml discovers pods. Debian's Prometheus is built without Kubernetes
    discovery, so there the same jobs are checked with a static target in its place (the
    relabeling is still parsed; the live test below runs it against real targets)."""
    promtool = binary("promtool")
    proc = subprocess.run([promtool, "check", "config", "kubernetes.yml"], cwd=PROMETHEUS,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode == 0:
        return
    assert "kubernetes_sd_configs not found" in proc.stdout + proc.stderr, proc.stdout
    config = yaml.safe_load((PROMETHEUS / "kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        del job["kubernetes_sd_configs"]
        job["static_configs"] = [{"targets": ["pod:9100"]}]
    config["rule_files"] = [str(PROMETHEUS / f) for f in config["rule_files"]]
    (tmp_path / "kubernetes.yml").write_text(yaml.safe_dump(config))
    run([promtool, "check", "config", str(tmp_path / "kubernetes.yml")])


def test_promtool_accepts_the_rules() -> None:
    out = run([binary("promtool"), "check", "rules", str(RULES)])
    assert f"{len(alert_rules())} rules found" in out


def test_promtool_rule_unit_tests_pass() -> None:
    tests = sorted((PROMETHEUS / "tests").glob("*.yml"))
    assert tests, "no rule unit tests in deploy/prometheus/tests"
    out = run([binary("promtool"), "test", "rules", *map(str, tests)], cwd=PROMETHEUS / "tests")
    assert "SUCCESS" in out


def test_every_alert_is_tested_firing_and_quiet() -> None:
    fired, quiet = set(), set()
    for path in (PROMETHEUS / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert {"TraciExpertDown", "TraciQueueLatencyHigh", "TraciStepsStalled",
            "TraciRejectionsRising"} <= names  # fmt: skip
    assert names <= fired, f"never seen firing in a test: {sorted(names - fired)}"
    assert names <= quiet, f"never seen quiet in a test: {sorted(names - quiet)}"


def test_rules_read_only_metrics_the_services_export() -> None:
    known = exported_metric_names() | SYNTHETIC
    for rule in alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names and names <= known, f"{rule['alert']} reads {sorted(names - known)}"


def test_promql_metric_names_finds_metrics_not_functions_labels_or_durations() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (namespace, le) (rate(a_bucket{x="y_z"}[5m]))) > 1e3 '
        "and on (job) b_total offset 5m unless c:recorded"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c:recorded"}
    assert promql_metric_names("sum(rate(traci_x_total[$__rate_interval])) by (reason)") == {
        "traci_x_total"
    }


# ---- a real Prometheus against a real cluster ---------------------------------------------


def scrape_config(ports: dict[str, int], prometheus_port: int, targets_file: Path) -> dict:
    """deploy/prometheus/prometheus.yml with its targets moved to this machine's ports, the
    scrape interval at 1 s, plus kubernetes.yml's annotation relabeling over a file of
    targets that carry the pod metadata Kubernetes discovery would."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            hosts = [t.split(":")[0] for t in group["targets"]]
            group["targets"] = [
                f"127.0.0.1:{prometheus_port if h == 'localhost' else ports[h]}" for h in hosts
            ]
    k8s = yaml.safe_load((PROMETHEUS / "kubernetes.yml").read_text())["scrape_configs"][0]
    pods = [
        {
            "targets": ["127.0.0.1:1"],  # the pod IP; the relabeling puts the annotated port
            "labels": {
                "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
                "__meta_kubernetes_pod_annotation_prometheus_io_port": str(port),
                "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics",
                "__meta_kubernetes_pod_label_app_kubernetes_io_component": name.split("-")[0],
                "__meta_kubernetes_namespace": "traci",
                "__meta_kubernetes_pod_name": name if "-" in name else f"{name}-0",
            },
        }
        for name, port in ports.items()
    ]
    targets_file.write_text(json.dumps(pods))
    config["scrape_configs"].append({
        "job_name": "traci-k8s-annotations",
        "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
        "relabel_configs": k8s["relabel_configs"],
    })  # fmt: skip
    return config


class Prometheus:
    def __init__(self, config: dict, workdir: Path) -> None:
        (self.port,) = free_ports(1)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [binary("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.logfile = workdir / "prometheus.log"

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read().decode())

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=promql)
        assert answer["status"] == "success", f"{promql}: {answer}"
        return answer["data"]["result"]

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.logfile.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready:\n{self.logfile.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def finite(result: list[dict[str, Any]]) -> bool:
    return bool(result) and all(math.isfinite(float(r["value"][1])) for r in result)


def dashboard_queries() -> list[str]:
    dashboard = json.loads((GRAFANA / "dashboards" / "traci.json").read_text())
    return [
        t["expr"].replace("$__rate_interval", "15s")
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]


QUEUE_P = (
    "histogram_quantile({q}, sum by (le) "
    '(rate(traci_broker_queue_latency_seconds_bucket{{job="traci-broker"}}[15s])))'
)


@pytest.mark.integration
def test_live_prometheus_scrapes_a_running_cluster(run_config, tmp_path: Path) -> None:
    binary("prometheus")  # skip (or fail in CI) before starting a cluster
    path, cfg = run_config(
        {"train": {"steps": 200_000, "eval_every": 100, "log_every": 25}}, metrics=True
    )
    m = cfg["metrics"]
    ports = {"broker": m["broker_port"], "reducer": m["reducer_port"]}
    ports |= {f"expert-{i}": m["expert_base_port"] + i for i in range(4)}
    with Cluster(path, cfg) as cluster:
        prometheus = Prometheus(
            scrape_config(ports, 0, tmp_path / "targets.json"), tmp_path / "prometheus"
        )
        try:
            prometheus.wait_ready()
            cluster.wait_for_step(100, timeout=240)
            check_live(prometheus, deadline=time.monotonic() + 120)
        finally:
            prometheus.stop()


def check_live(prometheus: Prometheus, deadline: float) -> None:
    """Poll until every answer is there (or the deadline says which is not)."""
    wanted: dict[str, Any] = {
        **{f"queue latency p{q}": (QUEUE_P.format(q=q), finite) for q in ("0.5", "0.95", "0.99")},
        "experts up at the broker": (
            'traci_broker_expert_up{job="traci-broker"} == 1',
            lambda r: sorted(x["metric"]["expert"] for x in r) == ["0", "1", "2", "3"],
        ),
        "expert targets up": (
            'up{job="traci-expert", component="expert"} == 1',
            lambda r: len(r) == 4,
        ),
        "every target up through the Kubernetes relabeling": (
            'up{job="traci-k8s-annotations", component=~"broker|reducer|expert"} == 1',
            lambda r: len(r) == 6 and all(x["metric"]["namespace"] == "traci" for x in r),
        ),
    }
    # Every dashboard query runs; those not filtered with `> 0` also have data.
    for i, expr in enumerate(dashboard_queries()):
        wanted[f"dashboard query {i}: {expr}"] = (expr, lambda r, e=expr: bool(r) or "> 0" in e)
    missing: dict[str, Any] = dict(wanted)
    while missing and time.monotonic() < deadline:
        for name, (promql, ok) in list(missing.items()):
            result = prometheus.query(promql)
            if ok(result):
                del missing[name]
        time.sleep(1)
    assert not missing, "no good answer for:\n" + "\n".join(
        f"{name}: {prometheus.query(q)}" for name, (q, _) in missing.items()
    )
    rules = prometheus.get("/api/v1/rules")["data"]["groups"]
    evaluated = [r for g in rules for r in g["rules"]]
    assert len(evaluated) == 6 and all(r["health"] == "ok" for r in evaluated), evaluated
