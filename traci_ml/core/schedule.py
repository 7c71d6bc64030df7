"""Which rows step ``seq`` uses: a pure function of (dataset size, seed, batch size, seq).

The global step sequence interleaves training and evaluation::

    seq:  0 .. E-1 train | val batches | E .. 2E-1 train | val batches | ... | final val | test

where E is ``train.eval_every``. Every process derives the same ``Step`` for a given ``seq``
with no coordination, so experts and the reducer agree on rows without talking; likewise the
learning rate of a train step (``lr_factor``, ``train.lr_schedule``).

The validation rows are carved from the train split by the seed (``data.val_fraction``,
``align.validation_split``): training draws its batches from the rest, every evaluation
round scores the validation rows, and the test split is scored once, in the test batches
at the end, on the model selected on validation (docs/config.md "Model selection"). Early
stopping ends training after a round: ``stop_after(round)`` moves the test batches right
behind it, the one change to the mapping, made by each process when it learns the decision.
With ``data.val_fraction: 0`` there is no validation split and the rounds score the test
split as they always did (the last round is the test scoring; nothing is selected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from traci_ml.core.align import validation_split

if TYPE_CHECKING:  # annotations only: the schedule needs no config or data module to run
    from traci_ml.core.config import Config, TrainConfig
    from traci_ml.core.data import Dataset


@dataclass(frozen=True, slots=True)
class Step:
    seq: int
    phase: str  # "train" | "eval" (on the wire: the test batches are eval steps too)
    index: int  # train step number, or the eval batch number within its round
    round: int  # eval round (0-based); for train steps, the round that follows
    last_in_round: bool  # eval: last batch of its round
    split: str = "train"  # whose rows: "train", "val" or "test"

    @property
    def source(self) -> str:
        """The data split the step's row numbers index: "train" (train and val steps) or
        "test"."""
        return "test" if self.split == "test" else "train"


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
        val_fraction: float = 0.0,
    ) -> None:
        self.fit_rows, self.val_rows = validation_split(n_train, seed, val_fraction)
        n_fit = len(self.fit_rows)
        if batch_size > n_fit:
            held = f" ({len(self.val_rows)} held out for validation)" if len(self.val_rows) else ""
            raise ValueError(f"train.batch_size {batch_size} exceeds the {n_fit} training "
                             f"rows{held}")  # fmt: skip
        self.n_train, self.n_test, self.seed = n_train, n_test, seed
        self.n_val = len(self.val_rows)
        self.selecting = self.n_val > 0  # rounds score validation rows; test comes last
        self.batch_size, self.steps = batch_size, steps
        self.eval_every = eval_every if 0 < eval_every < steps else steps
        self.eval_batch_size = eval_batch_size
        self.test_batches = math.ceil(n_test / eval_batch_size)
        # batches of one evaluation round: validation rows, or (no validation) the test split
        self.eval_batches = math.ceil(self.n_val / eval_batch_size) if self.selecting else (
            self.test_batches)  # fmt: skip
        self._block = self.eval_every + self.eval_batches
        full, self._tail = divmod(steps, self.eval_every)
        self._full_blocks = full
        rounds_end = full * self._block + (self._tail + self.eval_batches if self._tail else 0)
        self.test_start = rounds_end if self.selecting else rounds_end - self.test_batches
        self.stopped: int | None = None  # the round early stopping ended training after
        self.total = rounds_end + (self.test_batches if self.selecting else 0)
        self.steps_per_epoch = n_fit // batch_size
        self._identity = not self.selecting  # train batches index the train split directly

    @property
    def eval_rounds(self) -> int:
        """Evaluation rounds of the schedule as planned (validation rounds; without a
        validation split, rounds over the test split, the last one the test scoring)."""
        return self._full_blocks + (1 if self._tail else 0)

    @property
    def test_round(self) -> int:
        """The ``round`` of the test scoring's steps: the one after the last validation
        round (the round training stopped after, with early stopping)."""
        if not self.selecting:
            return self.eval_rounds - 1
        return self.eval_rounds if self.stopped is None else self.stopped + 1

    def round_end(self, rnd: int) -> int:
        """The seq of round ``rnd``'s last eval batch."""
        train_len = self.eval_every if rnd < self._full_blocks else self._tail
        return rnd * self._block + train_len + self.eval_batches - 1

    def steps_before(self, rnd: int) -> int:
        """The train steps the schedule runs before round ``rnd``: the "step" a round (and
        its best checkpoint) is known by."""
        return min((rnd + 1) * self.eval_every, self.steps)

    def stop_after(self, rnd: int) -> None:
        """Early stopping: training ends after validation round ``rnd``; the test batches
        follow it at once (the steps planned between are never used)."""
        if not self.selecting or not 0 <= rnd < self.eval_rounds:
            raise ValueError(f"cannot stop after round {rnd} of {self.eval_rounds}")
        self.stopped = rnd
        self.test_start = self.round_end(rnd) + 1
        self.total = self.test_start + self.test_batches

    def resume_at(self, seq: int, test_start: int | None) -> int:
        """Where a resumed process goes on: ``seq``, unless the run it resumes had reached
        its test batches (from ``test_start``) and this longer schedule trains there (more
        ``train.steps``, or early stopping turned off): then at ``test_start``, so no train
        step is lost to the earlier test scoring's seqs (which applied no gradient: none is
        applied twice). Every process decides it alike from its own checkpoint."""
        if self.selecting and test_start is not None and test_start < self.test_start:
            return min(seq, test_start)
        return seq

    def round_before(self, seq: int) -> int:
        """The last validation round that ends before step ``seq`` (-1: none)."""
        if not self.selecting:
            return -1
        if seq >= self.test_start:
            return self.eval_rounds - 1 if self.stopped is None else self.stopped
        return min(seq // self._block, self.eval_rounds) - 1

    def step(self, seq: int) -> Step:
        if not 0 <= seq < self.total:
            raise IndexError(f"seq {seq} outside the schedule [0, {self.total})")
        if self.selecting and seq >= self.test_start:
            j = seq - self.test_start
            return Step(seq, "eval", j, self.test_round, j == self.test_batches - 1, "test")
        block, offset = divmod(seq, self._block)
        train_len = self.eval_every if block < self._full_blocks else self._tail
        if offset < train_len:
            return Step(seq, "train", block * self.eval_every + offset, block, False)
        j = offset - train_len
        split = "val" if self.selecting else "test"
        return Step(seq, "eval", j, block, j == self.eval_batches - 1, split)

    def rows(self, step: Step) -> np.ndarray:
        """Row indices into the train split (train and val steps) or the test split."""
        if step.phase == "eval":
            start = step.index * self.eval_batch_size
            if step.split == "val":
                return self.val_rows[start : start + self.eval_batch_size]
            return np.arange(start, min(start + self.eval_batch_size, self.n_test))
        epoch, k = divmod(step.index, self.steps_per_epoch)
        perm = _permutation(len(self.fit_rows), self.seed, epoch)
        picked = perm[k * self.batch_size : (k + 1) * self.batch_size]
        return picked.copy() if self._identity else self.fit_rows[picked]

    def next_eval_seq(self, seq: int) -> int:
        """The first eval step at or after ``seq`` (``total`` when none is left)."""
        if seq >= self.test_start:
            return min(seq, self.total)
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
    ``index`` (times the group's ``lr_scale``, if it has one: ``models/optim.make_adam``)."""
    lr = base * lr_factor(index, train)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
        val_fraction=config.data.val_fraction,
    )
