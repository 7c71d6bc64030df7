"""An expert's side of model selection against the fake broker: its target of each validation
round is on disk before the round's first EMB, the reducer's decision (on an ACK, or on a
heartbeat after a restart) makes the best round's target its best net and deletes the other
candidates, it waits for the decision before the test batches and embeds them with the best
round's target, and early stopping moves its test batches behind the round."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.expert.test_service import RUN_ID, grad_for, start  # noqa: F401  (fixture)
from traci_ml import proto
from traci_ml.core import checkpoint

pytestmark = pytest.mark.timeout(60)
VAL = {"data.val_fraction": "0.1"}  # 6 steps, eval after 3: T T T V T T T V X


def answer(rig, upto: int, decisions: dict[int, proto.Message] | None = None) -> list[proto.Emb]:  # noqa: ANN001
    """Answer each EMB up to seq ``upto``: a GRAD, an ACK (``decisions[seq]`` if given)."""
    got = []
    while not got or got[-1].seq < upto:
        emb = rig.broker.expect(proto.Emb)
        got.append(emb)
        if emb.phase == "train":
            rig.broker.send(grad_for(emb.seq))
        else:
            rig.broker.send((decisions or {}).get(emb.seq, proto.Ack(emb.seq)))
    return got


def embed(net: torch.nn.Module, rig, emb: proto.Emb) -> np.ndarray:  # noqa: ANN001
    expert = rig.expert
    step = expert.schedule.step(emb.seq)
    local, _ = expert.rows.lookup(step.source, expert.schedule.rows(step))
    with torch.no_grad():
        return net(expert.table[torch.as_tensor(local)]).numpy()


def test_candidates_the_best_net_and_the_test_batches(start) -> None:  # noqa: F811
    rig = start(**VAL)
    ckpts = rig.config.run_path / "checkpoints"
    rig.welcome()
    sent = answer(rig, 2)
    val = rig.broker.expect(proto.Emb)  # round 0's one batch
    assert (val.seq, val.phase, val.tensor.shape[0]) == (3, "eval", 144)  # validation rows
    cand = checkpoint.load(ckpts / "expert-0.round-0.pt", run_id=RUN_ID, expert_id=0)
    assert (cand["round"], cand["step"]) == (0, 3)
    round0 = copy.deepcopy(rig.expert.target)
    round0.load_state_dict(cand["target"])
    np.testing.assert_allclose(val.tensor.numpy(), embed(round0, rig, val), rtol=1e-6)
    rig.broker.send(proto.Ack(3, decided=0, best=0))
    sent = answer(rig, 6)
    assert [e.seq for e in sent] == [4, 5, 6]
    assert (ckpts / "expert-0.best.pt").exists() and not (ckpts / "expert-0.round-0.pt").exists()
    val = rig.broker.expect(proto.Emb)  # round 1
    assert val.seq == 7 and (ckpts / "expert-0.round-1.pt").exists()
    rig.broker.quiet(0.4)  # the test batch waits for round 1's decision (window 2)
    rig.broker.send(proto.Ack(7, decided=1, best=0))  # round 1 is not the best
    test = rig.broker.expect(proto.Emb)
    assert (test.seq, test.tensor.shape[0]) == (8, 359)
    assert not (ckpts / "expert-0.round-1.pt").exists()
    best = checkpoint.load(ckpts / "expert-0.best.pt", run_id=RUN_ID, expert_id=0)
    assert best["round"] == 0  # round 0's target, not the last: the test rows' embedding
    np.testing.assert_allclose(test.tensor.numpy(), embed(round0, rig, test), rtol=1e-6)
    assert not np.allclose(test.tensor.numpy(), embed(rig.expert.target, rig, test))
    rig.broker.send(proto.Ack(8, decided=1, best=0))
    assert rig.broker.expect(proto.Goodbye) == proto.Goodbye("done")
    assert rig.join() == 0


def test_a_restarted_expert_promotes_its_candidate_on_the_heartbeat(start) -> None:  # noqa: F811
    first = start(**VAL, **{"expert.window": "1"})
    ckpts = first.config.run_path / "checkpoints"
    first.welcome()
    answer(first, 2)
    assert first.broker.expect(proto.Emb).seq == 3  # round 0 sent; then the expert dies
    first.close()
    assert (ckpts / "expert-0.round-0.pt").exists() and not (ckpts / "expert-0.best.pt").exists()

    again = start(resume=True, **VAL, **{"expert.window": "1"})
    again.welcome(start_seq=4)
    assert again.broker.expect(proto.Emb).seq == 4
    again.broker.send(proto.Heartbeat(decided=0, best=0))  # what the broker repeats
    again.broker.send(grad_for(4))
    assert again.broker.expect(proto.Emb).seq == 5
    assert (ckpts / "expert-0.best.pt").exists() and not (ckpts / "expert-0.round-0.pt").exists()
    assert checkpoint.load(ckpts / "expert-0.best.pt", run_id=RUN_ID)["round"] == 0


def test_early_stopping_moves_the_test_batches_behind_the_round(start) -> None:  # noqa: F811
    rig = start(**VAL, **{"train.patience": "1"})
    rig.welcome()
    answer(rig, 2)
    assert rig.broker.expect(proto.Emb).seq == 3
    rig.broker.quiet(0.4)  # with early stopping every step after a round waits for it
    rig.broker.send(proto.Ack(3, decided=0, best=0, stopped=0))
    test = rig.broker.expect(proto.Emb)  # seq 4: the test batch, no more training
    assert (test.seq, test.phase, test.tensor.shape[0]) == (4, "eval", 359)
    rig.broker.send(proto.Ack(4, decided=0, best=0, stopped=0))
    assert rig.broker.expect(proto.Goodbye) == proto.Goodbye("done")
    assert rig.join() == 0 and rig.expert.accounts.applied == 3
