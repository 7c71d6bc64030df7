"""traci_broker_serving tells a broker serving a finished run from a training one: the alert
TraciStepsStalled (deploy/prometheus/rules) stays quiet for the first only."""

from __future__ import annotations

import pytest
import zmq

from traci_ml.core.config import load_config
from traci_ml.services.broker.service import BrokerService

ANY = "tcp://127.0.0.1:*"


@pytest.mark.parametrize("serve", [False, True])
def test_the_serving_gauge_says_which_broker_this_is(serve: bool) -> None:
    config = load_config(overrides={"metrics.broker_port": "0"}, env={})
    ctx = zmq.Context()
    broker = BrokerService(config, expert_endpoint=ANY, reducer_endpoint=ANY,
                           client_endpoint=ANY, context=ctx, serve=serve)  # fmt: skip
    try:
        value = broker.metrics.registry.get_sample_value("traci_broker_serving")
        assert value == (1.0 if serve else 0.0)
    finally:
        broker.close()
        ctx.term()
