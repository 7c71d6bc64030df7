"""Entry point of one expert process: build, run, close."""

from __future__ import annotations

from traci_ml.core.config import Config
from traci_ml.core.observe import serve_metrics
from traci_ml.core.signals import stop_on_signals
from traci_ml.core.tensors import set_threads
from traci_ml.services.expert.metrics import ExpertMetrics
from traci_ml.services.expert.service import ExpertService


def run(config: Config, *, expert_id: int, resume: bool = False, serve: bool = False) -> int:
    set_threads(config.expert.torch_threads)
    metrics = ExpertMetrics(expert_id)
    base = config.metrics.expert_base_port
    serve_metrics(metrics.registry, bind=config.metrics.bind, port=base + expert_id if base else 0)
    stop = stop_on_signals(f"expert-{expert_id}")
    expert = ExpertService(
        config, expert_id, resume=resume, metrics=metrics, stop=stop, serve=serve
    )
    code = expert.run()
    if code == 0 and not stop.is_set() and not serve:
        metrics.run_end.finished(config.metrics.final_scrape)
    return code
