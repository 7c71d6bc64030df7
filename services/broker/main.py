"""Entry point of the broker service: build metrics, serve them, run the loop until done."""

from __future__ import annotations

import logging
import threading

from traci_ml.core.config import Config
from traci_ml.core.data import expert_count
from traci_ml.core.observe import serve_metrics
from traci_ml.core.signals import stop_on_signals
from traci_ml.services.broker.metrics import BrokerMetrics
from traci_ml.services.broker.service import BrokerService

log = logging.getLogger(__name__)


def run(config: Config, *, serve: bool = False) -> int:
    """Run the broker for ``config``; returns the process exit code (0: done or stopped).
    ``serve`` (``traci serve``): the front door for served prediction must bind."""
    n_experts = expert_count(config)
    metrics = BrokerMetrics(n_experts)
    bind = config.metrics.bind
    served = serve_metrics(metrics.registry, bind=bind, port=config.metrics.broker_port)
    if served is not None:
        log.info("broker metrics on http://%s:%d/metrics", bind, served)
    # Signal handlers can only be installed from the main thread (tests run us elsewhere).
    in_main = threading.current_thread() is threading.main_thread()
    stop = stop_on_signals("broker") if in_main else threading.Event()
    broker = BrokerService(config, metrics=metrics, n_experts=n_experts, stop=stop, serve=serve)
    code = broker.run()
    if code == 0 and not stop.is_set() and not serve:  # the reducer said the run is done
        metrics.run_end.finished(config.metrics.final_scrape)
    return code
