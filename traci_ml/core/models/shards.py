"""One reducer train step split into row slices that run on parallel threads.

A CPU reducer with torch's intra-op threads splits every small kernel between cores and
meets at a barrier after each; on a machine whose cores the experts share too, a worker
that loses its core leaves the others spinning at that barrier (on 2 cores the reference
reducer took ~37 ms of CPU per step on 2 intra-op threads against ~31 ms on one). Splitting
the *batch* instead -- each slice's forward and backward on its own thread, with the
process's intra-op threads (``reducer.torch_threads``: 1 for this) -- does the same work
with no barrier inside a step: the slices' parameter gradients are summed in slice order,
their token gradients concatenated.

The reducer has no batch statistics (layer norm and attention are per row), so a sharded
step is the same function as the whole-batch step: results differ by float summation order
only (and dropout, when on, draws differently). No sockets here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from traci_ml.core.models.reducer import loss_and_metric, task_loss


class ShardedStep:
    """Forward and backward of ``model`` over ``shards`` slices of a batch, one thread each."""

    def __init__(self, model: nn.Module, shards: int) -> None:
        self.model, self.shards = model, shards
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._pool = ThreadPoolExecutor(shards, thread_name_prefix="reducer-shard")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __call__(
        self, task: str, tokens: torch.Tensor, absent: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
        """tokens (N, B, d), absent (B, N), y (B,) -> (loss, metric, attention (B, N), token
        gradients (N, B, d)); each parameter's ``.grad`` is set to the batch's gradient of
        the mean loss."""
        B = tokens.shape[1]
        cuts = [k * B // self.shards for k in range(self.shards + 1)]
        slices = [slice(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
        parts = list(self._pool.map(lambda s: self._part(task, tokens, absent, y, s, B), slices))
        for i, p in enumerate(self.params):  # summed in slice order: deterministic
            grad = None
            for part in parts:
                g = part[3][i]
                grad = g if grad is None else grad if g is None else grad.add_(g)
            p.grad = grad
        logits = torch.cat([part[0] for part in parts])
        with torch.no_grad():
            loss, metric = loss_and_metric(task, logits, y)
        att = torch.cat([part[1] for part in parts])
        return loss, metric, att, torch.cat([part[2] for part in parts], dim=1)

    def _part(self, task: str, tokens: torch.Tensor, absent: torch.Tensor, y: torch.Tensor,
              rows: slice, total: int) -> tuple:  # fmt: skip
        mine = tokens[:, rows].detach().requires_grad_(True)
        logits, att = self.model(mine.transpose(0, 1), absent[rows])
        loss = task_loss(task, logits, y[rows], reduction="sum") / total
        grads = torch.autograd.grad(loss, [mine, *self.params], allow_unused=True)
        return logits.detach(), att.detach(), grads[0], grads[1:]
