"""The label holder's side of id alignment (docs/parties.md): answers an expert's ALIGN
request. No sockets: the worker moves the messages, and runs ``answer`` in a thread (psi
costs about 0.1 ms per id and thread, so the loop keeps its heartbeats meanwhile).

What the label holder learns: ``plain``, the expert's ids; ``psi``, only how many ids the
expert has (and, later, from the per-row masks of the steps, which labelled rows it holds).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from traci_ml import proto
from traci_ml.core.align import ids_from_tensors, positions, psi_domain
from traci_ml.core.errors import DataError

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
        # psi: H(x)^a in global order, made once (answers run one at a time: AlignDesk)
        self._labelled: np.ndarray | None = None

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
        from traci_ml.core import psi

        if self._labelled is None:
            self._key = psi.PsiKey.random()
            self._labelled = self._key.hash_blind(psi.canonical(self.ids), self.domain)
        return self._labelled


# ALIGN requests answered per expert: a burst of this many (restarts), then one per
# ALIGN_REFILL seconds (the expert asks again after 60 s): a flood costs the reducer nothing
ALIGN_BURST, ALIGN_REFILL = 4, 30.0


class AlignDesk:
    """The reducer's ALIGN traffic, without sockets: ``on_align`` and ``tick`` return the
    messages to send, ``reject(reason, detail)`` counts a refusal.

    Requests are answered in one background thread (psi arithmetic releases the GIL), so the
    reducer's loop keeps its heartbeats. At the start of a run the answers wait for one
    another (the *start barrier*): requests are collected until every expert has asked (or
    ``barrier_timeout`` seconds after the first, or training has begun in this life), then
    answered together, so no expert starts training while another still waits for its rows
    (it would be a straggler, masked after ``expert.step_timeout``). Later requests (an
    expert restarted) are answered as they come, within a budget per expert."""

    def __init__(self, holder: LabelHolder | None, names: list[str], labelled: int, *,
                 barrier_timeout: float, reject, source: str) -> None:  # noqa: ANN001  # fmt: skip
        self.holder, self.names, self.labelled = holder, names, labelled
        self.barrier_timeout, self.reject, self.source = barrier_timeout, reject, source
        self.overlap: dict[str, dict[str, Any]] = {}  # per expert name, as each reported
        self.pool: ThreadPoolExecutor | None = None
        self.jobs: dict[int, Future] = {}
        self.waiting: dict[int, proto.Align] = {}  # requests held by the start barrier
        self.batch: set[int] = set()  # experts answered together when the barrier opens
        self.held_answers: list[proto.Align] = []
        self.barrier_open = holder is None
        self.first_request: float | None = None
        self.budget: dict[int, tuple[float, float]] = {}  # expert -> (tokens, at)

    def on_align(self, msg: proto.Align, now: float) -> list[proto.Align]:
        eid = msg.expert_id
        if not 0 <= eid < len(self.names):
            return self._refuse("bad_field", f"ALIGN from expert {eid} of {len(self.names)}")
        if msg.stage == "held":
            return self._held(eid, msg.counts)
        if msg.stage not in proto.ALIGN_EXPERT_STAGES:
            return self._refuse("unexpected_kind", f"ALIGN {msg.stage} from an expert")
        if self.holder is None:
            return [proto.Align(eid, "error", f"data.source is {self.source!r}: rows align by "
                                "number, there is nothing to align")]  # fmt: skip
        if eid in self.jobs or eid in self.waiting:  # the same request again, worked on
            return self._refuse("align_throttled", f"expert {eid} is being aligned already")
        tokens, since = self.budget.get(eid, (ALIGN_BURST, now))
        tokens = min(ALIGN_BURST, tokens + (now - since) / ALIGN_REFILL)
        if tokens < 1:
            self.budget[eid] = (tokens, now)
            return self._refuse("align_throttled", f"expert {eid} asked to align again too soon")
        self.budget[eid] = (tokens - 1, now)
        if self.barrier_open:
            self._submit(msg)
            return []
        self.waiting[eid] = msg
        self.first_request = self.first_request if self.first_request is not None else now
        if len(self.waiting) == len(self.names):
            self.open_barrier("every expert asked")
        return []

    def open_barrier(self, why: str) -> None:
        """Answer the requests held so far, together (and any later one as it comes)."""
        if self.barrier_open:
            return
        self.barrier_open = True
        log.info("reducer: aligning %d of %d experts together (%s)", len(self.waiting),
                 len(self.names), why)  # fmt: skip
        self.batch = set(self.waiting)
        for msg in self.waiting.values():
            self._submit(msg)
        self.waiting = {}

    def tick(self, now: float) -> list[proto.Align]:
        """Answers that are ready (the barrier's batch only once all of it is)."""
        if (
            not self.barrier_open
            and self.first_request is not None
            and now - self.first_request > self.barrier_timeout
        ):
            self.open_barrier(f"{self.barrier_timeout:.0f}s after the first request")
        out: list[proto.Align] = []
        for eid, job in list(self.jobs.items()):
            if not job.done():
                continue
            del self.jobs[eid]
            try:
                reply = job.result()
            except Exception as exc:  # a bug answers the expert, never ends the run
                log.exception("reducer: alignment of expert %d failed", eid)
                reply = proto.Align(eid, "error", f"internal: {exc!r}"[:1000])
            if eid in self.batch:
                self.held_answers.append(reply)
            else:
                out.append(reply)
        if self.batch and not any(eid in self.jobs for eid in self.batch):
            out.extend(self.held_answers)
            self.batch, self.held_answers = set(), []
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, msg: proto.Align) -> None:
        assert self.holder is not None
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="align")
        self.jobs[msg.expert_id] = self.pool.submit(self.holder.answer, msg)

    def _held(self, eid: int, counts: tuple[int, ...]) -> list[proto.Align]:
        if len(counts) < 3 or min(counts[:3]) < 0 or counts[0] + counts[1] > self.labelled:
            return self._refuse("bad_field", f"ALIGN held counts {counts}")
        held_train, held_test, rows = counts[:3]
        ratio = (held_train + held_test) / max(self.labelled, 1)
        self.overlap[self.names[eid]] = {
            "rows": rows, "held_train": held_train, "held_test": held_test,
            "labelled": self.labelled, "overlap": ratio,
        }  # fmt: skip
        log.info("reducer: expert %d holds %d + %d of %d labelled rows (%.1f%%)",
                 eid, held_train, held_test, self.labelled, 100 * ratio)  # fmt: skip
        return []

    def _refuse(self, reason: str, detail: str) -> list[proto.Align]:
        self.reject(reason, detail)
        return []
