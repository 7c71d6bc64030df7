"""The label holder's side of id alignment (docs/parties.md): answers an expert's ALIGN
request. No sockets: the worker moves the messages, and runs ``answer`` in a thread (psi
costs about 0.1 ms per id and thread, so the loop keeps its heartbeats meanwhile).

What the label holder learns: ``plain``, the expert's ids; ``psi``, only how many ids the
expert has (and, later, from the per-row masks of the steps, which labelled rows it holds).
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from traci_ml import proto
from traci_ml.align import ids_from_tensors, positions, psi_domain
from traci_ml.errors import DataError

log = logging.getLogger(__name__)
MAX_IDS = 1 << 26  # ids in one request (64 Mi): beyond it, refused before any work


class LabelHolder:
    """Answers ALIGN requests against the label holder's rows in global order."""

    def __init__(self, ids: np.ndarray, id_type: str, n_train: int, n_test: int, *,
                 mode: str, run_id: str, where: str) -> None:  # fmt: skip
        self.ids, self.id_type, self.mode = ids, id_type, mode
        self.n_train, self.n_test = n_train, n_test
        self.domain = psi_domain(run_id)
        self.where = where  # "labels.csv (id column 'id')", for messages
        self._key = None
        self._labelled: np.ndarray | None = None  # psi: H(x)^a in global order, made once
        self._lock = threading.Lock()

    def answer(self, msg: proto.Align) -> proto.Align:
        """The answer to ``msg``: positions (plain), blinded points (psi), or an error."""
        try:
            return self._answer(msg)
        except DataError as exc:
            log.warning("reducer: alignment of expert %d refused: %s", msg.expert_id, exc)
            return proto.Align(msg.expert_id, "error", str(exc)[:1000])

    def _answer(self, msg: proto.Align) -> proto.Align:
        if msg.stage != self.mode:  # never a downgrade: psi runs take no plain id list
            raise DataError(f"this run aligns ids with {self.mode!r} (data.align); a "
                            f"{msg.stage!r} request is refused")  # fmt: skip
        if msg.detail != self.id_type:
            raise DataError(
                f"expert {msg.expert_id} holds {msg.detail} ids but {self.where} "
                f"holds {self.id_type} ids: give every party the same id type"
            )
        counts = (self.n_train, self.n_test)
        if not msg.tensors or (msg.tensors[0].shape and msg.tensors[0].shape[0] > MAX_IDS + 1):
            raise DataError(f"an alignment request carries its ids (at most {MAX_IDS})")
        if self.mode == "plain":
            own = ids_from_tensors(msg.tensors, self.id_type)
            pos = positions(self.ids, own)
            return proto.Align(msg.expert_id, "answer", "", counts, (proto.Tensor.from_numpy(pos),))
        tensor = msg.tensors[0]
        if (
            len(msg.tensors) != 1
            or tensor.dtype != "uint8"
            or len(tensor.shape) != 2
            or tensor.shape[1] != 32
        ):
            specs = [f"{t.dtype}{list(t.shape)}" for t in msg.tensors]
            raise DataError(f"psi request is {specs}, want one uint8[n, 32]")
        labelled = self._labelled_points()
        try:
            theirs = self._key.blind(tensor.numpy())
        except ValueError as exc:  # not group elements: a broken or hostile request
            raise DataError(f"psi request: {exc}") from None
        tensors = (proto.Tensor.from_numpy(theirs), proto.Tensor.from_numpy(labelled))
        return proto.Align(msg.expert_id, "answer", "", counts, tensors)

    def _labelled_points(self) -> np.ndarray:
        from traci_ml import psi

        with self._lock:
            if self._labelled is None:
                self._key = psi.PsiKey.random()
                self._labelled = self._key.hash_blind(psi.canonical(self.ids), self.domain)
            return self._labelled
