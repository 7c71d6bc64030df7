"""Entry point of the reducer process: build, run, close."""

from __future__ import annotations

from traci_ml.core.config import Config
from traci_ml.core.observe import serve_metrics
from traci_ml.core.signals import stop_on_signals
from traci_ml.core.tensors import set_threads
from traci_ml.services.reducer.service import ReducerService


def run(config: Config, *, resume: bool = False, serve: bool = False) -> int:
    set_threads(config.reducer.torch_threads)
    stop = stop_on_signals("reducer")
    service = ReducerService(config, resume=resume, stop=stop, serve=serve)
    serve_metrics(
        service.metrics.registry, bind=config.metrics.bind, port=config.metrics.reducer_port
    )
    code = service.run()
    if code == 0 and not stop.is_set() and not serve:
        service.metrics.run_end.finished(config.metrics.final_scrape)
    return code
