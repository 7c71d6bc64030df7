"""The ReducerService loop in-process, against a fake broker: a ROUTER socket in the test
thread that speaks ``traci_ml.proto`` over loopback TCP and sends BATCHes of random tokens
laid out by the schedule."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from tests.helpers.support import ServiceRig, fake_broker_config
from traci_ml import proto
from traci_ml.core import checkpoint
from traci_ml.core.config import WEIGHT_DECAY_ROWS, Config
from traci_ml.core.data import load_dataset
from traci_ml.core.models.optim import weight_decay_for
from traci_ml.core.models.reducer import Reducer, expert_dropout_mask, loss_and_metric
from traci_ml.core.schedule import Schedule, schedule_for
from traci_ml.core.tensors import derive_seed
from traci_ml.services.reducer.service import ReducerService

pytestmark = pytest.mark.timeout(60)

RUN_ID, D, BATCH, N_EXPERTS, N_TEST = "reducer-test", 8, 16, 4, 359
TOTAL = 8  # 6 train steps, eval after every 3: train 0-2, eval 3, train 4-6, eval 7
ALL = (True,) * N_EXPERTS


def make_config(tmp_path: Path, **extra: str) -> Config:
    settings = {
        "run_id": RUN_ID, "seed": "5", "run_dir": str(tmp_path / "run"), "embed_dim": str(D),
        "reducer.layers": "1", "reducer.heads": "2", "reducer.ff": "16",
        "reducer.device": "cpu", "reducer.eval_batch_size": "512",
        "expert.torch_threads": "1", "train.steps": "6", "train.eval_every": "3",
        "train.batch_size": str(BATCH), "train.log_every": "1", "train.checkpoint_every": "0",
        # no validation split: the rounds score the test split, in the seqs above (model
        # selection against this fake broker: tests/{expert,reducer}/test_selection.py)
        "data.val_fraction": "0",
    }  # fmt: skip
    return fake_broker_config(settings, extra)


class Rig(ServiceRig):
    """A ReducerService whose run() is in a background thread, and its fake broker."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.dataset = load_dataset(config)
        self.schedule: Schedule = schedule_for(config, self.dataset)

        def make(context: zmq.Context, stop: threading.Event) -> ReducerService:
            return ReducerService(config, context=context, stop=stop)

        super().__init__(config.network.reducer_port, make, "ReducerService")

    def rows(self, seq: int) -> np.ndarray:
        return self.schedule.rows(self.schedule.step(seq))

    def tokens(self, seq: int, present: tuple[bool, ...] = ALL) -> list[np.ndarray]:
        """Random float32 tokens [B, d] for each present expert of ``seq`` (reproducible)."""
        rng = np.random.default_rng([seq, *present])
        b = len(self.rows(seq))
        return [rng.normal(0, 1, (b, D)).astype(np.float32) for p in present if p]

    def batch(
        self,
        seq: int,
        present: tuple[bool, ...] = ALL,
        *,
        tokens: list[np.ndarray] | None = None,
        phase: str | None = None,
    ) -> proto.Batch:
        tokens = self.tokens(seq, present) if tokens is None else tokens
        phase = phase or self.schedule.step(seq).phase
        wire = tuple(proto.Tensor.from_numpy(t) for t in tokens)
        return proto.Batch(seq, phase, present, wire)

    def rejections(self, reason: str) -> float:
        value = self.service.metrics.registry.get_sample_value(
            "traci_reducer_rejections_total", {"reason": reason}
        )
        return value or 0.0


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    running = Rig(make_config(tmp_path))
    yield running
    running.close()


def replay_first_step(rig: Rig, seq: int, present: tuple[bool, ...]) -> list[torch.Tensor]:
    """dL/dtoken of the reducer's first train step, recomputed as the worker does it."""
    config = rig.config
    torch.manual_seed(derive_seed(config.seed, "reducer"))
    model = Reducer(
        n_experts=N_EXPERTS, d=D, out_dim=rig.dataset.out_dim, cfg=config.reducer
    ).train()
    tokens = torch.zeros(N_EXPERTS, len(rig.rows(seq)), D)  # (N, B, d); absent stay zero
    present_ids = [i for i, p in enumerate(present) if p]
    for i, t in zip(present_ids, rig.tokens(seq, present), strict=True):
        tokens[i] = torch.from_numpy(t)
    tokens.requires_grad_(True)
    absent = (~torch.tensor(present)).expand(tokens.shape[1], N_EXPERTS)
    gen = torch.Generator().manual_seed(derive_seed(config.seed, "dropout", seq))
    masked = expert_dropout_mask(absent, config.reducer.expert_dropout, gen)
    logits, _ = model(tokens.transpose(0, 1), masked)
    y = torch.from_numpy(rig.dataset.y_train[rig.rows(seq)])
    loss, _ = loss_and_metric("classification", logits, y)
    loss.backward()
    return [tokens.grad[i] for i in present_ids]


# ---- registration -----------------------------------------------------------------------


def test_hello_describes_the_reducer_and_config_is_written(rig: Rig) -> None:
    hello = rig.welcome()
    assert hello == proto.Hello(
        role="reducer", run_id=RUN_ID, embed_dim=D, dtype="float32", n_experts=N_EXPERTS
    )
    written = json.loads((rig.config.run_path / "config.json").read_text())
    assert written == rig.config.to_dict()


def test_auto_weight_decay_scales_by_the_rows_training_draws_from(tmp_path: Path) -> None:
    rig = Rig(make_config(tmp_path, **{"data.val_fraction": "0.2"}))
    service = rig.service
    rig.close()
    assert rig.config.reducer.weight_decay == "auto"
    fit = len(service.schedule.fit_rows)
    assert 0 < fit < len(rig.dataset.y_train)  # the validation rows are left out
    decays = {g["weight_decay"] for g in service.optimizer.param_groups}
    assert decays == {weight_decay_for("auto", fit)} == {WEIGHT_DECAY_ROWS / fit}


# ---- one step ---------------------------------------------------------------------------


def test_train_batch_is_answered_with_a_gradient_per_present_expert(rig: Rig) -> None:
    rig.welcome()
    rig.broker.send(rig.batch(0))
    grad = rig.broker.expect(proto.Grad)
    assert (grad.seq, grad.expert_id, len(grad.tensors)) == (0, -1, N_EXPERTS)
    expected = replay_first_step(rig, 0, ALL)
    for got, want in zip(grad.tensors, expected, strict=True):
        assert (got.dtype, got.shape) == ("float32", (BATCH, D))
        torch.testing.assert_close(torch.from_numpy(got.numpy().copy()), want)
    assert any(np.abs(t.numpy()).sum() > 0 for t in grad.tensors)


def test_absent_expert_gets_no_gradient_tensor(rig: Rig) -> None:
    rig.welcome()
    present = (True, False, True, True)
    rig.broker.send(rig.batch(0, present))
    grad = rig.broker.expect(proto.Grad)
    assert grad.seq == 0 and len(grad.tensors) == 3
    expected = replay_first_step(rig, 0, present)
    for got, want in zip(grad.tensors, expected, strict=True):
        assert got.shape == (BATCH, D)
        torch.testing.assert_close(torch.from_numpy(got.numpy().copy()), want)
    sample = rig.service.metrics.registry.get_sample_value("traci_reducer_experts_present")
    assert sample == 3


def test_eval_batch_is_answered_with_ack(rig: Rig) -> None:
    rig.welcome()
    assert rig.schedule.step(3).phase == "eval"
    rig.broker.send(rig.batch(3))  # seqs 0-2 never arrived: skipped, not fatal
    assert rig.broker.expect(proto.Ack) == proto.Ack(3)
    assert rig.service.skipped == 3
    assert rig.service.train_steps == 0


def test_replayed_seq_is_rejected_and_dropped(rig: Rig) -> None:
    rig.welcome()
    rig.broker.send(rig.batch(0))
    rig.broker.expect(proto.Grad)
    rig.broker.send(rig.batch(1))
    rig.broker.expect(proto.Grad)
    for seq in (1, 0):  # the last seq again, and an older one
        rig.broker.send(rig.batch(seq))
        assert rig.broker.expect(proto.Drop) == proto.Drop(seq, "replay")
    assert rig.rejections("replay") == 2
    assert rig.service.train_steps == 2
    rig.broker.send(rig.batch(2))  # and it carries on
    assert rig.broker.expect(proto.Grad).seq == 2


@pytest.mark.parametrize(
    "bad",
    ["more_rows", "wider", "wrong_phase", "more_experts", "float16"],
)
def test_batch_not_matching_the_schedule_is_rejected_conflict(rig: Rig, bad: str) -> None:
    rig.welcome()
    good = rig.tokens(0)
    if bad == "more_rows":
        msg = rig.batch(0, tokens=[np.zeros((BATCH + 1, D), np.float32)] * N_EXPERTS)
    elif bad == "wider":
        msg = rig.batch(0, tokens=[np.zeros((BATCH, D + 1), np.float32)] * N_EXPERTS)
    elif bad == "wrong_phase":
        msg = rig.batch(0, phase="eval")
    elif bad == "more_experts":
        msg = rig.batch(0, (*ALL, True), tokens=[*good, good[0]])
    else:
        msg = rig.batch(0, tokens=[t.astype(np.float16) for t in good])
    rig.broker.send(msg)
    assert rig.broker.expect(proto.Drop) == proto.Drop(0, "conflict")
    assert rig.rejections("conflict") == 1
    rig.broker.send(rig.batch(0))  # a rejected BATCH does not use up its seq
    assert rig.broker.expect(proto.Grad).seq == 0


def test_batch_beyond_the_schedule_is_rejected_unknown_step(rig: Rig) -> None:
    rig.welcome()
    rig.broker.send(rig.batch(TOTAL, tokens=rig.tokens(0), phase="train"))
    assert rig.broker.expect(proto.Drop) == proto.Drop(TOTAL, "unknown_step")
    assert rig.rejections("unknown_step") == 1


def test_batch_with_no_present_expert_is_rejected_and_the_run_goes_on(rig: Rig) -> None:
    rig.welcome()
    rig.broker.send(proto.Batch(0, "train", (False,) * N_EXPERTS, ()))  # decode refuses it
    rig.broker.send(rig.batch(0))
    assert rig.broker.expect(proto.Grad).seq == 0
    rejected = rig.service.metrics.rejections.labels(reason="bad_field")._value.get()
    assert rejected == 1


# ---- the whole run ----------------------------------------------------------------------


def test_full_run_writes_summary_metrics_checkpoint_then_says_goodbye(rig: Rig) -> None:
    rig.welcome()
    assert rig.schedule.total == TOTAL
    for seq in range(TOTAL):
        rig.broker.send(rig.batch(seq))
        if rig.schedule.step(seq).phase == "train":
            grad = rig.broker.expect(proto.Grad)
            assert grad.seq == seq and [t.shape for t in grad.tensors] == [(BATCH, D)] * 4
        else:
            assert len(rig.rows(seq)) == N_TEST
            assert rig.broker.expect(proto.Ack) == proto.Ack(seq)
    assert rig.broker.expect(proto.Goodbye) == proto.Goodbye("done")
    assert rig.join() == 0

    run = rig.config.run_path
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run_id"] == RUN_ID and summary["task"] == "classification"
    assert summary["steps"] == 6 and summary["steps_skipped"] == 0
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["test_loss"] > 0
    assert summary["wall_seconds"] > 0
    assert summary["samples_per_sec"] == pytest.approx(6 * BATCH / summary["wall_seconds"])
    assert len(summary["eval_history"]) == 2
    assert len(summary["attention_eval"]) == N_EXPERTS

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(records) == len(train) + len(evals)
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["seq"] for r in train] == [0, 1, 2, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and 0 <= r["train_accuracy"] <= 1 for r in train)
    assert [(r["step"], r["seq"], r["samples"]) for r in evals] == [(3, 3, N_TEST), (6, 7, N_TEST)]
    assert evals[-1]["accuracy"] == summary["test_accuracy"]

    ckpt = run / "checkpoints" / "reducer.pt"
    state = checkpoint.load(ckpt, run_id=RUN_ID)
    assert (state["train_steps"], state["last_seq"], state["skipped"]) == (6, TOTAL - 1, 0)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["reducer.pt"]  # no temp files
    for name, value in rig.service.model.state_dict().items():
        assert torch.equal(state["model"][name], value), name


def test_stop_event_ends_the_run_without_a_summary(rig: Rig) -> None:
    rig.welcome()
    rig.broker.send(rig.batch(0))
    rig.broker.expect(proto.Grad)
    rig.stop.set()
    assert rig.join() == 0
    assert rig.broker.expect(proto.Goodbye) == proto.Goodbye("shutdown")
    run = rig.config.run_path
    assert not (run / "summary.json").exists()
    assert checkpoint.load(run / "checkpoints" / "reducer.pt", run_id=RUN_ID)["last_seq"] == 0


# ---- values out of bounds (security.max_abs_value) ---------------------------------------


def snapshot(service: ReducerService) -> tuple[dict, dict]:
    """The model's weights and the optimizer's state, cloned."""
    weights = {k: v.detach().clone() for k, v in service.model.state_dict().items()}
    adam = {
        k: {name: v.clone() if torch.is_tensor(v) else v for name, v in s.items()}
        for k, s in service.optimizer.state_dict()["state"].items()
    }
    return weights, adam


def assert_unchanged(service: ReducerService, before: tuple[dict, dict]) -> None:
    weights, adam = snapshot(service)
    assert weights.keys() == before[0].keys() and adam.keys() == before[1].keys()
    for name, value in weights.items():
        assert torch.equal(value, before[0][name]), f"{name} changed"
    for k, state in adam.items():
        for name, value in state.items():
            assert torch.equal(value, before[1][k][name]), f"Adam {name} of {k} changed"


def refused(rig: Rig, reason: str) -> float:
    value = rig.service.metrics.registry.get_sample_value(
        "traci_reducer_steps_refused_total", {"reason": reason}
    )
    return value or 0.0


@pytest.mark.parametrize(("value", "reason"), [(3e38, "too_large"), (float("nan"), "non_finite")])
def test_batch_with_bad_token_values_is_rejected_and_dropped(
    rig: Rig, value: float, reason: str
) -> None:
    rig.welcome()
    tokens = rig.tokens(0)
    tokens[2][:] = value  # every token of one expert
    rig.broker.send(rig.batch(0, tokens=tokens))
    assert rig.broker.expect(proto.Drop) == proto.Drop(0, reason)
    assert rig.rejections(reason) == 1
    assert rig.service.train_steps == 0 and not rig.service.optimizer.state
    rig.broker.send(rig.batch(0))  # a rejected BATCH does not use up its seq
    assert rig.broker.expect(proto.Grad).seq == 0


def start_training(rig: Rig) -> tuple[dict, dict]:
    """One good step (Adam has state to keep), then the reducer's state once it is idle."""
    rig.welcome()
    rig.broker.send(rig.batch(0))
    assert rig.broker.expect(proto.Grad).seq == 0
    rig.broker.quiet(0.2)  # the optimizer steps after the send: let it finish
    assert rig.service.train_steps == 1
    return snapshot(rig.service)


def test_nan_loss_skips_the_step_with_drop_and_keeps_weights_and_optimizer(rig: Rig) -> None:
    start_training(rig)
    with torch.no_grad():  # a model forced to a NaN loss: an infinite logit
        rig.service.model.head.bias[1] = float("inf")
    before = snapshot(rig.service)
    rig.broker.send(rig.batch(1))
    assert rig.broker.expect(proto.Drop) == proto.Drop(1, "non_finite_loss")
    rig.broker.quiet(0.2)  # no GRAD follows
    assert refused(rig, "non_finite_loss") == 1
    assert_unchanged(rig.service, before)
    assert rig.service.train_steps == 1 and rig.service.last_seq == 1
    assert all(p.grad is None for p in rig.service.model.parameters())

    with torch.no_grad():  # the run goes on
        rig.service.model.head.bias[1] = 0.0
    rig.broker.send(rig.batch(2))
    assert rig.broker.expect(proto.Grad).seq == 2
    rig.broker.quiet(0.2)
    assert rig.service.train_steps == 2
    assert np.isfinite(rig.service.ema["loss"])  # the refused loss left no trace


def test_gradient_beyond_the_bound_is_not_sent_and_the_step_is_dropped(tmp_path: Path) -> None:
    rig = Rig(make_config(tmp_path, **{"security.max_abs_value": "50"}))
    try:
        start_training(rig)
        with torch.no_grad():  # a head this steep makes dL/dtoken far beyond 50
            rig.service.model.head.weight.mul_(1e6)
        before = snapshot(rig.service)
        rig.broker.send(rig.batch(1))
        assert rig.broker.expect(proto.Drop) == proto.Drop(1, "too_large")
        rig.broker.quiet(0.2)
        assert refused(rig, "too_large") == 1
        assert_unchanged(rig.service, before)
        assert rig.service.train_steps == 1
    finally:
        rig.close()


def test_sharded_reducer_answers_the_same_gradient(tmp_path: Path) -> None:
    """reducer.shards: the train step split into row slices on threads sends what the
    whole-batch step would (to float summation order)."""
    running = Rig(make_config(tmp_path, **{"reducer.shards": "3"}))
    try:
        running.welcome()
        running.broker.send(running.batch(0))
        grad = running.broker.expect(proto.Grad)
        for got, want in zip(grad.tensors, replay_first_step(running, 0, ALL), strict=True):
            torch.testing.assert_close(torch.from_numpy(got.numpy().copy()), want,
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
    finally:
        running.close()
