"""The reducer Transformer, expert dropout, the loss/metric and eval-round accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from traci_ml.core.config import ReducerConfig
from traci_ml.core.models.reducer import Reducer, expert_dropout_mask, loss_and_metric
from traci_ml.services.reducer.runlog import EvalRound

pytestmark = pytest.mark.timeout(60)

B, N, D, OUT = 5, 4, 8, 3  # batch, experts, token width, classes


def make_reducer(seed: int = 0, *, layers: int = 2, out_dim: int = OUT) -> Reducer:
    torch.manual_seed(seed)
    cfg = ReducerConfig(layers=layers, heads=2, ff=16, dropout=0.0)
    return Reducer(n_experts=N, d=D, out_dim=out_dim, cfg=cfg).eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, N, D, generator=g) * 2 + 0.5  # (B, N, d)
    absent = torch.zeros(B, N, dtype=torch.bool)
    absent[0, 1] = absent[2, 0] = absent[2, 3] = absent[4, :3] = True
    return tokens, absent


# ---- shapes and attention ---------------------------------------------------------------


@pytest.mark.parametrize("layers", [1, 2])
def test_output_shapes_and_attention_over_present_experts(layers: int) -> None:
    model = make_reducer(layers=layers)
    tokens, absent = inputs()
    logits, att = model(tokens, absent)
    assert logits.shape == (B, OUT) and att.shape == (B, N)
    assert torch.isfinite(logits).all() and torch.isfinite(att).all()
    assert (att >= 0).all()
    assert (att.sum(dim=1) <= 1 + 1e-6).all()  # the rest goes to [CLS] itself
    assert (att[absent] == 0).all()
    assert (att[~absent] > 0).all()


def test_regression_head_has_one_output() -> None:
    logits, _ = make_reducer(out_dim=1)(*inputs())
    assert logits.shape == (B, 1)


# ---- masking ----------------------------------------------------------------------------


def test_absent_token_does_not_change_the_output() -> None:
    model = make_reducer()
    tokens, absent = inputs()
    logits, att = model(tokens, absent)
    changed = tokens.clone()
    changed[absent] = torch.randn(int(absent.sum()), D) * 100  # garbage where absent
    logits2, att2 = model(changed, absent)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)
    torch.testing.assert_close(att2, att, rtol=0, atol=0)
    # ... while changing a present token does change it
    moved = tokens.clone()
    moved[0, 0] += torch.randn(D)  # not a constant shift: ln_in would remove that
    assert not torch.allclose(model(moved, absent)[0][0], logits[0])


def test_absent_token_gets_exactly_zero_gradient() -> None:
    model = make_reducer().train()
    tokens, absent = inputs()
    tokens.requires_grad_(True)
    logits, _ = model(tokens, absent)
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1])).backward()
    assert tokens.grad is not None
    assert (tokens.grad[absent] == 0).all()
    assert (tokens.grad[~absent].abs().sum(dim=-1) > 0).all()


def test_sample_with_every_expert_absent_reads_the_cls_token() -> None:
    model = make_reducer()
    tokens, _ = inputs()
    absent = torch.ones(B, N, dtype=torch.bool)
    logits, att = model(tokens, absent)
    assert torch.isfinite(logits).all()
    assert (att == 0).all()
    # Only [CLS] is left, so every sample gets the same output whatever its tokens are.
    torch.testing.assert_close(logits, logits[:1].expand(B, -1))
    logits2, _ = model(torch.randn(B, N, D), absent)
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)


def test_identity_embedding_makes_the_model_order_sensitive() -> None:
    model = make_reducer()
    tokens = torch.randn(B, N, D)
    present = torch.zeros(B, N, dtype=torch.bool)
    perm = torch.tensor([2, 0, 3, 1])
    logits, _ = model(tokens, present)
    logits_perm, att_perm = model(tokens[:, perm], present)
    assert (logits_perm - logits).abs().max() > 1e-5
    # Without the identity embedding the experts are an unordered set: permuting them
    # permutes the attention and leaves the output unchanged.
    with torch.no_grad():
        model.identity.zero_()
    logits, att = model(tokens, present)
    logits_perm, att_perm = model(tokens[:, perm], present)
    torch.testing.assert_close(logits_perm, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(att_perm, att[:, perm], rtol=1e-5, atol=1e-6)


def full_forward(model: Reducer, tokens: torch.Tensor, absent: torch.Tensor):
    """The reducer with every block computing every token (what the last block's [CLS]-only
    shortcut must equal)."""
    B = tokens.shape[0]
    x = model.ln_in(tokens) + model.identity
    x = torch.cat([model.cls.expand(B, -1, -1), x], dim=1)
    mask = F.pad(absent, (1, 0), value=False)
    for block in model.blocks:
        x, att = block(x, mask)
        assert x.shape[1] == N + 1 and att.shape[2] == N + 1  # every query row
    return model.head(model.ln_out(x[:, 0])), att[:, :, 0, 1:].mean(dim=1)


@pytest.mark.parametrize("layers", [1, 3])
def test_the_last_block_computing_cls_alone_is_the_full_computation(layers: int) -> None:
    model = make_reducer(layers=layers).train()  # train mode: dropout 0, gradients on
    tokens, absent = inputs()
    a = tokens.clone().requires_grad_(True)
    b = tokens.clone().requires_grad_(True)
    logits, att = model(a, absent)
    ref_logits, ref_att = full_forward(model, b, absent)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(att, ref_att, rtol=1e-5, atol=1e-6)
    (logits**2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (ref_logits**2).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)  # what experts receive
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


# ---- expert dropout ---------------------------------------------------------------------


def test_expert_dropout_with_p_zero_returns_the_input() -> None:
    _, absent = inputs()
    assert expert_dropout_mask(absent, 0.0) is absent
    assert expert_dropout_mask(absent, 0.0, torch.Generator().manual_seed(3)) is absent


def test_expert_dropout_never_unmasks_an_absent_token() -> None:
    _, absent = inputs()
    for seed in range(20):
        masked = expert_dropout_mask(absent, 0.5, torch.Generator().manual_seed(seed))
        assert masked.shape == absent.shape and masked.dtype == torch.bool
        assert masked[absent].all()
    assert absent.sum() == 6  # the input is not modified in place


@pytest.mark.parametrize("p", [0.1, 0.3, 0.6])
def test_expert_dropout_rate_is_roughly_p(p: float) -> None:
    present_only = torch.zeros(4000, N, dtype=torch.bool)
    masked = expert_dropout_mask(present_only, p, torch.Generator().manual_seed(11))
    assert abs(masked.float().mean().item() - p) < 0.03


def test_expert_dropout_is_deterministic_with_a_seeded_generator() -> None:
    absent = torch.zeros(64, N, dtype=torch.bool)
    a = expert_dropout_mask(absent, 0.3, torch.Generator().manual_seed(7))
    b = expert_dropout_mask(absent, 0.3, torch.Generator().manual_seed(7))
    c = expert_dropout_mask(absent, 0.3, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---- loss and metric --------------------------------------------------------------------


def test_loss_and_metric_classification_is_cross_entropy_and_accuracy() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.5]])
    y = torch.tensor([0, 1, 0, 2])  # argmax: 0, 1, 2, 0 -> two right
    loss, accuracy = loss_and_metric("classification", logits, y)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y))
    assert accuracy == pytest.approx(0.5)
    assert loss.requires_grad is False  # plain tensors in, no graph


def test_loss_and_metric_regression_is_mse_and_rmse() -> None:
    pred = torch.tensor([[1.0], [2.0], [3.0]], requires_grad=True)
    y = torch.tensor([1.0, 1.0, 1.0])
    loss, rmse = loss_and_metric("regression", pred, y)
    assert loss.item() == pytest.approx(5 / 3)
    assert rmse == pytest.approx(math.sqrt(5 / 3))
    loss.backward()  # the loss keeps its graph for training
    assert pred.grad is not None


# ---- one evaluation round ---------------------------------------------------------------


def batches(task: str, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Three uneven eval batches: (logits, y, att, absent)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows in (7, 5, 1):
        if task == "classification":
            logits = torch.randn(rows, OUT, generator=g)
            y = torch.randint(0, OUT, (rows,), generator=g)
        else:
            logits = torch.randn(rows, 1, generator=g)
            y = torch.randn(rows, generator=g)
        att = torch.rand(rows, N, generator=g)
        absent = torch.rand(rows, N, generator=g) < 0.4
        absent[:, 3] = True  # expert 3 never took part
        out.append((logits, y, att, absent))
    return out


def test_eval_round_classification_matches_a_direct_computation() -> None:
    parts = batches("classification")
    rnd = EvalRound("classification", N)
    for logits, y, att, absent in parts:
        rnd.add(logits, y, att, absent)
    result = rnd.result()
    logits, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    assert result["samples"] == 13
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert result["accuracy"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert "rmse" not in result and "r2" not in result


def test_eval_round_regression_reports_rmse_in_label_units_and_r2() -> None:
    parts = batches("regression")
    y_std = 2.5
    rnd = EvalRound("regression", N, y_std)
    for logits, y, att, absent in parts:
        rnd.add(logits, y, att, absent)
    result = rnd.result()
    pred = np.concatenate([p[0].numpy()[:, 0] for p in parts]).astype(np.float64)
    y = np.concatenate([p[1].numpy() for p in parts]).astype(np.float64)
    mse = np.mean((pred - y) ** 2)
    assert result["samples"] == 13
    assert result["loss"] == pytest.approx(mse, rel=1e-5)
    assert result["rmse"] == pytest.approx(math.sqrt(mse) * y_std, rel=1e-5)
    r2 = 1 - np.sum((pred - y) ** 2) / np.sum((y - y.mean()) ** 2)
    assert result["r2"] == pytest.approx(r2, rel=1e-5)
    assert "accuracy" not in result


def test_eval_round_perfect_regression_has_r2_one_and_rmse_zero() -> None:
    y = torch.tensor([0.5, -1.0, 2.0])
    rnd = EvalRound("regression", N, 3.0)
    rnd.add(y[:, None].clone(), y, torch.zeros(3, N), torch.zeros(3, N, dtype=torch.bool))
    result = rnd.result()
    assert result["rmse"] == 0.0 and result["r2"] == pytest.approx(1.0)


def test_eval_round_averages_attention_over_present_experts_only() -> None:
    parts = batches("classification")
    rnd = EvalRound("classification", N)
    for logits, y, att, absent in parts:
        rnd.add(logits, y, att, absent)
    att = torch.cat([p[2] for p in parts])
    absent = torch.cat([p[3] for p in parts])
    expected = []
    for i in range(N):
        rows = att[~absent[:, i], i]
        expected.append(rows.mean().item() if len(rows) else 0.0)
    assert expected[3] == 0.0  # never present: 0, not the mean of its (ignored) weights
    assert rnd.attention() == pytest.approx(expected, rel=1e-6)
    assert rnd.result()["attention"] == pytest.approx(expected, rel=1e-6)


def test_eval_round_without_batches_has_zero_attention() -> None:
    assert EvalRound("classification", N).attention() == [0.0] * N
