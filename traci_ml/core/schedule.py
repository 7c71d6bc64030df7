"""Which rows step ``seq`` uses: a pure function of (dataset size, seed, batch size, seq).

The global step sequence interleaves training and evaluation::

    seq:  0 .. E-1 train | eval batches | E .. 2E-1 train | eval batches | ... | final eval

where E is ``train.eval_every``. Every process derives the same ``Step`` for a given ``seq``
with no coordination, so experts and the reducer agree on rows without talking; likewise the
learning rate of a train step (``lr_factor``, ``train.lr_schedule``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the schedule needs no config or data module to run
    from traci_ml.core.config import Config, TrainConfig
    from traci_ml.core.data import Dataset


@dataclass(frozen=True, slots=True)
class Step:
    seq: int
    phase: str  # "train" | "eval"
    index: int  # train step number, or the eval batch number within its round
    round: int  # eval round (0-based); for train steps, the round that follows
    last_in_round: bool  # eval: last batch of its round


class Schedule:
    """Maps ``seq`` to train/eval steps and to the rows each uses."""

    def __init__(
        self,
        *,
        n_train: int,
        n_test: int,
        seed: int,
        batch_size: int,
        steps: int,
        eval_every: int,
        eval_batch_size: int,
    ) -> None:
        if batch_size > n_train:
            raise ValueError(f"train.batch_size {batch_size} exceeds the {n_train} training rows")
        self.n_train, self.n_test, self.seed = n_train, n_test, seed
        self.batch_size, self.steps = batch_size, steps
        self.eval_every = eval_every if 0 < eval_every < steps else steps
        self.eval_batch_size = eval_batch_size
        self.eval_batches = math.ceil(n_test / eval_batch_size)
        self._block = self.eval_every + self.eval_batches
        full, self._tail = divmod(steps, self.eval_every)
        self._full_blocks = full
        self.total = full * self._block + (self._tail + self.eval_batches if self._tail else 0)
        self.steps_per_epoch = n_train // batch_size

    @property
    def eval_rounds(self) -> int:
        return self._full_blocks + (1 if self._tail else 0)

    def step(self, seq: int) -> Step:
        if not 0 <= seq < self.total:
            raise IndexError(f"seq {seq} outside the schedule [0, {self.total})")
        block, offset = divmod(seq, self._block)
        train_len = self.eval_every if block < self._full_blocks else self._tail
        if offset < train_len:
            return Step(seq, "train", block * self.eval_every + offset, block, False)
        j = offset - train_len
        return Step(seq, "eval", j, block, j == self.eval_batches - 1)

    def rows(self, step: Step) -> np.ndarray:
        """Row indices into the train split (train) or the test split (eval)."""
        if step.phase == "eval":
            start = step.index * self.eval_batch_size
            return np.arange(start, min(start + self.eval_batch_size, self.n_test))
        epoch, k = divmod(step.index, self.steps_per_epoch)
        perm = _permutation(self.n_train, self.seed, epoch)
        return perm[k * self.batch_size : (k + 1) * self.batch_size].copy()

    def next_eval_seq(self, seq: int) -> int:
        """The first eval step at or after ``seq`` (``total`` when none is left)."""
        block, offset = divmod(seq, self._block)
        train_len = self.eval_every if block < self._full_blocks else self._tail
        if offset >= train_len:
            return min(seq, self.total)
        return min(block * self._block + train_len, self.total)

    def first_seq_of_train_step(self, index: int) -> int:
        """The ``seq`` of train step ``index`` (used to resume at a step boundary)."""
        block, offset = divmod(index, self.eval_every)
        return block * self._block + offset


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, 0x5EED, epoch]).permutation(n)
    perm.setflags(write=False)
    return perm


def lr_factor(index: int, train: TrainConfig) -> float:
    """Multiplier of the base learning rate at train step ``index``: linear warm-up over
    ``train.warmup_steps``, then 1 (constant) or a cosine from 1 down to
    ``train.min_lr_ratio`` at the last step. A pure function of the step, so an expert and
    the reducer use the same rate for the same step, across restarts too."""
    if index < train.warmup_steps:
        return (index + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return 1.0
    span = max(train.steps - train.warmup_steps - 1, 1)
    t = min(max(index - train.warmup_steps, 0) / span, 1.0)
    lo = train.min_lr_ratio
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer, base: float, index: int, train: TrainConfig) -> None:  # noqa: ANN001
    """Sets every parameter group of ``optimizer`` to the scheduled rate for train step
    ``index``."""
    lr = base * lr_factor(index, train)
    for group in optimizer.param_groups:
        group["lr"] = lr


def schedule_for(config: Config, dataset: Dataset) -> Schedule:
    return make_schedule(config, len(dataset.y_train), len(dataset.y_test))


def make_schedule(config: Config, n_train: int, n_test: int) -> Schedule:
    """The run's schedule over ``n_train`` train and ``n_test`` test rows (the label
    holder's counts; in parties mode an expert learns them when it aligns)."""
    return Schedule(
        n_train=n_train,
        n_test=n_test,
        seed=config.seed,
        batch_size=config.train.batch_size,
        steps=config.train.steps,
        eval_every=config.train.eval_every,
        eval_batch_size=config.reducer.eval_batch_size,
    )
