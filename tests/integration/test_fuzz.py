"""Bad input at every socket of every service, while a real training run goes on.

The live run (``fuzz_run.run_scenario``): broker, reducer and four experts started by hand, the
peers behind a fuzzing man-in-the-middle (``fuzz_proxy.FuzzProxy``), and at least 10,000
malformed messages (``fuzzing.py``) spread over the broker's two ports (raw DEALERs, and a
registered peer's own connection), each expert and the reducer. Nothing may crash, training
must reach its usual accuracy without losing a step, and every service must count every
malformed message it got, under the reason it deserves.

Then focused tests, one service each against a fake broker, for well-formed but wrong messages
the live run cannot inject without breaking it (they were bugs the fuzzer found).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.fuzz_run import FuzzReport, format_report, run_scenario, scrape
from tests.helpers.fuzzing import (
    BROKER_TARGETS,
    TARGETS,
    PeerView,
    RunFacts,
    batch,
    draw,
    emb,
    grad,
    reason_of,
)
from tests.helpers.support import FakeBroker
from traci_ml import proto

TRACI = [sys.executable, "-m", "traci_ml.app.cli"]
MESSAGES = 10_500
STEPS = 600


# ---- the generators say what decode says ------------------------------------------------


def test_every_generator_is_labelled_with_the_reason_it_gets():
    """Decode-level garbage fails ``proto.decode`` with its labelled reason; semantic fuzz
    decodes, so it reaches (and must be refused by) the service's own checks."""
    run = RunFacts("digits", 64, "float32", 4, 64, 602)
    rng, seeded = random.Random(7), random.Random(0)
    seen: Counter[tuple[str, str]] = Counter()
    for target in TARGETS:
        peer = PeerView(expert_id=1, all_live=True, last_batch_seq=100)
        peer.unanswered = {101: "train", 102: "eval"}
        peer.outbound.extend([emb(seeded, run, 5, 1), grad(seeded, run, 5, -1, 4)])
        peer.inbound.extend([grad(seeded, run, 5, 1, 1), batch(seeded, run, 5)])
        for _ in range(600):
            fuzz = draw(rng, target, run, peer)
            reason = reason_of(fuzz.frames)
            seen[(target, fuzz.category)] += 1
            if fuzz.decodes:
                assert reason is None, (target, fuzz.category, reason)
            else:
                assert reason in fuzz.expect, (target, fuzz.category, reason, fuzz.expect)
    categories = {category for _, category in seen}
    assert len(categories) >= 30, sorted(categories)


# ---- the live run ------------------------------------------------------------------------


def owed_by_reason(report: FuzzReport, service: str) -> Counter[tuple[str, ...]]:
    """Messages ``service`` must count, keyed by the reasons each may be counted under."""
    owed = Counter(report.expected.get(service, Counter()))
    owed[("unknown_step",)] += report.reactions[service]
    return owed


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_ten_thousand_malformed_messages_during_a_training_run(run_config, tmp_path):
    _, cfg = run_config(
        {"train": {"steps": STEPS, "eval_every": STEPS // 2}}, metrics=True
    )  # digits defaults otherwise: 4 experts, window 2
    t0 = time.monotonic()
    report = run_scenario(cfg, tmp_path, messages=MESSAGES, seed=0)
    print(format_report(report))
    print(f"test wall time {time.monotonic() - t0:.0f}s")
    logs = {p.stem: p.read_text() for p in report.logs.glob("*.log")}

    # Nothing crashed, and nothing of the run was lost.
    assert not report.notes, report.notes
    assert report.crashes == [], {name: logs[name][-3000:] for name in report.crashes}
    assert report.summary is not None
    assert report.summary["test_accuracy"] >= 0.97
    assert report.summary["steps"] == STEPS and report.summary["steps_skipped"] == 0
    for name, accounts in report.accounts.items():
        assert accounts["applied"] == STEPS and accounts["dropped"] == 0, (name, accounts)

    # Enough fuzz, at every target and every service, during training.
    assert report.total_sent >= 10_000
    assert report.final_scrape, "the services' counters were not read with the run settled"
    targets = {target for target, _ in report.sent}
    assert targets == set(TARGETS), targets
    services = ["broker", "reducer", *(f"expert-{i}" for i in range(4))]
    for service in services:
        assert report.sent_to(service) >= 500, service

    # Every malformed message was rejected and counted, once, under its reason. A service
    # counts exactly what it was sent plus what the fuzz provoked on the far side: a broker
    # DROP (late / too_far_ahead) answering a replayed or far-future EMB reaches the expert
    # for a step it no longer holds (unknown_step), and the reducer's DROP answering a replayed
    # or out-of-schedule BATCH reaches the broker for a step it no longer awaits
    # (unknown_step). No slack beyond that: the semantic fuzz only uses messages a service can
    # tell from good traffic, and the good traffic itself is never rejected. The only reason
    # left to a race is duplicate-vs-late for a replayed EMB (is its step answered yet?).
    for service in services:
        counted = report.rejections.get(service, Counter())
        assert sum(counted.values()) == report.due(service), (service, counted)
        owed = owed_by_reason(report, service)
        for reasons in owed:
            landed = sum(counted[r] for r in reasons)
            due = sum(n for other, n in owed.items() if set(other) <= set(reasons))
            assert landed >= due, (service, reasons, landed, due)
    broker_sent = sum(n for (target, _), n in report.sent.items() if target in BROKER_TARGETS)
    assert broker_sent == report.sent_to("broker")

    # ... and logged.
    for service in services:
        assert "rejected" in logs[service], service


# ---- focused: holes a live run cannot include ---------------------------------------------


def start_peer(args: list[str], path: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([*TRACI, *args, "--config", str(path)], stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip


def register(broker: FakeBroker, proc: subprocess.Popen, log: Path) -> list[proto.Message]:
    for _ in range(120):  # the peer imports torch first
        got = broker.serve(0.5)
        if any(isinstance(m, proto.Hello) for m in got):
            broker.send(proto.Welcome(ok=True, start_seq=0))
            return got
        assert proc.poll() is None, log.read_text()[-3000:]
    pytest.fail("no HELLO within 60s")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        proc.kill()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_reducer_counts_and_survives_kinds_not_meant_for_it(run_config, tmp_path):
    path, cfg = run_config(metrics=True)
    broker, log = FakeBroker(cfg["network"]["reducer_port"]), tmp_path / "reducer.log"
    proc = start_peer(["reducer"], path, log)
    try:
        register(broker, proc, log)
        wrong = [proto.Welcome(ok=True), proto.Ack(5), proto.Drop(5, "x"), proto.Hello(
            "expert", "digits", 64, "float32", expert_id=0)]  # fmt: skip
        for msg in wrong:
            broker.send(msg)
        broker.serve(2.0)
        assert proc.poll() is None, log.read_text()[-3000:]
        counted = scrape(cfg["metrics"]["reducer_port"])
        assert counted is not None and counted["unexpected_kind"] == len(wrong), counted
        assert stop(proc) == 0
    finally:
        proc.kill()
        proc.wait()
        broker.close(term=True)


@pytest.mark.integration
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "forged",
    [
        "ack_for_a_train_step",
        "grad_of_another_dtype",
    ],
)  # fmt: skip
def test_expert_refuses_a_forged_answer_and_keeps_the_step(run_config, tmp_path, forged):
    """A well-formed but wrong answer for a step in flight is refused; the real GRAD that
    follows is still applied."""
    path, cfg = run_config(metrics=True)
    broker, log = FakeBroker(cfg["network"]["expert_port"]), tmp_path / "expert.log"
    proc = start_peer(["expert", "--id", "0"], path, log)
    try:
        got = register(broker, proc, log)
        got += broker.serve(1.0)
        seqs = [m.seq for m in got if isinstance(m, proto.Emb)]
        assert seqs[:1] == [0], got  # train step 0 in flight
        b, d = cfg["train"]["batch_size"], cfg["embed_dim"]
        if forged == "ack_for_a_train_step":
            broker.send(proto.Ack(0))
        else:
            half = proto.Tensor.from_numpy(np.zeros((b, d), dtype=np.float16))
            broker.send(proto.Grad(0, 0, (half,)))
        real = proto.Tensor.from_numpy(np.full((b, d), 1e-3, dtype=np.float32))
        broker.send(proto.Grad(0, 0, (real,)))
        broker.serve(1.5)
        port = cfg["metrics"]["expert_base_port"]
        counted = scrape(port)
        assert counted is not None and sum(counted.values()) == 1, counted  # the forged one
        assert counted["unknown_step"] == 0, "the real GRAD came too late: the forgery took it"
        text = urlopen_text(port)
        assert 'traci_expert_eval_acked_total{expert="0"} 0.0' in text
        assert 'traci_expert_gradients_applied_total{expert="0"} 1.0' in text
        assert stop(proc) == 0
    finally:
        proc.kill()
        proc.wait()
        broker.close(term=True)


def urlopen_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()
