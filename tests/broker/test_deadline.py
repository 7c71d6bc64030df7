"""The deadline join (join.quorum / join.deadline): pure book logic, time passed in."""

from __future__ import annotations

import pytest

from tests.broker.test_join import RED, batches, emb, rid, sent, started
from traci_ml.core.config import Config, JoinConfig
from traci_ml.proto import Drop, Grad
from traci_ml.services.broker.deadline import Deadline
from traci_ml.services.broker.join import JoinBook
from traci_ml.services.broker.outcomes import EXPERT, REDUCER

pytestmark = pytest.mark.timeout(10)


def deadline_book(n: int = 4, *, quorum: int = 2, fixed: float | None = 0.1,
                  grace: float = 1.0, min_deadline: float = 0.05) -> JoinBook:  # fmt: skip
    clock = Deadline(quorum, fixed=fixed, min_deadline=min_deadline, grace=grace, ceiling=10.0)
    return started(n, deadline=clock)  # type: ignore[arg-type]


def test_a_step_with_its_quorum_goes_without_the_late_expert_at_the_deadline() -> None:
    book = deadline_book(3, quorum=2)
    assert not batches(book.emb(rid(0), emb(0, 0), 1.00))
    assert book.next_deadline() == float("inf")  # no quorum yet: no deadline
    assert not batches(book.emb(rid(1), emb(0, 1), 1.02))  # the quorum: deadline 1.12
    assert book.next_deadline() == pytest.approx(1.12)
    assert not batches(book.release_due(1.11))
    out = book.release_due(1.12)
    assert [(b.seq, b.present) for b in batches(out)] == [(0, (True, True, False))]
    # its EMB now is late: DROP names where the others are, so it can skip ahead
    book.emb(rid(0), emb(1, 0), 1.13)
    late = book.emb(rid(2), emb(0, 2), 1.2)
    assert late.rejected == "late" and sent(late, Drop) == [(rid(2), Drop(0, "late", 2))]


def test_the_whole_step_goes_at_once_when_everybody_sends_in_time() -> None:
    book = deadline_book(3, quorum=2)
    book.emb(rid(0), emb(0, 0), 1.0)
    book.emb(rid(1), emb(0, 1), 1.0)
    out = book.emb(rid(2), emb(0, 2), 1.05)  # before the deadline: exact, nobody masked
    assert [(b.seq, b.present) for b in batches(out)] == [(0, (True, True, True))]
    assert book.next_deadline() == float("inf")


def test_eval_steps_wait_for_everyone() -> None:
    book = deadline_book(3, quorum=1)
    book.emb(rid(0), emb(0, 0, phase="eval"), 0.1)
    book.emb(rid(1), emb(0, 1, phase="eval"), 0.1)
    assert book.next_deadline() == float("inf")
    assert not batches(book.release_due(0.8)) and not batches(book.tick(0.8))
    out = book.emb(rid(2), emb(0, 2, phase="eval"), 0.9)
    assert [(b.seq, b.present) for b in batches(out)] == [(0, (True, True, True))]


def test_later_steps_leave_in_order_behind_a_head_at_its_deadline() -> None:
    book = deadline_book(3, quorum=2)
    for seq in (0, 1, 2):
        book.emb(rid(0), emb(seq, 0), 1.0 + seq / 100)
        book.emb(rid(1), emb(seq, 1), 1.0 + seq / 100)
    book.emb(rid(2), emb(1, 2), 1.02)  # expert 2 is in time for step 1 only
    out = book.release_due(1.1)  # step 0's deadline; step 1 is complete; step 2 waits
    assert [(b.seq, b.present) for b in batches(out)] == [
        (0, (True, True, False)),
        (1, (True, True, True)),
    ]
    assert book.next_deadline() == pytest.approx(1.12)


def test_a_punctual_expert_gets_the_grace() -> None:
    book = deadline_book(2, quorum=1, fixed=0.1, grace=4.0)
    book.emb(rid(0), emb(0, 0), 0.1)
    assert book.next_deadline() == pytest.approx(0.5)  # expert 1 was never late: 4 x 0.1
    out = book.emb(rid(1), emb(0, 1), 0.4)  # a hiccup, within the grace: nobody masked
    assert [b.present for b in batches(out)] == [(True, True)]
    book.emb(rid(0), emb(1, 0), 0.5)
    assert book.next_deadline() == pytest.approx(0.9)  # lateness 0.03: still punctual
    assert book.deadline is not None and book.deadline.lateness[1] == pytest.approx(0.03)


def test_a_steady_straggler_loses_the_grace_within_a_few_steps() -> None:
    book = deadline_book(2, quorum=1, fixed=0.1, grace=8.0)
    t, waits, present = 1.0, [], []
    for seq in range(8):  # expert 1 always comes 0.3 s after expert 0 (within 8 x 0.1)
        for peer, route in ((EXPERT, rid(0)), (EXPERT, rid(1)), (REDUCER, RED)):
            book.peers.touch(peer, route, t)
        out = book.emb(rid(0), emb(seq, 0), t)
        due = book.next_deadline()
        waits.append(round(due - t, 3))
        if due < t + 0.3:
            out = book.release_due(due)
        out = out if batches(out) else book.emb(rid(1), emb(seq, 1), t + 0.3)
        present += [b.present for b in batches(out)]
        book.grad(RED, Grad(seq, -1, (emb(seq, 0).tensor,) * sum(present[-1])), t + 0.31)
        t += 0.4
    assert waits[0] == 0.8 and waits[-1] == 0.1, waits
    assert present[0] == (True, True) and present[-1] == (True, False), present


def test_the_adaptive_deadline_follows_how_late_the_last_token_comes() -> None:
    clock = Deadline(1, fixed=None, min_deadline=0.01, grace=1.0, ceiling=10.0)
    assert clock.current == 0.01
    for k in range(64):
        t = float(k)
        clock.observe(t, t + 0.02, t + 0.1, {0, 1}, {0})  # quorum 20 ms after the first token
    assert clock.current == pytest.approx(0.08)  # 4 x the 90th percentile
    for k in range(8):
        clock.observe(200.0 + k, 250.0 + k, 250.0 + k, {0, 1}, {0, 1})  # wild ones: capped
    assert clock.current == 10.0
    assert Deadline(1, fixed=None, min_deadline=0.5, grace=1.0, ceiling=0.2).ceiling == 0.5


def test_quorum_all_is_the_old_join_and_auto_is_all_but_one() -> None:
    assert JoinConfig(quorum="all").quorum_of(4) == 4
    assert JoinConfig().quorum_of(4) == 3 and JoinConfig().quorum_of(2) == 1
    assert JoinConfig().quorum_of(1) == 1  # one expert: nobody to go without
    assert JoinConfig(quorum=9).quorum_of(4) == 4
    config = Config.model_validate({"join": {"quorum": "all"}})
    assert JoinBook.from_config(config, n_experts=4).deadline is None
    assert JoinBook.from_config(Config(), n_experts=4).deadline is not None
    with pytest.raises(Exception, match="join.quorum"):
        Config.model_validate({"join": {"quorum": 0}})
    with pytest.raises(Exception, match="join.deadline"):
        Config.model_validate({"join": {"deadline": -1}})


def test_a_masked_expert_still_gets_no_reply_for_the_step() -> None:
    book = deadline_book(2, quorum=1)
    book.emb(rid(0), emb(0, 0), 0.0)
    [batch] = batches(book.release_due(0.1))
    assert batch.present == (True, False)
    assert book.dispatched_steps == 1 and RED  # only expert 0 holds a token: GRAD has one tensor


def test_an_adaptive_deadline_waits_for_everyone_until_it_has_seen_steps() -> None:
    clock = Deadline(1, fixed=None, min_deadline=0.05, grace=1.0, ceiling=30.0)
    for k in range(15):
        clock.observe(float(k), float(k) + 0.001, float(k) + 0.002, {0, 1}, {0, 1})
        assert clock.allowance({1}) == 30.0  # start-up is uneven: no deadline yet
    clock.observe(15.0, 15.001, 15.002, {0, 1}, {0, 1})
    assert clock.allowance({1}) == 0.05
