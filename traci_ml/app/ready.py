"""``traci serve`` says when its front door can answer, and when it no longer can.

Ready is the broker's own word for it: ``traci_broker_serve_ready`` (a reducer registered, a
live expert, the start gate open; what ``traci health broker --ready`` asks). With the
broker's metrics off (``metrics.broker_port: 0``) the services' own "ready" lines stand in:
the reducer registered, and an expert welcomed (which the broker does only once its start
gate is open), each since its last start.
"""

from __future__ import annotations

import time

from traci_ml.app.follow import LOOK, scrape
from traci_ml.app.supervisor import Child, Console
from traci_ml.core.config import Config


class LogReady:
    """Whether each service has logged its "ready" line since it last started."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, int, bool]] = {}  # name -> (starts, offset, ready)

    def ready(self, child: Child) -> bool:
        starts, offset, ready = self._seen.get(child.name, (-1, 0, False))
        if starts != child.restarts:  # a new process: ready again only once it says so
            ready = False
            starts = child.restarts
        try:
            with child.log_path.open("rb") as fh:
                fh.seek(offset)
                text = fh.read()
        except OSError:
            text = b""
        done = text.rfind(b"\n") + 1  # whole lines only
        if f"{child.name} ready:".encode() in text[:done]:
            ready = True
        self._seen[child.name] = (starts, offset + done, ready and child.code is None)
        return self._seen[child.name][2]


class ServeReady:
    """``on_tick`` of ``traci serve``: one line when serving becomes possible, one when not."""

    def __init__(self, config: Config, console: Console, where: str) -> None:
        self.config, self.console, self.where = config, console, where
        self.ready = False
        self.started = time.monotonic()
        self.looked = float("-inf")
        self.logs = LogReady()

    def update(self, children: list[Child]) -> None:
        now = time.monotonic()
        if now - self.looked < LOOK:
            return
        self.looked = now
        ready, who = self._look(children)
        if ready == self.ready or ready is None:
            return
        self.ready = ready
        if ready:
            self.console.line(
                f"ready: answering on {self.where} ({who}), {now - self.started:.1f}s after start"
            )
        else:
            self.console.line(f"not ready: {self.where} cannot answer now ({who})")

    def _look(self, children: list[Child]) -> tuple[bool | None, str]:
        m = self.config.metrics
        experts = [c for c in children if c.name.startswith("expert-")]
        if m.broker_port:
            found = scrape(m.bind, m.broker_port)
            if found is None:
                return False, "the broker's metrics do not answer"
            live = int(found.get("traci_broker_live_experts", 0))
            if found.get("traci_broker_serve_ready") == 1.0:
                return True, f"{live} of {len(experts)} experts live"
            why = "no reducer" if found.get("traci_broker_reducer_up") != 1.0 else None
            return False, why or f"{live} of {len(experts)} experts live, start gate closed"
        reducer = next((c for c in children if c.name == "reducer"), None)
        if reducer is None:
            return None, ""
        live = sum(self.logs.ready(c) for c in experts)
        if self.logs.ready(reducer) and live:
            return True, f"reducer and {live} of {len(experts)} experts registered"
        return False, f"reducer {'registered' if self.logs.ready(reducer) else 'not ready'}, " \
            f"{live} of {len(experts)} experts registered"  # fmt: skip
