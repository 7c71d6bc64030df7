"""An expert's side of id alignment (docs/parties.md): the ALIGN request it sends and what
it makes of the answer. No sockets: the worker moves the messages.

``plain``: the request carries the expert's ids (int64, or a msgpack list of str); the
answer, for each of them, its global row or -1. ``psi``: the request carries the ids hashed
to the group and blinded with a key that never leaves this process (``traci_ml.core.psi``); the
answer carries those points blinded again by the label holder and the label holder's own
ids, hashed and blinded by it; the expert blinds the latter with its key and matches.
"""

from __future__ import annotations

import numpy as np

from traci_ml import proto
from traci_ml.core.align import RowMap, ids_tensors, psi_domain
from traci_ml.core.errors import DataError


class Aligner:
    """Builds this expert's ALIGN request and turns the answer into its ``RowMap``."""

    def __init__(self, expert_id: int, ids: np.ndarray, id_type: str, mode: str, run_id: str):
        self.expert_id, self.ids, self.id_type, self.mode = expert_id, ids, id_type, mode
        self.domain = psi_domain(run_id)
        self._key = None

    def request(self) -> proto.Align:
        """The request (psi: hashes and blinds every id: about 0.1 ms per id and thread)."""
        if self.mode == "plain":
            tensors = ids_tensors(self.ids)
        else:
            from traci_ml.core import psi

            self._key = psi.PsiKey.random()
            points = self._key.hash_blind(psi.canonical(self.ids), self.domain)
            tensors = (proto.Tensor.from_numpy(points),)
        return proto.Align(self.expert_id, self.mode, self.id_type, (len(self.ids),), tensors)

    def rows(self, answer: proto.Align) -> RowMap:
        """The row map from the label holder's answer; DataError when it does not fit."""
        if len(answer.counts) < 2 or min(answer.counts[:2]) < 0:
            raise DataError(f"alignment answer lacks the split sizes: counts {answer.counts}")
        n_train, n_test = answer.counts[:2]
        n = len(self.ids)
        if self.mode == "plain":
            if len(answer.tensors) != 1:
                raise DataError("plain alignment answer carries one tensor")
            pos = answer.tensors[0]
            if pos.dtype != "int64" or pos.shape != (n,):
                raise DataError(f"plain alignment answer is {pos.dtype}{list(pos.shape)}, "
                                f"want int64[{n}]")  # fmt: skip
            return RowMap.from_positions(pos.numpy(), n_train, n_test)
        from traci_ml.core import psi

        if len(answer.tensors) != 2 or self._key is None:
            raise DataError("psi alignment answer carries two tensors (after a psi request)")
        mine, theirs = answer.tensors
        want = [(n, 32), (n_train + n_test, 32)]
        got = [mine.shape, theirs.shape]
        if mine.dtype != "uint8" or theirs.dtype != "uint8" or got != want:
            raise DataError(f"psi alignment answer shapes {got}, want {want}")
        try:
            labelled = self._key.blind(theirs.numpy())  # H(x)^ab for the label rows, in order
            pos = psi.match(mine.numpy(), labelled)
        except ValueError as exc:  # not group elements, or repeated ones: a broken answer
            raise DataError(f"psi alignment answer: {exc}") from None
        self._key = None  # one alignment, one key
        return RowMap.from_positions(pos, n_train, n_test)
