"""TRACI's training algorithm in one process: the reference the distributed run must equal.

The services compute one training step across processes (the design brief's "Data flow of one
training step"); here it is whole, with ``window: 1`` semantics. ``ReferenceTrainer.step(batch)``:

1. Each expert ``i`` embeds its own features of the batch with its *target* net, no grad:
   ``t_i = target_i(x_i)``, (B, d). Rows the expert lacks are zeros and never reach the net.
   On a train step ``x_i`` carries the expert's input noise (``expert.input_noise``, drawn
   by (seed, i, seq)), the same in step 6.
2. The tokens are rounded to the wire dtype (``expert.dtype``) and back, as the expert's
   send and the reducer's receive do; float32 leaves them untouched.
3. The reducer reads the N tokens of each row with a key padding mask: the absent experts,
   plus the expert dropout of step ``seq`` (seeded, so every run drops the same tokens).
4. The loss on the labels; backward; the reducer's Adam steps at the scheduled learning rate.
5. ``dL/dtokens`` (N, B, d), rounded to the wire dtype like the GRAD, goes back per expert.
6. Each expert recomputes ``o_i = online_i(x_i)`` (the same noisy ``x_i``) on the rows it
   holds, ``o_i.backward(g_i)``, steps its Adam, then pulls its target along:
   ``target <- target + tau (online - target)``.

Only target outputs are ever read by the reducer; the gradient only reaches online nets.
Every net is seeded as its service seeds it, so the first step starts from the same weights.
``train_reference`` runs a config's whole schedule (eval rounds included) this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from traci_ml.core.config import Config
from traci_ml.core.data import Dataset, load_dataset
from traci_ml.core.models.expert import (
    build_expert,
    input_noise,
    input_noise_for,
    polyak_update,
)
from traci_ml.core.models.reducer import build_reducer, dropout_mask, loss_and_metric
from traci_ml.core.schedule import Step, schedule_for, set_lr
from traci_ml.core.tensors import TORCH_DTYPES


@dataclass
class Batch:
    """One step's inputs: what each party holds of the batch's rows."""

    xs: list[torch.Tensor]  # per expert, (B, F_i): its own features of the rows
    y: torch.Tensor  # (B,) the label holder's labels
    seq: int  # place in the schedule: seeds the expert dropout
    index: int  # train step number: the learning-rate schedule
    # (B, N) bool, True where expert i lacks row b (None: all present). Rows no expert holds
    # are the caller's to drop first, as the reducer service does.
    absent: torch.Tensor | None = None


class ReferenceTrainer:
    """N experts (online net, target net, Adam each) and the reducer (+ Adam), in one process."""

    def __init__(self, config: Config, *, in_dims: Sequence[int], out_dim: int, task: str,
                 train_rows: int | None = None):  # fmt: skip
        """``train_rows``: the rows training draws from ("auto" weight decay scales by them;
        None: no penalty)."""
        self.config, self.task, self.n = config, task, len(in_dims)
        self.online, self.target, self.opts = [], [], []
        for i, in_dim in enumerate(in_dims):  # in expert order: each is seeded on its own
            online, target, opt = build_expert(config, i, in_dim, train_rows=train_rows)
            self.online.append(online)
            self.target.append(target)
            self.opts.append(opt)
        self.reducer, self.reducer_opt = build_reducer(config, n_experts=self.n, out_dim=out_dim,
                                                       train_rows=train_rows)  # fmt: skip
        self.wire = TORCH_DTYPES[config.expert.dtype]
        # expert.input_noise "auto" scales by the training rows too (None: no noise)
        self.noise = 0.0 if train_rows is None else input_noise_for(config.expert.input_noise,
                                                                     train_rows, task)  # fmt: skip

    @classmethod
    def for_dataset(cls, config: Config, ds: Dataset) -> ReferenceTrainer:
        in_dims = [len(ds.view_columns(i)) for i in range(ds.n_experts)]
        rows = len(schedule_for(config, ds).fit_rows)
        return cls(config, in_dims=in_dims, out_dim=ds.out_dim, task=ds.task, train_rows=rows)

    def _absent(self, batch: Batch) -> torch.Tensor:
        if batch.absent is not None:
            return batch.absent
        return torch.zeros(len(batch.y), self.n, dtype=torch.bool)

    def inputs(self, batch: Batch) -> list[torch.Tensor]:
        """Each expert's inputs of a train step: its features plus its input noise."""
        if not self.noise:
            return batch.xs
        return [x + input_noise(self.noise, self.config.seed, i, batch.seq, tuple(x.shape))
                for i, x in enumerate(batch.xs)]  # fmt: skip

    @torch.no_grad()
    def embed(self, batch: Batch, xs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Steps 1-2: the tokens (N, B, d) the reducer receives (``xs``: the experts' inputs,
        by default the batch's own features)."""
        tokens = []
        for i, x in enumerate(batch.xs if xs is None else xs):
            if batch.absent is None:
                t = self.target[i](x)
            else:  # the expert embeds only the rows it holds; the rest stay zeros
                held = ~batch.absent[:, i]
                t = torch.zeros(len(x), self.config.embed_dim)
                if held.any():
                    t[held] = self.target[i](x[held]).to(t.dtype)
            tokens.append(t)
        return torch.stack(tokens).to(self.wire).float()  # the wire's rounding

    def step(self, batch: Batch) -> float:
        """One training step (1-6 above); returns the loss."""
        cfg = self.config
        xs = self.inputs(batch)
        tokens = self.embed(batch, xs).requires_grad_(True)  # (N, B, d)
        masked = dropout_mask(cfg, self._absent(batch), batch.seq)
        self.reducer.train()
        logits, _ = self.reducer(tokens.transpose(0, 1), masked)
        loss, _ = loss_and_metric(self.task, logits, batch.y)
        self.reducer_opt.zero_grad(set_to_none=True)
        loss.backward()
        set_lr(self.reducer_opt, cfg.reducer.lr, batch.index, cfg.train)
        self.reducer_opt.step()
        grads = tokens.grad.to(self.wire)  # the GRAD on the wire, (N, B, d)
        for i, (online, target, opt) in enumerate(
            zip(self.online, self.target, self.opts, strict=True)
        ):
            x, g = xs[i], grads[i]
            if batch.absent is not None:  # an absent row's gradient is not this expert's
                held = ~batch.absent[:, i]
                x, g = x[held], g[held]
            if not len(x):
                continue  # nothing held: no step, no Polyak update (as the expert does)
            online.train()
            out = online(x)  # (B_held, d), recomputed with the current weights
            opt.zero_grad(set_to_none=True)
            out.backward(g.to(out.dtype))
            set_lr(opt, cfg.expert.lr, batch.index, cfg.train)
            opt.step()
            polyak_update(target, online, cfg.expert.tau)
        return loss.item()

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> torch.Tensor:
        """The reducer's prediction (logits, (B, out)) from the targets' tokens; no update."""
        self.reducer.eval()
        logits, _ = self.reducer(self.embed(batch).transpose(0, 1), self._absent(batch))
        return logits


class ReferenceData:
    """Every party's data, indexed by the schedule: ``batch(seq)`` is step ``seq``'s batch."""

    def __init__(self, config: Config, ds: Dataset) -> None:
        self.schedule = schedule_for(config, ds)
        self.views = {  # by Step.source: train and validation steps index the train split
            split: [torch.from_numpy(ds.view(i, split)) for i in range(ds.n_experts)]
            for split in ("train", "test")
        }
        self.labels = {"train": torch.from_numpy(ds.y_train), "test": torch.from_numpy(ds.y_test)}

    def batch(self, seq: int) -> tuple[Step, Batch]:
        """Step ``seq`` of the schedule and its batch."""
        step = self.schedule.step(seq)
        rows = torch.as_tensor(self.schedule.rows(step))
        xs = [view[rows] for view in self.views[step.source]]
        return step, Batch(xs, self.labels[step.source][rows], seq, step.index)


@dataclass
class ReferenceRun:
    trainer: ReferenceTrainer
    losses: list[float] = field(default_factory=list)  # per train step
    # per eval round (validation rounds, then the test batches; no model is selected here,
    # the test batches score the last weights): accuracy or RMSE
    eval_metrics: list[float] = field(default_factory=list)


def train_reference(config: Config, *, max_seq: int | None = None) -> ReferenceRun:
    """``config``'s schedule (its first ``max_seq`` steps), trained in this process."""
    ds = load_dataset(config)
    data = ReferenceData(config, ds)
    run = ReferenceRun(ReferenceTrainer.for_dataset(config, ds))
    total = data.schedule.total if max_seq is None else min(max_seq, data.schedule.total)
    score = seen = 0.0  # eval round so far: correct rows, or squared error
    for seq in range(total):
        step, batch = data.batch(seq)
        if step.phase == "train":
            run.losses.append(run.trainer.step(batch))
            continue
        logits = run.trainer.evaluate(batch)
        if ds.task == "classification":
            score += int((logits.argmax(-1) == batch.y).sum())
        else:
            score += float(((logits.squeeze(-1) - batch.y) ** 2).sum())
        seen += len(batch.y)
        if step.last_in_round:
            run.eval_metrics.append(score / seen if ds.task == "classification" else
                                    (score / seen) ** 0.5)  # fmt: skip
            score = seen = 0.0
    return run
