"""The broker's front door: served prediction requests, dynamic batching and the serve join.

No sockets here (like ``join.py``): the service hands in every decoded message on the client
socket (QUERY), every QEMB from an expert and every QOUT from the reducer, with the live peers
the ``PeerRegistry`` knows, and sends what the returned ``Outcome`` says. The flow::

    QUERY (client) -> group by column list (<= max_batch_rows rows, <= max_wait_ms)
        -> one batched QUERY to every live expert, holding only that expert's view columns
        -> QEMB per expert (or timeout: masked)
        -> QBATCH to the reducer -> QOUT -> one REPLY per request, its own rows

A QUERY by id (``ids``, no rows) groups with other requests by id of the same id type (int
or str, never mixed); its ids are listed once per batched query (two requests asking for
the same id share its row), and each expert looks them up in its own table. The row bitmaps
of the QEMBs (the rows an expert holds) go to the reducer in QBATCH.rows and come back in
each REPLY, cut to that request's rows.

Serving is a stream of its own: nothing here touches training steps, their ``seq``, windows
or accounting. Every request gets exactly one REPLY (ok, or a status naming the cause); the
state is bounded by ``serve.max_inflight`` queries and ``serve.max_queued`` requests.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from traci_ml.core.config import Config
from traci_ml.core.data import view_specs
from traci_ml.proto import (
    SERVE_OK,
    QBatch,
    QEmb,
    QOut,
    Query,
    Reply,
    Tensor,
    pack_rows,
    unpack_rows,
)
from traci_ml.proto.rows import ids_bytes
from traci_ml.proto.wire import MAX_IDS_BYTES
from traci_ml.services.broker.outcomes import EXPERT, REDUCER, Outcome, Send, batch_fits

CLIENT = "client"  # the front door socket, as named in Send.socket
# How a request ended: traci_broker_serve_requests_total{outcome}.
OUTCOMES = (
    SERVE_OK,
    "bad_request",  # malformed message on the front door, or not a QUERY
    "oversize",  # more rows than serve.max_request_rows
    "missing_columns",  # the request lacks a column some expert's view reads
    "no_reducer",  # no reducer registered (or it went away before answering)
    "no_expert",  # no live expert (or the run has not started)
    "busy",  # serve.max_queued requests already waiting
    "timeout",  # no expert, or the reducer, answered within serve.timeout
    "expert_error",  # every expert that answered refused the query
    "reducer_error",  # the reducer refused the query or answered with the wrong shape
    "shutdown",  # the broker stopped before answering
)
DETAIL_MAX = 400  # characters of a reply's detail


@dataclass(slots=True)
class Request:
    routing_id: bytes  # the client's
    qid: int  # the client's id, echoed in the REPLY
    tensor: Tensor | None  # [R, F] float32 raw feature rows; None for a request by id
    arrival: float
    rows: int = 0  # R
    at: slice | np.ndarray | None = None  # its rows in the batched query (ids: gathered)
    attention: bool = False  # QUERY.attention: its REPLY carries the rows' attention


@dataclass(slots=True)
class Group:
    """Requests with one column list (or by ids of one type), waiting to travel together
    as one query."""

    columns: tuple[str, ...]
    opened: float
    requests: list[Request] = field(default_factory=list)
    rows: int = 0
    ids: dict[Any, int] | None = None  # by id: each id -> its row in the query, in order
    id_bytes: int = 0  # by id: the packed size of the requests' ids (an upper bound)


def _group_key(msg: Query) -> tuple:
    """Requests that may travel together: one column list, or ids of one type. No column
    name is None, so the two kinds of key never meet."""
    return (None, type(msg.ids[0]).__name__) if msg.ids else msg.columns


@dataclass(slots=True)
class InQuery:
    """A batched query at the experts (``stage`` "experts"), then at the reducer."""

    qid: int
    requests: list[Request]
    rows: int
    expected: dict[int, bytes]  # experts asked and not yet answered: id -> routing id
    deadline: float
    tokens: dict[int, Tensor] = field(default_factory=dict)  # answers, by expert id
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (status, detail)
    stage: str = "experts"
    reducer: bytes | None = None
    launched: float = 0.0  # sent to the experts
    joined: float = 0.0  # the last expert answered (or was given up): sent to the reducer
    expert_us: int = 0  # the compute the last expert to answer reported (QEMB.compute_us)
    present: tuple[int, ...] = ()  # expert ids whose tokens went to the reducer
    bitmaps: dict[int, bytes] = field(default_factory=dict)  # QEMB.rows by expert id (not b"")
    present_rows: tuple[bytes, ...] = ()  # QBATCH.rows: one per present expert, or ()


Peers = tuple[dict[int, bytes], "bytes | None"]  # live experts (id -> routing id), reducer


class ServeDesk:
    """All front-door state: waiting groups, queries in flight, and their replies."""

    def __init__(
        self,
        *,
        view_names: list[str],
        view_columns: list[tuple[str, ...]],
        embed_dim: int,
        dtype: str,
        max_batch_rows: int = 256,
        max_wait: float = 0.002,
        max_request_rows: int = 4096,
        timeout: float = 2.0,
        max_inflight: int = 32,
        max_queued: int = 1024,
        metrics: Any = None,  # metrics.ServeMetrics, or None
        clock: Callable[[], float] = time.monotonic,  # when a reply leaves (hop "reply")
    ) -> None:
        self.n_experts = len(view_names)
        self.view_names, self.view_columns = view_names, view_columns
        self.embed_dim, self.dtype = embed_dim, dtype
        self.max_batch_rows, self.max_wait = max_batch_rows, max_wait
        self.max_request_rows, self.timeout = max_request_rows, timeout
        self.max_inflight, self.max_queued = max_inflight, max_queued
        self.metrics, self.clock = metrics, clock
        self._groups: dict[tuple, Group] = {}  # filling, by column list or id type
        self._ready: deque[Group] = deque()  # closed, waiting for an in-flight slot
        self._queries: dict[int, InQuery] = {}
        self._queued = 0  # requests in _groups and _ready
        self._next_qid = 0
        # column list -> (what it lacks, "" for nothing; each view's pick of it): _plan
        self._plans: dict[tuple[str, ...], tuple[str, list[np.ndarray | None]]] = {}

    @classmethod
    def from_config(cls, config: Config, *, metrics: Any = None) -> ServeDesk:
        views, serve = view_specs(config.data), config.serve
        return cls(
            view_names=[v.name for v in views],
            view_columns=[tuple(v.columns) for v in views],
            embed_dim=config.embed_dim,
            dtype=config.expert.dtype,
            max_batch_rows=serve.max_batch_rows,
            max_wait=serve.max_wait_ms / 1000.0,
            max_request_rows=serve.max_request_rows,
            timeout=serve.timeout,
            max_inflight=serve.max_inflight,
            max_queued=serve.max_queued,
            metrics=metrics,
        )

    # ---- views ---------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def inflight(self) -> int:
        return len(self._queries)

    def next_deadline(self) -> float:
        """When ``tick`` next has work: a group's wait ends or a query's timeout."""
        soonest = math.inf
        for group in self._groups.values():
            soonest = min(soonest, group.opened + self.max_wait)
        for query in self._queries.values():
            soonest = min(soonest, query.deadline)
        return soonest

    # ---- the front door ------------------------------------------------------------------

    def request(self, routing_id: bytes, msg: Query, now: float, peers: Peers) -> Outcome:
        out = Outcome()
        experts, reducer = peers
        ids = msg.ids
        rows = len(ids) if ids else msg.tensors[0].shape[0]
        id_bytes = ids_bytes(ids) if ids else 0  # the batched query's header must hold them
        refusal = None
        if rows > self.max_request_rows:
            refusal = ("oversize", f"{rows} rows > serve.max_request_rows {self.max_request_rows}")
        elif id_bytes > MAX_IDS_BYTES:
            refusal = ("oversize", f"the ids take {id_bytes} bytes > {MAX_IDS_BYTES} for one query")
        elif not ids and (missing := self._missing(msg.columns)):
            refusal = ("missing_columns", missing)
        elif reducer is None:
            refusal = ("no_reducer", "no reducer is registered with the broker")
        elif not experts:
            refusal = ("no_expert", "no expert is live (has the run started?)")
        elif self._queued >= self.max_queued:
            refusal = ("busy", f"{self._queued} requests already waiting (serve.max_queued)")
        if refusal is not None:
            self._reply_error(out, routing_id, msg.qid, now, *refusal)
            return out
        key = _group_key(msg)
        group = self._groups.get(key)
        if group is not None and (
            group.rows + self._new_rows(group, msg) > self.max_batch_rows
            or group.id_bytes + id_bytes > MAX_IDS_BYTES
        ):
            self._close_group(key)  # it is full: this request opens the next one
            group = None
        if group is None:
            group = self._groups[key] = Group(msg.columns, now, ids={} if ids else None)
        request = Request(routing_id, msg.qid, None if ids else msg.tensors[0], now, rows,
                          attention=msg.attention)  # fmt: skip
        if group.ids is not None:  # each id once per query; the request gathers its rows
            index = group.ids
            request.at = np.fromiter((index.setdefault(i, len(index)) for i in ids), np.intp,
                                     count=rows)  # fmt: skip
            group.rows, group.id_bytes = len(index), group.id_bytes + id_bytes
        else:
            request.at = slice(group.rows, group.rows + rows)
            group.rows += rows
        group.requests.append(request)
        self._queued += 1
        # The window holds a request only while the experts are busy with another query:
        # then more requests are arriving and will ride along. An idle cluster answers at once.
        if group.rows >= self.max_batch_rows or self.max_wait <= 0 or not self._experts_busy():
            self._close_group(key)
        self._launch(now, peers, out)
        return out

    def _experts_busy(self) -> bool:
        """Some batched query is at the experts (asked, not yet all answered)."""
        return any(q.stage == "experts" for q in self._queries.values())

    def _experts_free(self) -> None:
        """A query left the experts: if none is left there, the groups waiting for them
        leave now (their window was only for company while the experts were busy)."""
        if self._groups and not self._experts_busy():
            for key in list(self._groups):
                self._close_group(key)

    @staticmethod
    def _new_rows(group: Group, msg: Query) -> int:
        """Rows ``msg`` would add to ``group``: its ids not there yet, or all its rows."""
        if group.ids is None:
            return msg.tensors[0].shape[0]
        return sum(1 for i in msg.ids if i not in group.ids)

    def malformed(self, routing_id: bytes, reason: str, detail: str, now: float) -> Outcome:
        """A message on the front door that is not a valid QUERY: answered, never served."""
        out = Outcome()
        self._reply_error(out, routing_id, -1, now, "bad_request", f"{reason}: {detail}")
        return out

    def _missing(self, columns: tuple[str, ...]) -> str:
        """What a column list lacks for some expert's view ("": nothing)."""
        return self._plan(columns)[0]

    def _plan(self, columns: tuple[str, ...]) -> tuple[str, list[np.ndarray | None]]:
        """What ``columns`` lacks for some view ("": nothing) and, when nothing, per view the
        index of each of its columns in ``columns`` (None: the view is ``columns`` as they
        are; ``_view_queries``); remembered per column list (a client repeats its own)."""
        found = self._plans.get(columns)
        if found is None:
            lacking, picks = self._lacking(columns), []
            if not lacking:
                where = {c: i for i, c in enumerate(columns)}
                picks = [None if view == columns else np.array([where[c] for c in view], np.intp)
                         for view in self.view_columns]  # fmt: skip
            if len(self._plans) >= 64:
                self._plans.pop(next(iter(self._plans)))
            found = self._plans[columns] = (lacking, picks)
        return found

    def _lacking(self, columns: tuple[str, ...]) -> str:
        have = set(columns)
        for i, view in enumerate(self.view_columns):
            lacking = [c for c in view if c not in have]
            if lacking:
                more = f" (+{len(lacking) - 10} more)" if len(lacking) > 10 else ""
                name = self.view_names[i]
                return (
                    f"expert {i} ({name}) reads column(s) the request lacks: "
                    + ", ".join(lacking[:10])
                    + more
                )
        return ""

    # ---- batching ------------------------------------------------------------------------

    def _close_group(self, key: tuple) -> None:
        self._ready.append(self._groups.pop(key))

    def _launch(self, now: float, peers: Peers, out: Outcome) -> None:
        """Start ready groups as queries while fewer than ``max_inflight`` are out."""
        experts, reducer = peers
        while self._ready and len(self._queries) < self.max_inflight:
            group = self._ready.popleft()
            self._queued -= len(group.requests)
            if reducer is None or not experts:
                status = "no_reducer" if reducer is None else "no_expert"
                for req in group.requests:
                    self._reply_error(out, req.routing_id, req.qid, now, status, "peer lost")
                continue
            qid, self._next_qid = self._next_qid, self._next_qid + 1
            # only experts with a view (the registry admits no other id; never a guess)
            asked = {e: rid for e, rid in experts.items() if e < self.n_experts}
            query = InQuery(qid, group.requests, group.rows, asked, now + self.timeout,
                            launched=now)  # fmt: skip
            self._queries[qid] = query
            if group.ids is not None:  # by id: no rows, each expert looks them up
                message = Query(qid, (), (), tuple(group.ids))
                out.sends.extend(Send(EXPERT, rid, message) for rid in asked.values())
            else:  # each expert gets its own view's columns, and no other
                out.sends.extend(self._view_queries(qid, group, asked))
            if self.metrics is not None:
                self.metrics.batched(group.rows, len(group.requests))

    def _view_queries(self, qid: int, group: Group, experts: dict[int, bytes]) -> list[Send]:
        """One QUERY per expert holding only the columns of its view, in the view's order
        (need to know: a party never sees another party's features of a served row, and
        each expert decodes its own names only). A view that is the whole request gets the
        request's own tensor (a lone request's frame, zero-copy)."""
        rows = self._rows(group)
        picks = self._plan(group.columns)[1]  # the request passed _missing: every view's
        table = rows.numpy()  # a view of the frame, no copy
        sends = []
        for eid, rid in experts.items():  # ids below n_experts: each has a view
            pick = picks[eid]
            mine = rows if pick is None else Tensor.from_numpy(table[:, pick])
            sends.append(Send(EXPERT, rid, Query(qid, self.view_columns[eid], (mine,))))
        return sends

    @staticmethod
    def _rows(group: Group) -> Tensor:
        """The group's rows as one tensor: a lone request's own frame (zero-copy)."""
        tensors = [r.tensor for r in group.requests if r.tensor is not None]
        if len(tensors) == 1:
            return tensors[0]
        return Tensor.from_numpy(np.concatenate([t.numpy() for t in tensors]))

    # ---- answers -------------------------------------------------------------------------

    def qemb(self, routing_id: bytes, msg: QEmb, now: float, peers: Peers) -> Outcome:
        out = Outcome()
        query = self._queries.get(msg.qid)
        if query is None or query.stage != "experts":
            return out.reject("unknown_query", f"QEMB for query {msg.qid}, not at the experts")
        if query.expected.get(msg.expert_id) != routing_id:
            return out.reject("unknown_query", f"QEMB from expert {msg.expert_id}: not asked")
        del query.expected[msg.expert_id]
        query.expert_us = max(msg.compute_us, 0)  # the last to answer sets the experts' pace
        if msg.status != SERVE_OK:
            query.failures[msg.expert_id] = (msg.status, msg.detail)
        else:
            tensor = msg.tensors[0]
            if tensor.shape != (query.rows, self.embed_dim) or tensor.dtype != self.dtype:
                want = f"{self.dtype}[{query.rows}, {self.embed_dim}]"
                query.failures[msg.expert_id] = ("conflict", f"{tensor.dtype}{tensor.shape}")
                out.reject("conflict", f"QEMB {tensor.dtype}{list(tensor.shape)}, want {want}")
            else:
                query.tokens[msg.expert_id] = tensor
                if msg.rows:  # checked against the tensor's rows by decoding
                    query.bitmaps[msg.expert_id] = msg.rows
        if not query.expected:
            self._to_reducer(query, now, peers, out)
            self._experts_free()
            self._launch(now, peers, out)
        return out

    def qout(self, routing_id: bytes, msg: QOut, now: float, peers: Peers) -> Outcome:
        out = Outcome()
        query = self._queries.get(msg.qid)
        if query is None or query.stage != "reducer" or query.reducer != routing_id:
            return out.reject("unknown_query", f"QOUT for query {msg.qid}, not at the reducer")
        del self._queries[msg.qid]
        if msg.status != SERVE_OK:
            self._fail(query, now, out, "reducer_error", f"reducer: {msg.status}: {msg.detail}")
        elif detail := _shape_problem(query, msg):
            self._fail(query, now, out, "reducer_error", detail)
            out.reject("conflict", detail)
        else:
            self._answer(query, msg, now, out)
        self._launch(now, peers, out)
        return out

    def _to_reducer(self, query: InQuery, now: float, peers: Peers, out: Outcome) -> None:
        """Every asked expert answered or was given up: mask the rest, ask the reducer."""
        missing = [e for e in query.failures if query.failures[e][0] == "missing_columns"]
        if missing:
            del self._queries[query.qid]
            self._fail(query, now, out, "missing_columns", query.failures[missing[0]][1])
            return
        if not query.tokens:
            del self._queries[query.qid]
            if query.failures:
                why = "; ".join(f"expert {e}: {s}: {d}" for e, (s, d) in query.failures.items())
                self._fail(query, now, out, "expert_error", why)
            else:
                self._fail(query, now, out, "timeout", f"no expert answered in {self.timeout}s")
            return
        reducer = peers[1]
        if reducer is None:
            del self._queries[query.qid]
            self._fail(query, now, out, "no_reducer", "the reducer went away")
            return
        ids = sorted(query.tokens)
        if self.metrics is not None:
            for eid in range(self.n_experts):
                if eid not in query.tokens:
                    self.metrics.masked_expert(eid)
        present = tuple(i in query.tokens for i in range(self.n_experts))
        rows = tuple(query.bitmaps.get(i, b"") for i in ids) if query.bitmaps else ()
        if rows and not batch_fits(self.n_experts, len(ids), rows):
            del self._queries[query.qid]
            detail = f"the row bitmaps of {query.rows} rows x {len(ids)} experts fit no header"
            self._fail(query, now, out, "oversize", detail)
            return
        attention = any(r.attention for r in query.requests)
        batch = QBatch(query.qid, present, tuple(query.tokens[i] for i in ids), rows, attention)
        out.sends.append(Send(REDUCER, reducer, batch))
        query.stage, query.reducer, query.present = "reducer", reducer, tuple(ids)
        query.joined = now
        query.deadline, query.tokens, query.present_rows = now + self.timeout, {}, rows

    def _answer(self, query: InQuery, msg: QOut, now: float, out: Outcome) -> None:
        """Split the reducer's outputs back into one REPLY per request."""
        outputs = msg.tensors[0].numpy()
        att = msg.tensors[1].numpy() if len(msg.tensors) > 1 else None  # [rows, 1 + present]
        names = tuple(self.view_names[i] for i in query.present)
        masks = None  # (experts, rows): who took part in which row of the batched query
        if query.present_rows:
            masks = np.stack([unpack_rows(bits, query.rows) for bits in query.present_rows])
        # the hops every request of the query shares (SERVE_HOPS between "queue" and "reply")
        shared = (_us(query.joined - query.launched), query.expert_us,
                  _us(now - query.joined), max(msg.compute_us, 0))  # fmt: skip
        for req in query.requests:
            mine: tuple[Tensor, ...] = (Tensor.from_numpy(outputs[req.at]),)
            if req.attention and att is not None:  # only to whom asked: the others' unchanged
                mine += (Tensor.from_numpy(att[req.at]),)
            rows: tuple[bytes, ...] = ()
            if masks is not None:
                rows = tuple(pack_rows(mask) for mask in masks[:, req.at])
                rows = rows if any(rows) else ()
            hops = (_us(query.launched - req.arrival), *shared, _us(self.clock() - now))
            reply = Reply(req.qid, SERVE_OK, "", msg.task, msg.classes, query.present, names,
                          query.rows, mine, rows, hops)  # fmt: skip
            out.sends.append(Send(CLIENT, req.routing_id, reply))
            self._count(SERVE_OK, now - req.arrival, hops)

    # ---- time ----------------------------------------------------------------------------

    def tick(self, now: float, peers: Peers) -> Outcome:
        """Close groups whose wait is over, mask experts that are gone or late, give up
        queries the reducer did not answer in time, and launch what that frees."""
        out = Outcome()
        for columns in [c for c, g in self._groups.items() if now >= g.opened + self.max_wait]:
            self._close_group(columns)
        experts, reducer = peers
        for query in list(self._queries.values()):
            if query.stage == "experts":
                late = now >= query.deadline
                gone = [e for e, rid in query.expected.items() if late or experts.get(e) != rid]
                for eid in gone:
                    del query.expected[eid]
                if not query.expected:
                    self._to_reducer(query, now, peers, out)
            elif now >= query.deadline or query.reducer != reducer:
                del self._queries[query.qid]
                gone = query.reducer != reducer
                status = "no_reducer" if gone else "timeout"
                why = "the reducer went away" if gone else f"reducer silent for {self.timeout}s"
                self._fail(query, now, out, status, why)
        self._experts_free()
        self._launch(now, peers, out)
        if self.metrics is not None:
            self.metrics.state(queued=self._queued, inflight=len(self._queries))
        return out

    def close(self, now: float) -> Outcome:
        """The broker is stopping: every request still waiting gets ``shutdown``."""
        out = Outcome()
        pending = [r for g in (*self._groups.values(), *self._ready) for r in g.requests]
        pending += [r for q in self._queries.values() for r in q.requests]
        for req in pending:
            self._reply_error(out, req.routing_id, req.qid, now, "shutdown", "broker stopping")
        self._groups, self._ready, self._queries, self._queued = {}, deque(), {}, 0
        return out

    # ---- replies -------------------------------------------------------------------------

    def _fail(self, query: InQuery, now: float, out: Outcome, status: str, detail: str) -> None:
        for req in query.requests:
            self._reply_error(out, req.routing_id, req.qid, now, status, detail)

    def _reply_error(
        self, out: Outcome, routing_id: bytes, qid: int, now: float, status: str, detail: str
    ) -> None:
        reply = Reply(qid, status, detail[:DETAIL_MAX])
        out.sends.append(Send(CLIENT, routing_id, reply))
        self._count(status, None)

    def _count(
        self, outcome: str, latency: float | None, hops: tuple[int, ...] | None = None
    ) -> None:
        if self.metrics is not None:
            self.metrics.answered(outcome, latency, hops)


def _us(seconds: float) -> int:
    """Microseconds, never negative (REPLY.hops)."""
    return max(0, round(seconds * 1e6))


def _shape_problem(query: InQuery, msg: QOut) -> str:
    """What is wrong with an ok QOUT's shapes ("": nothing): its outputs must have the
    query's rows, and its attention, when a request asked for it, be ``[rows, 1 + present
    experts]``."""
    if msg.tensors[0].shape[0] != query.rows:
        return f"reducer answered {msg.tensors[0].shape[0]} rows for {query.rows}"
    if not any(r.attention for r in query.requests):
        return ""
    want = (query.rows, 1 + len(query.present))
    got = msg.tensors[1].shape if len(msg.tensors) > 1 else None
    return "" if got == want else f"reducer attention {got}, want {list(want)}"
