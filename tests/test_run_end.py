"""observe.RunEnd: a service whose run is done keeps its metrics endpoint up until one more
scrape has read traci_run_finished 1 (compose's Prometheus then knows finished from dead)."""

from __future__ import annotations

import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from tests.helpers.support import free_ports
from traci_ml.core.observe import RunEnd, serve_metrics


def scrape(port: int, query: str = "") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics{query}", timeout=5) as r:
        return r.read().decode()


def test_finished_waits_for_the_scrape_that_reads_it() -> None:
    registry = CollectorRegistry()
    Counter("traci_test_steps", "steps", registry=registry).inc(3)
    end = RunEnd(registry)
    (port,) = free_ports(1)
    serve_metrics(registry, bind="127.0.0.1", port=port)
    assert "traci_run_finished 0.0" in scrape(port)  # running
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(end.finished(30.0)))
    started = time.monotonic()
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive(), "finished() returned before any scrape"
    text = scrape(port)
    waiter.join(5)
    assert result == [True] and time.monotonic() - started < 10
    assert "traci_run_finished 1.0" in text and "traci_test_steps_total 3.0" in text


def test_no_wait_and_no_scrape_return_at_once() -> None:
    end = RunEnd(CollectorRegistry())
    started = time.monotonic()
    assert end.finished(0.0) is False
    assert end.finished(0.2) is False  # nobody scraped: give up after the wait
    assert time.monotonic() - started < 2
    assert end.value == 1


def test_a_scrape_by_name_of_other_metrics_is_not_the_final_one() -> None:
    """``traci health`` asks for its own metric by name (``name[]``): that request must not
    release a finished service before Prometheus has read traci_run_finished 1."""
    registry = CollectorRegistry()
    Counter("traci_test_steps", "steps", registry=registry).inc(3)
    end = RunEnd(registry)
    (port,) = free_ports(1)
    serve_metrics(registry, bind="127.0.0.1", port=port)
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(end.finished(30.0)))
    waiter.start()
    time.sleep(0.3)
    text = scrape(port, "?name[]=traci_test_steps_total")
    assert "traci_test_steps_total 3.0" in text and "traci_run_finished" not in text
    time.sleep(0.5)
    assert waiter.is_alive(), "a health check's request passed for the final scrape"
    assert "traci_run_finished 1.0" in scrape(port)
    waiter.join(5)
    assert result == [True]


def test_traci_health_is_not_the_final_scrape(tmp_path) -> None:
    """The containers' health check answers 0 for a live broker endpoint and leaves a
    finished broker waiting for Prometheus."""
    import json

    from prometheus_client import Gauge

    from traci_ml.app.cli import main

    registry = CollectorRegistry()
    Gauge("traci_broker_live_experts", "live", registry=registry).set(4)
    Gauge("traci_broker_serve_ready", "ready", registry=registry).set(1)
    end = RunEnd(registry)
    (port,) = free_ports(1)
    serve_metrics(registry, bind="127.0.0.1", port=port)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"run_dir": str(tmp_path / "run"),
                               "metrics": {"broker_port": port}}))  # fmt: skip
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(end.finished(30.0)))
    waiter.start()
    time.sleep(0.3)
    assert main(["health", "broker", "--config", str(cfg)]) == 0
    assert main(["health", "broker", "--ready", "--config", str(cfg)]) == 0
    time.sleep(0.5)
    assert waiter.is_alive(), "traci health passed for the final scrape"
    scrape(port)
    waiter.join(5)
    assert result == [True]
