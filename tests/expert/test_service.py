"""The Expert loop in-process, against a fake broker: a ROUTER socket in the test thread
that speaks ``traci_ml.proto`` over loopback TCP."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from tests.helpers.support import ServiceRig, fake_broker_config
from traci_ml import proto
from traci_ml.core import checkpoint
from traci_ml.core.config import Config
from traci_ml.core.data import load_dataset
from traci_ml.core.models.expert import (
    build_expert_net,
    input_noise,
    input_noise_for,
    make_target,
    polyak_update,
)
from traci_ml.core.models.optim import weight_decay_for
from traci_ml.core.schedule import schedule_for, set_lr
from traci_ml.core.tensors import derive_seed
from traci_ml.services.expert.service import Accounts, ExpertService
from traci_ml.services.expert.serving import QueryView

pytestmark = pytest.mark.timeout(60)

RUN_ID, D, BATCH, N_TEST = "expert-test", 8, 16, 359
TOTAL = 8  # 6 train steps, eval after every 3: train 0-2, eval 3, train 4-6, eval 7
TRAIN_SEQS, EVAL_SEQS = (0, 1, 2, 4, 5, 6), (3, 7)


def make_config(tmp_path: Path, **extra: str) -> Config:
    settings = {
        "run_id": RUN_ID, "seed": "3", "run_dir": str(tmp_path / "run"), "embed_dim": str(D),
        "reducer.heads": "2", "expert.model.hidden": "[16]", "expert.device": "cpu",
        "expert.torch_threads": "1", "expert.window": "2", "expert.tau": "0.25",
        "train.steps": "6", "train.eval_every": "3", "train.batch_size": str(BATCH),
        "train.checkpoint_every": "0", "reducer.eval_batch_size": "512",
        # no validation split: the rounds score the test split, in the seqs above (model
        # selection against this fake broker: tests/{expert,reducer}/test_selection.py)
        "data.val_fraction": "0",
    }  # fmt: skip
    return fake_broker_config(settings, extra)


class Rig(ServiceRig):
    """An Expert whose run() is in a background thread, and the fake broker it talks to."""

    def __init__(self, config: Config, *, resume: bool = False) -> None:
        self.config = config

        def make(context: zmq.Context, stop: threading.Event) -> ExpertService:
            return ExpertService(config, 0, resume=resume, context=context, stop=stop)

        super().__init__(config.network.expert_port, make, "Expert")
        self.expert = self.service

    def rejections(self, reason: str) -> float:
        value = self.expert.metrics.registry.get_sample_value(
            "traci_expert_rejections_total", {"expert": "0", "reason": reason}
        )
        return value or 0.0

    def drops(self, reason: str) -> float:
        value = self.expert.metrics.registry.get_sample_value(
            "traci_expert_steps_dropped_total", {"expert": "0", "reason": reason}
        )
        return value or 0.0

    def balanced(self) -> bool:
        a = self.expert.accounts
        return a.sent == a.applied + a.acked + a.dropped + len(self.expert.inflight)


@pytest.fixture
def start(tmp_path: Path):
    rigs: list[Rig] = []

    def make(*, resume: bool = False, **extra: str) -> Rig:
        rigs.append(Rig(make_config(tmp_path, **extra), resume=resume))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def grad_for(seq: int, rows: int = BATCH, *, expert_id: int = 0, seed: int = 0) -> proto.Grad:
    g = np.random.default_rng(seed + seq).normal(0, 0.5, (rows, D)).astype(np.float32)
    return proto.Grad(seq, expert_id, (proto.Tensor.from_numpy(g),))


def reply_to(emb: proto.Emb) -> proto.Message:
    return proto.Ack(emb.seq) if emb.phase == "eval" else grad_for(emb.seq)


def states(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def drive(
    rig: Rig,
    window: int,
    first_seq: int = 0,
    *,
    unanswered: tuple[proto.Emb, ...] = (),
    quiet: float = 0.15,
) -> list[proto.Emb]:
    """Play the broker until the expert says GOODBYE: hold replies back until the expert
    has been silent for ``quiet`` seconds, then answer the oldest step. Checks that the
    expert never has more than ``window`` steps unanswered and sends seqs in order.
    ``unanswered``: steps received before, still waiting for their reply."""
    outstanding: OrderedDict[int, proto.Emb] = OrderedDict((e.seq, e) for e in unanswered)
    received: list[proto.Emb] = []
    fullest = len(outstanding)
    while True:
        # With nothing to answer, wait as long as it takes (a slow machine is not a bug).
        msg = rig.broker.next(quiet if outstanding else 5.0)
        if isinstance(msg, proto.Emb):
            assert msg.seq == first_seq + len(received), "EMB out of order"
            received.append(msg)
            outstanding[msg.seq] = msg
            assert len(outstanding) <= window, f"{len(outstanding)} steps in flight > {window}"
            fullest = max(fullest, len(outstanding))
        elif isinstance(msg, proto.Goodbye):
            assert msg.reason == "done"
            break
        elif msg is None:
            assert outstanding, "the expert went silent with nothing in flight"
            _, emb = outstanding.popitem(last=False)
            rig.broker.send(reply_to(emb))
        else:
            raise AssertionError(f"unexpected {msg!r}")
    assert not outstanding
    assert fullest == min(window, TOTAL - first_seq)  # the window was used, not just obeyed
    return received


# ---- registration and sending -----------------------------------------------------------


def test_hello_names_the_expert_and_its_settings(start) -> None:
    rig = start(**{"expert.window": "3"})
    hello = rig.welcome()
    assert hello == proto.Hello(
        role="expert", run_id=RUN_ID, embed_dim=D, dtype="float32", expert_id=0, window=3
    )


def test_embeddings_are_sent_in_seq_order_with_the_schedule_shapes(start) -> None:
    rig = start(**{"expert.window": "2"})
    rig.welcome()
    embs = drive(rig, window=2)
    assert [e.seq for e in embs] == list(range(TOTAL))
    for emb in embs:
        phase = "eval" if emb.seq in EVAL_SEQS else "train"
        assert (emb.expert_id, emb.phase) == (0, phase)
        assert emb.tensor.dtype == "float32"
        assert emb.tensor.shape == ((N_TEST, D) if phase == "eval" else (BATCH, D))
        assert np.isfinite(emb.tensor.numpy()).all()
    assert rig.join() == 0


@pytest.mark.parametrize("window", [1, 2])
def test_never_more_than_window_steps_unanswered(start, window: int) -> None:
    rig = start(**{"expert.window": str(window)})
    rig.welcome()
    first = [rig.broker.expect(proto.Emb) for _ in range(window)]
    assert [e.seq for e in first] == list(range(window))
    rig.broker.quiet(0.4)  # replies withheld: nothing beyond the window
    assert len(rig.expert.inflight) == window
    rig.broker.send(grad_for(0))
    nxt = rig.broker.expect(proto.Emb)
    assert nxt.seq == window  # one answered, one more sent
    rig.broker.quiet(0.3)
    rest = drive(rig, window, first_seq=window + 1, unanswered=(*first[1:], nxt))
    assert [e.seq for e in rest] == list(range(window + 1, TOTAL))
    assert rig.join() == 0


# ---- gradients --------------------------------------------------------------------------


def test_gradient_updates_online_then_target_by_the_polyak_rule(start) -> None:
    rig = start(**{"expert.window": "1", "expert.input_noise": "0.2"})
    config, expert = rig.config, rig.expert
    # A replay of the expert, built as the worker builds it (same derived seed).
    dataset = load_dataset(config)
    schedule = schedule_for(config, dataset)
    view = torch.from_numpy(dataset.view(0, "train"))
    torch.manual_seed(derive_seed(config.seed, "expert", 0))
    online = build_expert_net(config.expert.model, in_dim=view.shape[1], out_dim=D)
    target = make_target(online)
    # "auto" weight decay: by the rows training draws from, as the expert sets it when aligned
    decay = weight_decay_for(config.expert.weight_decay, len(schedule.fit_rows))
    assert {g["weight_decay"] for g in expert.optimizer.param_groups} == {decay}
    adam = torch.optim.Adam(online.parameters(), lr=config.expert.lr, weight_decay=decay)
    rows = [torch.as_tensor(schedule.rows(schedule.step(s))) for s in (0, 1)]
    # train steps' inputs carry the expert's input noise, drawn by (seed, expert, seq)
    sd = input_noise_for(config.expert.input_noise, len(schedule.fit_rows), config.task)
    assert sd == expert.noise == 0.2
    xs = [view[r] + input_noise(sd, config.seed, 0, s, (len(r), view.shape[1]))
          for s, r in enumerate(rows)]  # fmt: skip

    rig.welcome()
    emb0 = rig.broker.expect(proto.Emb)
    with torch.no_grad():  # what is sent is the target's output
        np.testing.assert_allclose(emb0.tensor.numpy(), target(xs[0]).numpy(), rtol=1e-6)
        assert not np.allclose(emb0.tensor.numpy(), target(view[rows[0]]).numpy())
    rig.broker.quiet(0.2)  # window full: the expert idles, its state can be read
    target_before, online_before = states(expert.target), states(expert.online)

    grad = grad_for(0)
    rig.broker.send(grad)
    emb1 = rig.broker.expect(proto.Emb)  # sent only once the gradient was applied
    assert emb1.seq == 1
    online_after, target_after = states(expert.online), states(expert.target)
    tau = config.expert.tau
    for name, t0 in target_before.items():
        assert not torch.equal(online_after[name], online_before[name]), f"{name} not trained"
        expected = t0 + tau * (online_after[name] - t0)
        torch.testing.assert_close(target_after[name], expected, rtol=1e-6, atol=1e-7)

    online.train()
    out = online(xs[0])  # the same noisy inputs as the EMB
    out.backward(torch.from_numpy(grad.tensors[0].numpy().copy()))
    set_lr(adam, config.expert.lr, 0, config.train)  # the rate of train step 0
    adam.step()
    polyak_update(target, online, tau)
    for name, value in online.state_dict().items():
        torch.testing.assert_close(online_after[name], value, rtol=1e-5, atol=1e-6)
    for name, value in target.state_dict().items():
        torch.testing.assert_close(target_after[name], value, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(emb1.tensor.numpy(), target(xs[1]).numpy(), rtol=1e-5, atol=1e-6)
    assert expert.accounts.applied == 1


def test_duplicate_and_unknown_gradients_are_rejected_not_applied(start) -> None:
    rig = start(**{"expert.window": "1"})
    rig.welcome()
    rig.broker.expect(proto.Emb)
    rig.broker.send(grad_for(0))
    rig.broker.send(grad_for(0))  # the same step again
    assert rig.broker.expect(proto.Emb).seq == 1
    wait_for(lambda: rig.expert.accounts.rejected == 1)
    assert rig.expert.accounts.applied == 1
    assert rig.rejections("unknown_step") == 1
    online = states(rig.expert.online)

    rig.broker.send(grad_for(5))  # a seq this expert never sent
    wait_for(lambda: rig.expert.accounts.rejected == 2)
    assert rig.rejections("unknown_step") == 2
    assert rig.expert.accounts.applied == 1
    assert list(rig.expert.inflight) == [1]
    for name, value in states(rig.expert.online).items():
        assert torch.equal(value, online[name]), f"{name} changed by a rejected GRAD"
    assert rig.balanced()


def test_gradient_for_another_expert_is_rejected_misrouted(start) -> None:
    rig = start(**{"expert.window": "1"})
    rig.welcome()
    rig.broker.expect(proto.Emb)
    online = states(rig.expert.online)
    rig.broker.send(grad_for(0, expert_id=1))
    wait_for(lambda: rig.expert.accounts.rejected == 1)
    assert rig.rejections("misrouted") == 1
    assert rig.expert.accounts.applied == 0
    assert list(rig.expert.inflight) == [0]  # still waiting for its own gradient
    for name, value in states(rig.expert.online).items():
        assert torch.equal(value, online[name])
    rig.broker.send(grad_for(0))
    assert rig.broker.expect(proto.Emb).seq == 1
    assert rig.expert.accounts.applied == 1


def test_drop_counts_the_step_dropped_and_frees_the_window(start) -> None:
    rig = start(**{"expert.window": "1"})
    rig.welcome()
    rig.broker.expect(proto.Emb)
    rig.broker.send(proto.Drop(0, "late"))
    assert rig.broker.expect(proto.Emb).seq == 1
    a = rig.expert.accounts
    assert (a.sent, a.applied, a.acked, a.dropped, a.rejected) == (2, 0, 0, 1, 0)
    assert rig.drops("late") == 1
    assert rig.balanced()
    rig.broker.send(proto.Drop(0, "late"))  # already dropped: not counted twice
    wait_for(lambda: rig.expert.accounts.rejected == 1)
    assert rig.expert.accounts.dropped == 1 and rig.rejections("unknown_step") == 1


def test_welcome_start_seq_makes_it_start_there(start) -> None:
    rig = start(**{"expert.window": "2"})
    rig.welcome(start_seq=5)
    embs = drive(rig, window=2, first_seq=5)
    assert [e.seq for e in embs] == [5, 6, 7]
    assert [e.phase for e in embs] == ["train", "train", "eval"]
    assert rig.join() == 0
    assert asdict(rig.expert.accounts) == asdict(
        Accounts(sent=3, applied=2, acked=1, dropped=0, rejected=0)
    )


# ---- end of run, files and resume -------------------------------------------------------


def test_run_ends_after_the_last_reply_and_writes_accounts_and_checkpoint(
    start, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved: list[Path] = []
    save_atomic = checkpoint.save_atomic

    def spy(state: dict, path: Path) -> None:
        saved.append(path)
        save_atomic(state, path)

    monkeypatch.setattr(checkpoint, "save_atomic", spy)
    rig = start(**{"expert.window": "2"})
    rig.welcome()
    drive(rig, window=2)  # returns on the expert's GOODBYE("done")
    assert rig.join() == 0
    accounts = rig.expert.accounts
    assert asdict(accounts) == asdict(Accounts(sent=8, applied=6, acked=2, dropped=0, rejected=0))
    assert rig.balanced() and not rig.expert.inflight

    run = rig.config.run_path
    record = json.loads((run / "experts" / "expert-0.json").read_text())
    assert record == {"expert_id": 0, **asdict(accounts), "inflight": 0}
    ckpt = run / "checkpoints" / "expert-0.pt"
    assert saved == [ckpt]  # written through the atomic writer ...
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["expert-0.pt"]  # ... no leftovers
    assert sorted(p.name for p in (run / "experts").iterdir()) == [
        "expert-0.applied",  # the ledger: one applied seq per line
        "expert-0.json",
    ]
    assert (run / "experts" / "expert-0.applied").read_text().split() == [
        str(s) for s in range(8) if rig.expert.schedule.step(s).phase == "train"
    ]
    state = checkpoint.load(ckpt, run_id=RUN_ID, expert_id=0)
    assert state["accounts"] == asdict(accounts) and state["seq_next"] == TOTAL

    # --resume: a new Expert reloads nets, optimizer state and accounts.
    resumed = ExpertService(rig.config, 0, resume=True, context=rig.broker.context)
    assert asdict(resumed.accounts) == asdict(accounts)
    assert resumed.seq_next == TOTAL
    for name, value in states(rig.expert.online).items():
        assert torch.equal(resumed.online.state_dict()[name], value), name
    for name, value in states(rig.expert.target).items():
        assert torch.equal(resumed.target.state_dict()[name], value), name
    assert resumed.optimizer.state_dict()["state"][0]["step"] == 6
    fresh = ExpertService(rig.config, 0, resume=False, context=rig.broker.context)
    assert asdict(fresh.accounts) == asdict(Accounts())


def test_broker_goodbye_done_ends_the_run_with_balanced_accounts(start) -> None:
    rig = start(**{"expert.window": "2"})
    rig.welcome()
    assert [rig.broker.expect(proto.Emb).seq for _ in range(2)] == [0, 1]
    rig.broker.send(grad_for(0))
    assert rig.broker.expect(proto.Emb).seq == 2
    rig.broker.send(proto.Goodbye("done"))
    assert rig.join() == 0
    a = rig.expert.accounts
    assert (a.sent, a.applied, a.dropped) == (3, 1, 2)  # in flight at the end: dropped
    assert rig.drops("shutdown") == 2
    assert rig.balanced()
    assert isinstance(rig.broker.expect(proto.Goodbye), proto.Goodbye)


def test_stop_event_ends_the_run_and_accounts_stay_balanced(start) -> None:
    rig = start(**{"expert.window": "2"})
    rig.welcome()
    rig.broker.expect(proto.Emb)
    rig.broker.expect(proto.Emb)
    rig.stop.set()
    assert rig.join() == 0
    assert rig.broker.expect(proto.Goodbye).reason == "shutdown"
    assert rig.balanced() and rig.expert.accounts.dropped == 2
    record = json.loads((rig.config.run_path / "experts" / "expert-0.json").read_text())
    assert record["sent"] == 2 and record["dropped"] == 2


# ---- values out of bounds (security.max_abs_value) ---------------------------------------


def adam_state(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
    return {
        k: {name: v.clone() for name, v in s.items()}
        for k, s in optimizer.state_dict()["state"].items()
    }


@pytest.mark.parametrize(("value", "reason"), [(float("nan"), "non_finite"), (1e30, "too_large")])
def test_gradient_with_bad_values_is_refused_and_its_slot_freed(
    start, value: float, reason: str
) -> None:
    rig = start(**{"expert.window": "1"})
    rig.welcome()
    assert rig.broker.expect(proto.Emb).seq == 0
    rig.broker.send(grad_for(0))  # one good step first: Adam has state to keep
    assert rig.broker.expect(proto.Emb).seq == 1
    rig.broker.quiet(0.2)  # window full: the expert idles, its state can be read
    online, target = states(rig.expert.online), states(rig.expert.target)
    adam = adam_state(rig.expert.optimizer)

    g = grad_for(1).tensors[0].numpy().copy()
    g[3, 5] = value  # one bad value among sane ones
    rig.broker.send(proto.Grad(1, 0, (proto.Tensor.from_numpy(g),)))
    # The window slot frees at once (step_timeout is 30 s): the next step is sent now.
    assert rig.broker.expect(proto.Emb).seq == 2
    a = rig.expert.accounts
    assert (a.sent, a.applied, a.acked, a.dropped, a.rejected) == (3, 1, 0, 1, 1)
    assert rig.balanced() and list(rig.expert.inflight) == [2]
    assert rig.rejections(reason) == 1 and rig.drops(reason) == 1
    for name, v in states(rig.expert.online).items():
        assert torch.equal(v, online[name]), f"{name} changed by a refused GRAD"
    for name, v in states(rig.expert.target).items():
        assert torch.equal(v, target[name]), f"target {name} changed by a refused GRAD"
    for k, s in adam_state(rig.expert.optimizer).items():
        for name, v in s.items():
            assert torch.equal(v, adam[k][name]), f"Adam {name} of {k} changed"
    ledger = rig.config.run_path / "experts" / "expert-0.applied"
    assert ledger.read_text().split() == ["0"]  # refused: not in the ledger

    rig.broker.send(proto.Grad(1, 0, (proto.Tensor.from_numpy(g),)))  # the step is over
    wait_for(lambda: rig.expert.accounts.rejected == 2)  # values are judged first, as before
    assert rig.rejections(reason) == 2 and rig.expert.accounts.dropped == 1
    rig.broker.send(grad_for(2))  # and training goes on
    assert rig.broker.expect(proto.Emb).seq == 3
    assert rig.expert.accounts.applied == 2 and rig.balanced()


@pytest.mark.parametrize(("value", "status"), [(float("inf"), "non_finite"), (-1e12, "too_large")])
def test_query_rows_with_bad_values_are_answered_with_their_status(
    start, value: float, status: str
) -> None:
    """NaN/Inf rows are refused as they are; a finite row is not (a raw column may be
    large), but an embedding it drives beyond security.max_abs_value is."""
    rig = start(**{"expert.window": "1"})
    rig.welcome()
    rig.broker.expect(proto.Emb)
    columns = QueryView.for_expert(rig.config, rig.config.run_path, 0).columns
    rows = np.zeros((3, len(columns)), np.float32)
    rig.broker.send(proto.Query(11, columns, (proto.Tensor.from_numpy(rows),)))
    ok = rig.broker.expect(proto.QEmb)
    assert (ok.qid, ok.status, ok.tensors[0].shape) == (11, proto.SERVE_OK, (3, D))
    rows[1, 0] = value
    rig.broker.send(proto.Query(12, columns, (proto.Tensor.from_numpy(rows),)))
    bad = rig.broker.expect(proto.QEmb)
    assert (bad.qid, bad.expert_id, bad.status, bad.tensors) == (12, 0, status, ())
    assert "tensor 0" in bad.detail
    wait_for(  # counted right after the answer is sent
        lambda: (
            rig.expert.metrics.registry.get_sample_value(
                "traci_expert_queries_total", {"expert": "0", "status": status}
            )
            == 1
        )
    )


# ---- a restore after a crash: accounts and the ledger agree with the model ----------------


def test_restore_cuts_the_ledger_back_and_counts_steps_in_flight_dropped(start) -> None:
    extra = {"expert.window": "2", "train.checkpoint_every": "2"}
    rig = start(**extra)
    run = rig.config.run_path
    ckpt, ledger = run / "checkpoints" / "expert-0.pt", run / "experts" / "expert-0.applied"
    rig.welcome()
    assert [rig.broker.expect(proto.Emb).seq for _ in range(2)] == [0, 1]
    rig.broker.send(grad_for(0))
    assert rig.broker.expect(proto.Emb).seq == 2
    rig.broker.send(grad_for(1))  # applied 2: a checkpoint, with step 2 in flight
    wait_for(ckpt.exists)  # written atomically: complete once it exists
    crashed_at = ckpt.read_bytes()  # the checkpoint a SIGKILL from here on would leave
    rig.broker.quiet(0.2)  # step 3 is eval: it waits for step 2's gradient
    rig.broker.send(grad_for(2))  # applied after the checkpoint: lost by a crash
    wait_for(lambda: rig.expert.accounts.applied == 3)
    rig.close()
    assert ledger.read_text().split() == ["0", "1", "2"]
    ckpt.write_bytes(crashed_at)  # as if it had died right after that checkpoint

    state = checkpoint.load(ckpt, run_id=RUN_ID, expert_id=0)
    assert (state["accounts"]["sent"], state["accounts"]["applied"]) == (3, 2)
    assert state["inflight"] == 1 and state["ledger_bytes"] == len("0\n1\n")
    again = start(resume=True, **extra)
    assert again.config.run_path == run
    a = again.expert.accounts  # step 2, in flight at the checkpoint, is dropped
    assert (a.sent, a.applied, a.acked, a.dropped) == (3, 2, 0, 1)
    assert again.balanced()
    again.welcome(start_seq=4)
    assert again.broker.expect(proto.Emb).seq == 4
    assert ledger.read_text().split() == ["0", "1"]  # cut back to what the model holds
    assert again.expert.accounts.rolled_back == 1
    state = checkpoint.load(ckpt, run_id=RUN_ID, expert_id=0)  # the cut is on disk at once
    assert state["accounts"]["rolled_back"] == 1 and state["inflight"] == 0
    assert state["ledger_bytes"] == len("0\n1\n") and state["accounts"]["dropped"] == 1

    again.broker.send(grad_for(4))
    assert again.broker.expect(proto.Emb).seq == 5  # window 2: may go out before 4 is applied
    wait_for(lambda: again.expert.accounts.applied == 3)
    again.close()
    assert ledger.read_text().split() == ["0", "1", "4"]
    record = json.loads((run / "experts" / "expert-0.json").read_text())
    assert record["sent"] == record["applied"] + record["acked"] + record["dropped"]
    assert (record["applied"], record["rolled_back"], record["inflight"]) == (3, 1, 0)
