"""The same model trained in one process, step for step as the distributed path computes it
with ``window: 1``: the reference for the equivalence test and for accuracy comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from traci_ml.core.config import Config
from traci_ml.core.data import load_dataset
from traci_ml.core.models.expert import build_expert_net, make_target, polyak_update
from traci_ml.core.models.reducer import Reducer, expert_dropout_mask, loss_and_metric
from traci_ml.core.schedule import schedule_for, set_lr
from traci_ml.core.tensors import derive_seed


@dataclass
class FusedResult:
    losses: list[float] = field(default_factory=list)  # train loss per train step
    eval_metrics: list[float] = field(default_factory=list)  # per eval round
    experts: list[torch.nn.Module] = field(default_factory=list)  # online nets
    targets: list[torch.nn.Module] = field(default_factory=list)
    reducer: torch.nn.Module | None = None


def train_fused(config: Config, *, max_seq: int | None = None) -> FusedResult:
    ds = load_dataset(config)
    sched = schedule_for(config, ds)
    views = [
        {
            "train": torch.from_numpy(ds.view(i, "train")),
            "eval": torch.from_numpy(ds.view(i, "test")),
        }
        for i in range(ds.n_experts)
    ]
    online, target, opts = [], [], []
    for i in range(ds.n_experts):
        torch.manual_seed(derive_seed(config.seed, "expert", i))
        net = build_expert_net(
            config.expert.model, in_dim=views[i]["train"].shape[1], out_dim=config.embed_dim
        )
        online.append(net)
        target.append(make_target(net))
        opts.append(
            torch.optim.Adam(
                net.parameters(), lr=config.expert.lr, weight_decay=config.expert.weight_decay
            )
        )
    torch.manual_seed(derive_seed(config.seed, "reducer"))
    reducer = Reducer(
        n_experts=ds.n_experts, d=config.embed_dim, out_dim=ds.out_dim, cfg=config.reducer
    )
    r_opt = torch.optim.Adam(
        reducer.parameters(), lr=config.reducer.lr, weight_decay=config.reducer.weight_decay
    )
    labels = {"train": torch.from_numpy(ds.y_train), "eval": torch.from_numpy(ds.y_test)}
    result = FusedResult(experts=online, targets=target, reducer=reducer)
    correct = seen = 0
    for seq in range(sched.total if max_seq is None else min(max_seq, sched.total)):
        step = sched.step(seq)
        rows = torch.as_tensor(sched.rows(step))
        with torch.no_grad():
            tokens = torch.stack(
                [target[i](views[i][step.phase][rows]) for i in range(ds.n_experts)]
            )  # (N, B, d)
        y = labels[step.phase][rows]
        absent = torch.zeros(len(rows), ds.n_experts, dtype=torch.bool)
        if step.phase == "eval":
            reducer.eval()
            with torch.no_grad():
                logits, _ = reducer(tokens.transpose(0, 1), absent)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
            if step.last_in_round:
                result.eval_metrics.append(correct / seen)
                correct = seen = 0
            continue
        reducer.train()
        gen = torch.Generator().manual_seed(derive_seed(config.seed, "dropout", seq))
        masked = expert_dropout_mask(absent, config.reducer.expert_dropout, gen)
        tokens.requires_grad_(True)
        logits, _ = reducer(tokens.transpose(0, 1), masked)
        loss, _ = loss_and_metric(ds.task, logits, y)
        r_opt.zero_grad(set_to_none=True)
        loss.backward()
        set_lr(r_opt, config.reducer.lr, step.index, config.train)
        r_opt.step()
        for i in range(ds.n_experts):
            out = online[i](views[i]["train"][rows])
            opts[i].zero_grad(set_to_none=True)
            out.backward(tokens.grad[i])
            set_lr(opts[i], config.expert.lr, step.index, config.train)
            opts[i].step()
            polyak_update(target[i], online[i], config.expert.tau)
        result.losses.append(loss.item())
    return result
