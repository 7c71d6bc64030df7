"""Unit tests of the broker's join book: pure logic, no sockets, time passed in."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from traci_ml.proto import Ack, Batch, Drop, Emb, Goodbye, Grad, Heartbeat, Hello, Tensor, Welcome
from traci_ml.services.broker.join import JoinBook
from traci_ml.services.broker.outcomes import EXPERT, REDUCER, Outcome

D = 4  # embed_dim
B = 2  # batch rows
RED = b"reducer"

pytestmark = pytest.mark.timeout(10)


def rid(expert_id: int) -> bytes:
    return f"expert-{expert_id}".encode()


def make_book(n_experts: int = 2, **overrides: float) -> JoinBook:
    settings = dict(
        n_experts=n_experts, run_id="run", embed_dim=D, dtype="float32", window=4,
        max_pending_steps=8, liveness=1.0, step_timeout=10.0,
    )  # fmt: skip
    settings.update(overrides)
    return JoinBook(**settings)  # type: ignore[arg-type]


def hello(expert_id: int = 0, **fields: object) -> Hello:
    base = dict(role="expert", run_id="run", embed_dim=D, dtype="float32", expert_id=expert_id)
    base.update(fields)
    return Hello(**base)  # type: ignore[arg-type]


def reducer_hello(n_experts: int = 2, **fields: object) -> Hello:
    return hello(role="reducer", expert_id=-1, n_experts=n_experts, **fields)


def emb(seq: int, expert_id: int, *, phase: str = "train", rows: int = B, width: int = D,
        dtype: type = np.float32) -> Emb:  # fmt: skip
    data = np.full((rows, width), 10 * seq + expert_id, dtype=dtype)
    return Emb(seq, expert_id, phase, Tensor.from_numpy(data))


def sent(out: Outcome, kind: type, socket: str | None = None) -> list[tuple[bytes, object]]:
    """What ``out`` sends of ``kind``; a WELCOME's secret token is checked and blanked."""
    found = []
    for s in out.sends:
        if isinstance(s.message, kind) and (socket is None or s.socket == socket):
            msg = s.message
            if isinstance(msg, Welcome):
                assert (len(msg.token) == 32) == msg.ok  # a fresh secret with every acceptance
                msg = dataclasses.replace(msg, token="")
            found.append((s.routing_id, msg))
    return found


def started(n_experts: int = 2, *, reducer: bool = True, now: float = 0.0, **kw: float) -> JoinBook:
    """A book with every expert registered (gate open) and, by default, a reducer."""
    book = make_book(n_experts, **kw)
    welcomed = []
    for i in range(n_experts):
        welcomed += sent(book.hello(EXPERT, rid(i), hello(i), now), Welcome)
    assert welcomed == [(rid(i), Welcome(ok=True, start_seq=0)) for i in range(n_experts)]
    if reducer:
        book.hello(REDUCER, RED, reducer_hello(n_experts), now)
    return book


def both(message: object) -> list[tuple[bytes, object]]:
    """``message`` sent to experts 0 and 1."""
    return [(rid(0), message), (rid(1), message)]


def batches(out: Outcome) -> list[Batch]:
    return [m for _, m in sent(out, Batch)]  # type: ignore[misc]


# ---- registration and the start gate --------------------------------------------------------


def test_start_gate_holds_welcome_until_every_expert_registered() -> None:
    book = make_book(2)
    book.hello(REDUCER, RED, reducer_hello(), 0.0)
    out = book.hello(EXPERT, rid(0), hello(0), 0.0)
    assert sent(out, Welcome) == []  # held: nobody may send a step before the start is known
    out = book.emb(rid(0), emb(0, 0), 0.1)  # a peer that sends anyway is refused
    assert out.rejected == "not_started" and sent(out, Drop) == [(rid(0), Drop(0, "not_started"))]
    assert not book.started and book.pending_steps == 0
    out = book.hello(EXPERT, rid(1), hello(1), 0.2)
    assert sent(out, Welcome) == both(Welcome(ok=True, start_seq=0))
    assert book.started
    book.emb(rid(0), emb(0, 0), 0.3)
    out = book.emb(rid(1), emb(0, 1), 0.3)
    assert [b.seq for b in batches(out)] == [0]
    assert batches(out)[0].present == (True, True)


def test_a_restarted_broker_starts_at_the_highest_position_its_peers_report() -> None:
    book = make_book(2)
    book.hello(REDUCER, RED, reducer_hello(next_seq=700), 0.0)
    book.hello(EXPERT, rid(0), hello(0, next_seq=702), 0.0)
    out = book.hello(EXPERT, rid(1), hello(1, next_seq=703), 0.1)
    assert sent(out, Welcome) == both(Welcome(ok=True, start_seq=703))
    assert book.next_seq == 703
    assert book.emb(rid(0), emb(702, 0), 0.2).rejected == "late"


@pytest.mark.parametrize(
    ("socket", "message", "words"),
    [
        (EXPERT, hello(0, run_id="other"), "run_id"),
        (EXPERT, hello(0, embed_dim=D + 1), "embed_dim"),
        (EXPERT, hello(0, dtype="float16"), "dtype"),
        (EXPERT, hello(2), "expert_id"),
        (EXPERT, reducer_hello(), "role"),
        (REDUCER, reducer_hello(3), "n_experts"),
        (REDUCER, reducer_hello(run_id="other"), "run_id"),
        (REDUCER, hello(0), "role"),
    ],
)
def test_hello_refused_with_reason(socket: str, message: Hello, words: str) -> None:
    book = make_book(2)
    out = book.hello(socket, b"peer", message, 0.0)
    assert out.rejected == "refused"
    [(to, welcome)] = sent(out, Welcome)
    assert to == b"peer" and not welcome.ok and words in welcome.reason  # type: ignore[attr-defined]
    assert book.peers.registered_experts == 0 and not book.peers.reducer_up


def test_id_held_by_live_peer_is_refused_but_free_after_it_leaves() -> None:
    book = make_book(1)
    book.hello(EXPERT, b"a", hello(0), 0.0)
    out = book.hello(EXPERT, b"b", hello(0), 0.1)
    assert out.rejected == "held" and sent(out, Welcome)[0][1].reason.startswith("held:")  # type: ignore[attr-defined]
    book.goodbye(EXPERT, b"a", Goodbye("shutdown"), 0.2)
    assert sent(book.hello(EXPERT, b"b", hello(0), 0.3), Welcome)[0][1].ok  # type: ignore[attr-defined]


def test_second_live_reducer_refused() -> None:
    book = make_book(2)
    book.hello(REDUCER, b"r1", reducer_hello(), 0.0)
    out = book.hello(REDUCER, b"r2", reducer_hello(), 0.1)
    assert out.rejected == "held" and "reducer" in sent(out, Welcome)[0][1].reason  # type: ignore[attr-defined]


def welcomed_token(out: Outcome) -> str:
    [send] = [s for s in out.sends if isinstance(s.message, Welcome)]
    assert send.message.ok
    return send.message.token


def test_rejoin_on_a_new_route_needs_the_registration_secret() -> None:
    """A live registration is taken over only by whoever holds its WELCOME's secret: the
    peer itself, reconnecting on a new socket. A stranger naming the id is held off."""
    book = make_book(1)
    token = welcomed_token(book.hello(EXPERT, b"a", hello(0), 0.0))
    guess = dataclasses.replace(hello(0), token="0" * 32)
    assert book.hello(EXPERT, b"x", guess, 0.1).rejected == "held"
    rejoin = book.hello(EXPERT, b"b", dataclasses.replace(hello(0), token=token), 0.2)
    assert rejoin.rejected is None
    new_token = welcomed_token(rejoin)
    assert new_token != token and book.peers.serve_targets()[0] == {0: b"b"}  # the new route
    assert book.peers.key_of(EXPERT, b"b") is None and book.peers.live_experts == 1
    # the old route is retired: its messages are unregistered now
    assert book.peers.heartbeat(EXPERT, b"a", Heartbeat(), 0.3).rejected == "unregistered"
    # the old secret is spent
    again = book.hello(EXPERT, b"c", dataclasses.replace(hello(0), token=token), 0.3)
    assert again.rejected == "held"


def test_reducer_rejoin_with_its_secret_replaces_the_old_route() -> None:
    book = make_book(2)
    token = welcomed_token(book.hello(REDUCER, b"r1", reducer_hello(), 0.0))
    out = book.hello(REDUCER, b"r2", dataclasses.replace(reducer_hello(), token=token), 0.1)
    assert out.rejected is None and book.peers.live_peers() == [(REDUCER, b"r2")]


def test_keys_bound_hello_must_match_its_key_role() -> None:
    book = JoinBook(
        n_experts=2, run_id="run", embed_dim=D, dtype="float32", window=2,
        max_pending_steps=64, liveness=3.0, step_timeout=5.0, keys_bound=True,
    )  # fmt: skip
    out = book.hello(EXPERT, b"a", hello(1), 0.0, key="expert-0")
    assert out.rejected == "wrong_key" and "expert-1" in sent(out, Welcome)[0][1].reason  # type: ignore[attr-defined]
    assert book.hello(REDUCER, b"r", reducer_hello(), 0.0, key="expert-0").rejected == "wrong_key"
    assert book.hello(EXPERT, b"a", hello(1), 0.0, key=None).rejected == "wrong_key"
    assert book.hello(EXPERT, b"a", hello(0), 0.0, key="expert-0").rejected is None
    assert book.peers.key_of(EXPERT, b"a") == "expert-0"
    # the same key on a new route is the same party (one key per role): it takes over
    assert book.hello(EXPERT, b"b", hello(0), 0.1, key="expert-0").rejected is None
    assert book.peers.key_of(EXPERT, b"a") is None and book.peers.key_of(EXPERT, b"b") == "expert-0"


def test_rejoin_starts_at_next_unsent_step() -> None:
    book = started(2)
    for seq in range(3):
        book.emb(rid(0), emb(seq, 0), 0.1)
    book.emb(rid(1), emb(0, 1), 0.1)  # step 0 released; next_seq = 1, highest = 2
    book.goodbye(EXPERT, rid(1), Goodbye("shutdown"), 0.2)  # 1 and 2 now release masked
    assert book.next_seq == 3
    out = book.hello(EXPERT, b"new-1", hello(1), 0.3)
    assert sent(out, Welcome)[0][1].start_seq == 3  # type: ignore[attr-defined]
    late = book.emb(b"new-1", emb(2, 1), 0.4)
    assert late.rejected == "late" and sent(late, Drop) == [(b"new-1", Drop(2, "late", 3))]
    # A rejoiner is expected from its join_seq on.
    assert not batches(book.emb(rid(0), emb(3, 0), 0.5))
    assert batches(book.emb(b"new-1", emb(3, 1), 0.5))[0].present == (True, True)


def test_rejoin_before_send_is_expected_at_its_join_seq() -> None:
    book = started(2)
    book.emb(rid(0), emb(0, 0), 0.1)
    book.emb(rid(0), emb(1, 0), 0.1)
    book.peers.touch(EXPERT, rid(0), 1.0)
    book.peers.touch(REDUCER, RED, 1.0)
    book.tick(1.05)  # expert 1 was last seen at 0.0: gone; steps 0, 1 release without it
    assert book.next_seq == 2 and book.peers.live_experts == 1
    out = book.hello(EXPERT, rid(1), hello(1), 1.1)  # same routing id, back again
    assert sent(out, Welcome)[0][1].start_seq == 2  # type: ignore[attr-defined]


# ---- join, order, skip, expiry --------------------------------------------------------------


def test_in_order_release_with_out_of_order_arrivals() -> None:
    book = started(3)
    order = [(2, 1), (1, 0), (2, 0), (0, 2), (1, 1), (2, 2), (1, 2), (0, 0)]
    for seq, expert_id in order:
        assert not batches(book.emb(rid(expert_id), emb(seq, expert_id), 0.1))
    out = book.emb(rid(1), emb(0, 1), 0.2)  # completes 0, and with it 1 and 2
    assert [b.seq for b in batches(out)] == [0, 1, 2]
    assert all(b.present == (True, True, True) for b in batches(out))
    first = batches(out)[0]
    assert [t.numpy()[0, 0] for t in first.tensors] == [0, 1, 2]  # ascending expert id
    assert len(out.join_waits) == 3 and len(out.queue_latencies) == 3


def test_released_tensors_are_the_received_objects() -> None:
    book = started(2)
    e0, e1 = emb(0, 0), emb(0, 1)
    book.emb(rid(0), e0, 0.0)
    [batch] = batches(book.emb(rid(1), e1, 0.0))
    assert batch.tensors[0] is e0.tensor and batch.tensors[1] is e1.tensor


def test_expiry_masks_a_dead_expert_and_releases_waiting_steps() -> None:
    book = started(3)
    for seq in (0, 1):
        book.emb(rid(0), emb(seq, 0), 0.5)
        book.emb(rid(1), emb(seq, 1), 0.5)
    book.emb(rid(2), emb(1, 2), 0.5)  # expert 2 sent step 1 but not 0, then went silent
    for expert_id in range(3):
        book.peers.touch(EXPERT, rid(expert_id), 0.5)
    book.peers.touch(EXPERT, rid(0), 1.2)
    book.peers.touch(EXPERT, rid(1), 1.2)
    book.peers.touch(REDUCER, RED, 1.2)
    assert not batches(book.tick(1.2))
    out = book.tick(1.6)  # expert 2 silent for 1.1 s > liveness 1.0
    assert [(b.seq, b.present) for b in batches(out)] == [
        (0, (True, True, False)),
        (1, (True, True, False)),  # its token for step 1 is masked too: it is gone
    ]
    assert book.peers.expert_up() == {0: True, 1: True, 2: False} and book.peers.live_experts == 2


def test_skip_when_no_live_expert_is_expected() -> None:
    book = started(2)
    book.emb(rid(0), emb(0, 0), 0.0)
    book.emb(rid(1), emb(0, 1), 0.0)
    book.emb(rid(0), emb(1, 0), 0.0)
    book.emb(rid(0), emb(2, 0), 0.0)
    out = book.goodbye(EXPERT, rid(0), Goodbye("shutdown"), 0.1)
    assert out.skipped == 0 and book.next_seq == 1  # still waiting for expert 1
    out = book.goodbye(EXPERT, rid(1), Goodbye("shutdown"), 0.2)
    assert out.skipped == 2 and book.next_seq == 3  # nobody left for 1 and 2
    assert book.tick(0.3).skipped == 0  # and never beyond what was sent


def test_overdue_head_is_released_masked_after_step_timeout() -> None:
    book = started(2, step_timeout=0.5, liveness=5.0)
    book.emb(rid(0), emb(0, 0), 0.1)  # expert 1 alive but never sends step 0
    assert not batches(book.tick(0.5))
    out = book.tick(0.7)
    assert [(b.seq, b.present) for b in batches(out)] == [(0, (True, False))]


def test_unanswered_dispatched_step_is_dropped_after_step_timeout() -> None:
    book = started(2, step_timeout=0.5, liveness=5.0)
    book.emb(rid(0), emb(0, 0), 0.1)
    book.emb(rid(1), emb(0, 1), 0.1)
    out = book.tick(0.7)
    assert sorted(sent(out, Drop)) == both(Drop(0, "timeout"))
    assert out.dropped == ["timeout"] and book.dispatched_steps == 0


# ---- EMB checks -----------------------------------------------------------------------------


def test_unregistered_is_told_goodbye() -> None:
    book = started(2)
    out = book.emb(b"stranger", emb(0, 0), 0.0)
    assert out.rejected == "unregistered"
    assert sent(out, Goodbye) == [(b"stranger", Goodbye("unregistered"))]
    out = book.peers.heartbeat(EXPERT, b"stranger", Heartbeat(), 0.0)
    assert out.rejected == "unregistered" and sent(out, Goodbye)
    assert book.peers.heartbeat(EXPERT, rid(0), Heartbeat(), 0.0).rejected is None


def test_impersonation_and_duplicate() -> None:
    book = started(2)
    assert book.emb(rid(0), emb(0, 1), 0.0).rejected == "impersonation"
    book.emb(rid(0), emb(0, 0), 0.0)
    out = book.emb(rid(0), emb(0, 0), 0.0)
    assert out.rejected == "duplicate" and not out.sends  # the first is still in flight
    book.emb(rid(1), emb(0, 1), 0.0)  # step 0 dispatched
    assert book.emb(rid(0), emb(0, 0), 0.0).rejected == "duplicate"


def test_late_after_release_gets_drop() -> None:
    book = started(2)
    book.emb(rid(0), emb(0, 0), 0.0)
    book.emb(rid(1), emb(0, 1), 0.0)
    book.grad(RED, Grad(0, -1, (emb(0, 0).tensor, emb(0, 1).tensor)), 0.1)
    out = book.emb(rid(0), emb(0, 0), 0.2)
    assert out.rejected == "late" and sent(out, Drop) == [(rid(0), Drop(0, "late", 1))]
    assert out.dropped == ["late"]


def test_too_far_ahead_and_bound_on_all_held_steps() -> None:
    book = started(1, reducer=False, max_pending_steps=4, window=100)
    for seq in range(4):
        assert book.emb(rid(0), emb(seq, 0), 0.0).rejected is None
    assert book.pending_steps == 4  # released, waiting for a reducer in the ready queue
    out = book.emb(rid(0), emb(4, 0), 0.0)
    assert out.rejected == "too_far_ahead" and sent(out, Drop) == [
        (rid(0), Drop(4, "too_far_ahead"))
    ]
    book.hello(REDUCER, RED, reducer_hello(1), 0.1)
    assert book.dispatched_steps == 4 and book.pending_steps == 0
    assert book.emb(rid(0), emb(4, 0), 0.2).rejected == "too_far_ahead"  # still unanswered
    book.ack(RED, Ack(0), 0.3)
    assert book.emb(rid(0), emb(4, 0), 0.3).rejected is None
    assert book.pending_steps + book.dispatched_steps <= 4


def test_window_bounds_each_expert() -> None:
    book = started(2, window=2)
    book.emb(rid(0), emb(0, 0), 0.0)
    book.emb(rid(0), emb(1, 0), 0.0)
    out = book.emb(rid(0), emb(2, 0), 0.0)
    assert out.rejected == "window" and sent(out, Drop) == [(rid(0), Drop(2, "window"))]


@pytest.mark.parametrize(
    "bad",
    [
        emb(0, 1, dtype=np.float16),  # not the registered dtype
        emb(0, 1, width=D + 1),  # not embed_dim
        emb(0, 1, phase="eval"),  # phase differs from the first EMB
        emb(0, 1, rows=B + 1),  # batch size differs from the first EMB
    ],
)
def test_conflict_gets_drop_and_the_step_stops_waiting(bad: Emb) -> None:
    book = started(2)
    book.emb(rid(0), emb(0, 0), 0.0)
    out = book.emb(rid(1), bad, 0.1)
    assert out.rejected == "conflict" and sent(out, Drop) == [(rid(1), Drop(0, "conflict"))]
    # Expert 1 forfeited step 0 (it was told DROP): the step goes on without it.
    assert [(b.seq, b.present) for b in batches(out)] == [(0, (True, False))]


# ---- replies --------------------------------------------------------------------------------


def test_grad_is_split_to_each_present_expert_for_its_seq() -> None:
    book = started(3)
    for seq in (0, 1):
        for expert_id in (0, 2):
            book.emb(rid(expert_id), emb(seq, expert_id), 0.0)
    book.emb(rid(1), emb(1, 1), 0.0)
    book.goodbye(EXPERT, rid(1), Goodbye("shutdown"), 0.0)  # 0 and 1 release masked
    book.hello(EXPERT, rid(1), hello(1), 0.0)  # back; expected from step 2
    g0, g2 = emb(9, 0).tensor, emb(9, 2).tensor
    out = book.grad(RED, Grad(1, -1, (g0, g2)), 0.1)
    assert sent(out, Grad) == [(rid(0), Grad(1, 0, (g0,))), (rid(2), Grad(1, 2, (g2,)))]
    assert sent(out, Grad)[0][1].tensors[0] is g0  # type: ignore[attr-defined]  # no copy
    assert book.grad(RED, Grad(1, -1, (g0, g2)), 0.1).rejected == "unknown_step"  # once only


def test_grad_mismatch_drops_the_step() -> None:
    book = started(2)
    book.emb(rid(0), emb(0, 0), 0.0)
    book.emb(rid(1), emb(0, 1), 0.0)
    out = book.grad(RED, Grad(0, -1, (emb(0, 0).tensor,)), 0.1)
    assert out.rejected == "grad_mismatch"
    assert sorted(sent(out, Drop)) == both(Drop(0, "grad_mismatch"))
    assert book.dispatched_steps == 0


def test_ack_goes_to_present_experts_only() -> None:
    book = started(3)
    book.emb(rid(0), emb(0, 0, phase="eval"), 0.0)
    book.emb(rid(2), emb(0, 2, phase="eval"), 0.0)
    book.goodbye(EXPERT, rid(1), Goodbye("shutdown"), 0.0)
    out = book.ack(RED, Ack(0), 0.1)
    assert sent(out, Ack) == [(rid(0), Ack(0)), (rid(2), Ack(0))]
    assert book.ack(RED, Ack(0), 0.1).rejected == "unknown_step"
    assert book.ack(b"not-the-reducer", Ack(0), 0.1).rejected == "unregistered"


def test_reply_never_reaches_a_newer_registration() -> None:
    book = started(2)
    book.emb(rid(0), emb(0, 0, phase="eval"), 0.0)
    book.emb(rid(1), emb(0, 1, phase="eval"), 0.0)
    book.hello(EXPERT, rid(1), hello(1), 0.1)  # expert 1 restarted with the same routing id
    out = book.ack(RED, Ack(0), 0.2)
    assert sent(out, Ack) == [(rid(0), Ack(0))]


def test_ack_for_a_train_step_is_refused_and_the_step_dropped() -> None:
    book = started(2)
    book.emb(rid(0), emb(0, 0), 0.0)
    book.emb(rid(1), emb(0, 1), 0.0)
    out = book.ack(RED, Ack(0), 0.1)
    assert out.rejected == "grad_mismatch" and sent(out, Ack) == []
    assert sent(out, Drop) == both(Drop(0, "grad_mismatch"))


def test_reducer_loss_drops_dispatched_steps_and_ready_ones_wait() -> None:
    book = started(2)
    book.emb(rid(0), emb(0, 0), 0.0)
    book.emb(rid(1), emb(0, 1), 0.0)
    for expert_id in (0, 1):
        book.peers.touch(EXPERT, rid(expert_id), 1.5)
    out = book.tick(1.5)  # reducer silent for 1.5 s
    assert not book.peers.reducer_up
    assert sorted(sent(out, Drop)) == both(Drop(0, "reducer_lost"))
    book.emb(rid(0), emb(1, 0), 1.6)
    assert not batches(book.emb(rid(1), emb(1, 1), 1.6))  # ready, no reducer
    out = book.hello(REDUCER, b"reducer-2", reducer_hello(), 1.7)
    assert sent(out, Welcome)[0][1].start_seq == 1  # type: ignore[attr-defined]
    assert [b.seq for b in batches(out)] == [1]
    assert book.grad(RED, Grad(1, -1, (emb(1, 0).tensor,) * 2), 1.8).rejected == "unregistered"


def test_reducer_reregistration_drops_dispatched_steps() -> None:
    book = started(2)
    book.emb(rid(0), emb(0, 0), 0.0)
    book.emb(rid(1), emb(0, 1), 0.0)
    out = book.hello(REDUCER, RED, reducer_hello(), 0.1)
    assert sorted(sent(out, Drop)) == both(Drop(0, "reducer_lost"))


def test_reducer_drop_is_forwarded() -> None:
    book = started(2)
    book.emb(rid(0), emb(0, 0), 0.0)
    book.emb(rid(1), emb(0, 1), 0.0)
    out = book.reducer_drop(RED, Drop(0, "non_finite"), 0.1)
    assert sorted(sent(out, Drop)) == both(Drop(0, "non_finite"))
    assert out.dropped == ["reducer_rejected"]


def test_goodbye_done_tells_every_live_expert() -> None:
    book = started(2)
    out = book.goodbye(REDUCER, RED, Goodbye("done"), 1.0)
    assert out.done
    assert sent(out, Goodbye) == [(rid(0), Goodbye("done")), (rid(1), Goodbye("done"))]
    assert not book.goodbye(REDUCER, b"other", Goodbye("done"), 1.0).done
