"""The reducer's model selection against the fake broker: validation rounds decide, the
decision is on disk (best weights, then the checkpoint) before the ACK that carries it, a
round some expert missed is never the best, the test batches are scored once with the best
round's weights, and early stopping moves them behind the round it stopped after."""

from __future__ import annotations

import json

import pytest
import torch

from tests.reducer.test_service import ALL, RUN_ID, Rig, make_config
from traci_ml import proto
from traci_ml.core import checkpoint

pytestmark = pytest.mark.timeout(60)


def play(rig: Rig, seqs: range, present: dict[int, tuple[bool, ...]] | None = None) -> list:
    """Send each seq's BATCH; return the replies (GRAD or ACK), in order."""
    replies = []
    for seq in seqs:
        rig.broker.send(rig.batch(seq, (present or {}).get(seq, ALL)))
        kind = proto.Grad if rig.schedule.step(seq).phase == "train" else proto.Ack
        replies.append(rig.broker.expect(kind))
    return replies


def test_best_round_on_validation_and_the_test_batches_score_it(tmp_path) -> None:
    rig = Rig(make_config(tmp_path, **{"data.val_fraction": "0.1"}))  # T T T V T T T V X
    try:
        assert [rig.schedule.step(s).split for s in range(rig.schedule.total)] == [
            "train"] * 3 + ["val"] + ["train"] * 3 + ["val", "test"]  # fmt: skip
        rig.welcome()
        replies = play(rig, range(4))
        assert replies[-1] == proto.Ack(3, decided=0, best=0)  # round 0: the first, the best
        best_path = rig.config.run_path / "checkpoints" / "reducer.best.pt"
        best = checkpoint.load(best_path, run_id=RUN_ID)
        assert (best["round"], best["step"], best["monitor"]) == (0, 3, "accuracy")
        saved = checkpoint.load(rig.service.ckpt_path, run_id=RUN_ID)
        assert saved["selection"]["decided"] == 0  # in the checkpoint before the ACK said it
        gone = (True, False, True, True)  # expert 1 missed round 1: it cannot be the best
        replies = play(rig, range(4, 9), {7: gone})
        assert replies[3] == proto.Ack(7, decided=1, best=0)
        assert replies[4] == proto.Ack(8, decided=1, best=0)  # the test batch
        assert rig.broker.expect(proto.Goodbye) == proto.Goodbye("done")
        assert rig.join() == 0
    finally:
        rig.close()

    run = rig.config.run_path
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"] == {"round": 0, "step": 3, "monitor": "accuracy", "mode": "max",
                               "value": summary["eval_history"][0]["accuracy"]}  # fmt: skip
    assert summary["stop_reason"] == "steps_exhausted" and summary["steps"] == 6
    assert [(r["split"], r["eligible"], r["best"]) for r in summary["eval_history"]] == [
        ("val", True, True), ("val", False, False)]  # fmt: skip
    test = summary["test"]
    assert (test["kind"], test["split"], test["samples"]) == ("test", "test", 359)
    assert summary["test_accuracy"] == test["accuracy"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records if r["kind"] != "train"] == ["eval", "eval", "test"]

    # the test batch was scored with round 0's weights, not the last ones
    model = rig.service.model
    tokens = torch.stack([torch.from_numpy(t) for t in rig.tokens(8)]).transpose(0, 1)
    absent = torch.zeros(tokens.shape[:2], dtype=torch.bool)
    y = torch.from_numpy(rig.dataset.y_test)
    model.load_state_dict(checkpoint.load(best_path, run_id=RUN_ID)["model"])
    with torch.no_grad():
        acc_best = float((model.eval()(tokens, absent)[0].argmax(-1) == y).float().mean())
    assert acc_best == pytest.approx(summary["test_accuracy"])
    last = checkpoint.load(run / "checkpoints" / "reducer.pt", run_id=RUN_ID)["model"]
    assert any(not torch.equal(last[k], v) for k, v in model.state_dict().items())


def test_early_stopping_moves_the_test_batches_behind_the_round(tmp_path) -> None:
    stop = {"data.val_fraction": "0.1", "train.steps": "9", "train.patience": "1",
            "train.min_delta": "10", "train.monitor": "loss"}  # fmt: skip
    rig = Rig(make_config(tmp_path, **stop))  # TTTV TTTV TTTV X: stops after round 1
    try:
        rig.welcome()
        replies = play(rig, range(8))
        assert replies[3] == proto.Ack(3, decided=0, best=0)
        assert replies[7] == proto.Ack(7, decided=1, best=0, stopped=1)
        rig.schedule.stop_after(1)  # the test's own copy of the schedule, as an expert does
        assert rig.schedule.step(8).split == "test" and rig.schedule.total == 9
        assert play(rig, range(8, 9)) == [proto.Ack(8, decided=1, best=0, stopped=1)]
        assert rig.broker.expect(proto.Goodbye) == proto.Goodbye("done")
        assert rig.join() == 0
    finally:
        rig.close()
    summary = json.loads((rig.config.run_path / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stopping" and summary["steps"] == 6
    assert summary["best"]["round"] == 0 and summary["test"]["samples"] == 359
