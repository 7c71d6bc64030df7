"""An expert's books: the steps in flight, the accounts that balance across restarts, and the
applied ledger that proves "at most once" (one line per gradient the model holds)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from traci_ml.core.schedule import Step

log = logging.getLogger(__name__)


@dataclass(slots=True)
class InFlight:
    step: Step
    rows: torch.Tensor  # (B,) this expert's own rows (an absent row's: 0, never read)
    held: torch.Tensor | None  # positions (in the batch) of the rows it holds; None: all
    sent_at: float  # monotonic
    applied_at_send: int  # optimizer steps taken when sent (for staleness)

    @property
    def held_rows(self) -> torch.Tensor:
        """The own rows this expert holds (what its online net sees for this step)."""
        return self.rows if self.held is None else self.rows[self.held]


@dataclass(slots=True)
class Accounts:
    """sent == applied + acked + dropped + in flight, at every moment, across restarts too:
    a restore counts the steps the checkpoint had in flight as dropped (``lost_in_restart``).
    ``rolled_back``: gradients applied after the last checkpoint by a life that then died,
    lost with it (the model went back to the checkpoint, the ledger was cut to match); they
    are not in ``applied``, which is what the current model holds."""

    sent: int = 0
    applied: int = 0  # train gradients applied (and held by the model)
    acked: int = 0  # eval steps acknowledged
    dropped: int = 0
    rejected: int = 0
    rolled_back: int = 0
    skipped: int = 0  # train steps never sent: skipped ahead after a DROP(late) (not in sent)


class Ledger:
    """``experts/expert-<i>.applied``: append-only, line-buffered (a SIGKILL loses nothing
    written), one ``seq`` per applied gradient, across restarts."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        self._fh: TextIO | None = None

    def open(self, at: int | None) -> list[bytes]:
        """Open for appending, first cut back to ``at`` bytes (the length that agrees with
        the model: the checkpoint's, 0 for fresh nets; None: leave the file as it is). Lines
        a dead life appended after its last checkpoint name gradients the restored model
        never saw: they are cut and returned (the caller counts them rolled back)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut: list[bytes] = []
        size = self.path.stat().st_size if self.path.exists() else 0
        if at is not None and size < at:  # not ours to invent lines: say so, append on
            log.error("%s: ledger %s is %d bytes, shorter than the checkpoint's %d; left as it is",
                      self.name, self.path, size, at)  # fmt: skip
        elif at is not None and size > at:
            with self.path.open("rb") as fh:
                fh.seek(at)
                cut = fh.read().split()
            os.truncate(self.path, at)
        self._fh = self.path.open("a", buffering=1)
        if cut:
            log.warning("%s: %d applied gradients rolled back with the restore (seqs %s..%s), "
                        "cut from the ledger", self.name, len(cut), cut[0].decode(),
                        cut[-1].decode())  # fmt: skip
        return cut

    @property
    def is_open(self) -> bool:
        return self._fh is not None

    def write(self, seq: int) -> None:
        if self._fh is not None:
            self._fh.write(f"{seq}\n")

    def size(self) -> int | None:
        """Its length in bytes now (every line flushed); None while it is not open."""
        if self._fh is None:
            return None
        self._fh.flush()  # line-buffered: a no-op, unless a write is half done
        return os.fstat(self._fh.fileno()).st_size

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
