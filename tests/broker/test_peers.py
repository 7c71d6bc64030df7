"""The broker's peer registry on its own: who is registered, and the events it returns for the
join book (which owns it; the registry knows nothing of steps)."""

from __future__ import annotations

import ast
import inspect

import pytest

from traci_ml.proto import Goodbye, Hello, Welcome
from traci_ml.services.broker import peers as peers_module
from traci_ml.services.broker.outcomes import EXPERT, REDUCER
from traci_ml.services.broker.peers import (
    ExpertGone,
    ExpertJoined,
    GateOpened,
    PeerRegistry,
    ReducerGone,
    ReducerJoined,
)

pytestmark = pytest.mark.timeout(10)


def registry(n_experts: int = 2) -> PeerRegistry:
    return PeerRegistry(n_experts=n_experts, run_id="run", embed_dim=4, dtype="float32",
                        liveness=1.0)  # fmt: skip


def hello(expert_id: int, next_seq: int = 0) -> Hello:
    return Hello("expert", "run", 4, "float32", expert_id=expert_id, next_seq=next_seq)


def test_the_registry_imports_nothing_of_the_join() -> None:
    tree = ast.parse(inspect.getsource(peers_module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any("join" in (name or "") for name in imported)


def test_registrations_return_what_changed_in_order() -> None:
    peers = registry()
    out, events = peers.hello(EXPERT, b"e0", hello(0, next_seq=5), 0.0)
    assert events == [] and out.sends == [] and not peers.started  # waits for the gate
    out, events = peers.hello(EXPERT, b"e1", hello(1, next_seq=7), 0.0)
    assert events == [GateOpened(7)] and peers.started
    assert [s.message.start_seq for s in out.sends] == [7, 7]  # type: ignore[attr-defined]
    out, events = peers.hello(REDUCER, b"r", Hello("reducer", "run", 4, "float32", n_experts=2),
                              0.0)  # fmt: skip
    assert out.sends == [] and events == [ReducerJoined(b"r", peers.reducer.token)]  # type: ignore[union-attr]
    # the same expert again on its route: the old registration goes, the new one joins
    out, events = peers.hello(EXPERT, b"e1", hello(1), 0.5, join_seq=9)
    assert events == [ExpertGone(1), ExpertJoined(1)]
    [send] = out.sends
    assert isinstance(send.message, Welcome) and send.message.start_seq == 9
    assert peers.expected(9) == {0, 1} and peers.expected(8) == {0}


def test_departures_and_silence_are_events() -> None:
    peers = registry()
    for i in range(2):
        peers.hello(EXPERT, f"e{i}".encode(), hello(i), 0.0)
    peers.hello(REDUCER, b"r", Hello("reducer", "run", 4, "float32", n_experts=2), 0.0)
    _, events = peers.goodbye(EXPERT, b"e0", Goodbye("shutdown"), 0.1)
    assert events == [ExpertGone(0)] and peers.live_experts == 1
    peers.touch(EXPERT, b"e1", 0.9)
    out, events = peers.expire(1.5)  # the reducer was last seen at 0.0, expert 1 at 0.9
    assert events == [ReducerGone("reducer timed out")] and not peers.reducer_up
    _, events = peers.expire(2.0)
    assert events == [ExpertGone(1)] and out.notes == []
    out, events = peers.goodbye(REDUCER, b"r", Goodbye("done"), 2.1)
    assert out.rejected == "unregistered" and events == []
