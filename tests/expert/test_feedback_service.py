"""An expert on the int8 wire with error feedback (docs/compression.md), against the fake
broker of test_service: it sends int8, applies int8 gradients, counts the wire bytes, and
its residuals survive a restart through the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.expert.test_service import RUN_ID, TOTAL, D, start  # noqa: F401  (fixture)
from traci_ml import proto
from traci_ml.core import checkpoint
from traci_ml.proto import codec
from traci_ml.services.expert.service import ExpertService

pytestmark = pytest.mark.timeout(60)
INT8_EF = {"expert.dtype": "int8", "expert.error_feedback": "true", "expert.window": "1"}


def int8_grad(emb: proto.Emb) -> proto.Grad:
    rows = emb.tensor.shape[0]
    g = np.random.default_rng(emb.seq).normal(0, 0.5, (rows, D)).astype(np.float32)
    return proto.Grad(emb.seq, 0, (proto.Tensor("int8", (rows, D), bytes(codec.quantize(g))),))


def play(rig, steps: int = TOTAL) -> list[proto.Emb]:  # noqa: ANN001
    """Lock-step broker: answer every EMB (int8 GRAD or ACK) until ``steps`` were sent."""
    got = []
    for _ in range(steps):
        emb = rig.broker.expect(proto.Emb)
        got.append(emb)
        rig.broker.send(int8_grad(emb) if emb.phase == "train" else proto.Ack(emb.seq))
    return got


def wire_bytes(rig, direction: str) -> float:  # noqa: ANN001
    value = rig.expert.metrics.registry.get_sample_value(
        "traci_expert_wire_bytes_total", {"expert": "0", "direction": direction}
    )
    return value or 0.0


def test_int8_run_with_feedback_counts_bytes_and_checkpoints_the_residual(start) -> None:  # noqa: F811
    rig = start(**INT8_EF)
    rig.welcome()
    sent = play(rig)
    assert rig.join() == 0
    assert all(e.tensor.dtype == "int8" for e in sent)
    assert rig.expert.accounts.applied == 6 and rig.expert.accounts.rejected == 0
    assert wire_bytes(rig, "sent") == sum(e.tensor.nbytes for e in sent)
    rows = sent[0].tensor.shape[0]
    assert wire_bytes(rig, "received") == 6 * proto.frame_nbytes("int8", (rows, D))
    residual = rig.expert.feedback.residual.copy()
    assert np.abs(residual).max() > 0  # train rows left rounding errors behind

    ckpt = rig.config.run_path / "checkpoints" / "expert-0.pt"
    state = checkpoint.load(ckpt, run_id=RUN_ID, expert_id=0)
    assert torch.equal(state["feedback"]["residual"], torch.from_numpy(residual))
    resumed = ExpertService(rig.config, 0, resume=True, context=rig.broker.context)
    assert np.array_equal(resumed.feedback.residual, residual)
    fresh = ExpertService(rig.config, 0, resume=False, context=rig.broker.context)
    assert not fresh.feedback.residual.any()


def test_without_feedback_no_residual_is_kept(start) -> None:  # noqa: F811
    rig = start(**{**INT8_EF, "expert.error_feedback": "false"})
    rig.welcome()
    play(rig)
    assert rig.join() == 0
    assert rig.expert.feedback is None and rig.expert.accounts.applied == 6
    state = checkpoint.load(rig.config.run_path / "checkpoints" / "expert-0.pt",
                            run_id=RUN_ID, expert_id=0)  # fmt: skip
    assert state["feedback"] is None
