"""Served prediction from Python: send feature rows to a running cluster's front door.

    from traci_ml import Client

    with Client("tcp://127.0.0.1:5557") as client:
        pred = client.predict(rows, columns)     # rows: (R, F) raw feature values
    pred.outputs        # (R, C) class probabilities, or (R, 1) values in the label's units
    pred.labels         # classification: the most probable class name per row
    pred.experts        # ids of the experts whose embeddings took part (others were masked)
    pred.batch_rows     # rows of the batched query these rows travelled in
    pred.hops           # seconds per hop in the broker: queue, experts, reducer, ...

        pred = client.predict_ids([1000000007, 1000000042])   # rows by id (or str ids)
    pred.row_experts    # per row: the experts that hold it and took part
    pred.ids            # predict_ids: the ids asked, in row order

        pred = client.predict(rows, columns, attention=True)    # also predict_ids
    pred.attention      # (R, len(experts)) each row's attention per expert of pred.experts
    pred.attention_cls  # (R,) [CLS]'s weight on itself; with it each row sums to 1

The broker (``network.serve_port``) batches concurrent requests, fans them out to every live
expert and the reducer, and answers each request with its own rows (docs/serving.md). A
``Client`` holds one ZeroMQ DEALER socket: use one per thread. Errors come back as
``ServeError`` whose ``status`` names the cause (``missing_columns``, ``no_expert``, ...).
No torch here: a client needs only pyzmq, msgpack and numpy.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import zmq

from traci_ml import proto
from traci_ml.core.errors import ProtocolError, ServeError, TraciError  # noqa: F401 (API)
from traci_ml.proto import wire

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"


@dataclass(frozen=True)
class Prediction:
    """One request's answer."""

    outputs: np.ndarray  # (R, C) probabilities (classification) or (R, 1) values
    task: str  # "classification" | "regression"
    classes: tuple[str, ...]  # class names in output column order (classification)
    experts: tuple[int, ...]  # experts that took part; the others were masked
    expert_names: tuple[str, ...]  # their view names, same order
    batch_rows: int  # rows of the batched query this request travelled in
    latency: float  # seconds from send to reply, as the client saw it
    # per row, the experts that took part in it (a party may lack a row it was asked by id)
    row_experts: tuple[tuple[int, ...], ...] | None = None
    ids: tuple[int, ...] | tuple[str, ...] | None = None  # predict_ids: the row ids asked
    # attention=True: (R, len(experts)) each row's attention per expert of ``experts`` and
    # (R,) [CLS]'s weight on itself; a row sums to 1 (core/models/attention.py)
    attention: np.ndarray | None = None
    attention_cls: np.ndarray | None = None
    # the request's time in the broker, seconds per hop (proto.SERVE_HOPS: queue, experts,
    # expert_compute, reducer, reducer_compute, reply); {} from a broker that sends none.
    # ``latency`` minus queue + experts + reducer + reply is the client <-> broker wire.
    hops: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """Classification: the most probable class per row."""
        return [self.classes[k] for k in self.outputs.argmax(axis=1)]

    @property
    def values(self) -> np.ndarray:
        """Regression: (R,) predictions in the label's units."""
        return self.outputs[:, 0]


class Client:
    """A connection to a broker's front door. ``curve``: a ``security.ClientKeys`` when the
    broker runs CurveZMQ (its front door admits the keys in its ``authorized/``)."""

    _ids = itertools.count(1)

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        timeout: float = 10.0,
        curve: Any = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint, self.timeout, self.curve = endpoint, timeout, curve
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._qid = next(self._ids) << 32  # ids unique across clients of this process

    @classmethod
    def from_config(cls, config: Any, *, timeout: float = 10.0, key: str = "client") -> Client:
        """A client for the cluster of a run config (``network.broker_host`` and
        ``serve_port``); with ``security.curve_dir`` set, the key pair ``<key>.key_secret``
        from that folder (its public key must be in ``authorized/``)."""
        from traci_ml.core.security import peer_keys, tcp_endpoint

        net = config.network
        if not net.serve_port:
            raise TraciError("network.serve_port is 0: the broker has no front door")
        endpoint = tcp_endpoint(net.broker_host, net.serve_port)
        return cls(endpoint, timeout=timeout, curve=peer_keys(config, key))

    # -- requests ---------------------------------------------------------------------

    def predict(
        self,
        rows: np.ndarray | Sequence[Sequence[float]] | Mapping[str, Sequence[float]],
        columns: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
        attention: bool = False,
    ) -> Prediction:
        """Predict ``rows`` (R, F) of raw feature values named by ``columns``, or a mapping
        column -> values (a dict of lists, a pandas DataFrame). ``attention``: also each
        row's attention per expert (``Prediction.attention``). Raises ``ServeError``."""
        x, names = _as_rows(rows, columns)
        self._qid += 1
        query = proto.Query(self._qid, names, (proto.Tensor.from_numpy(x),), attention=attention)
        return self._ask(query, timeout)

    def predict_ids(
        self,
        ids: Sequence[int] | Sequence[str] | np.ndarray,
        *,
        timeout: float | None = None,
        attention: bool = False,
    ) -> Prediction:
        """Predict the rows with these ids (ints or strs, unique; a numpy integer or string
        array too), each expert reading its own table: ``row_experts`` says which experts
        held each row. Raises ``ServeError`` (``bad_request`` for ids that are not that)."""
        self._qid += 1
        asked = _as_ids(ids)
        query = proto.Query(self._qid, (), (), asked, attention)
        return replace(self._ask(query, timeout), ids=asked)

    def _ask(self, query: proto.Query, timeout: float | None) -> Prediction:
        """Send ``query`` and wait for its REPLY."""
        qid = query.qid
        sock = self._connect()
        t0 = time.monotonic()
        sock.send_multipart(proto.encode(query), copy=False)
        deadline = t0 + (self.timeout if timeout is None else timeout)
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(max(1, int(left * 1000))):
                continue
            try:
                reply = proto.decode(sock.recv_multipart(copy=False))
            except ProtocolError:
                continue  # not ours to judge: wait for our reply
            if not isinstance(reply, proto.Reply) or reply.qid not in (qid, -1):
                continue  # the late answer to an earlier, timed-out request
            if reply.status != proto.SERVE_OK:
                raise ServeError(reply.status, reply.detail)
            outputs = np.array(reply.tensors[0].numpy())  # own the memory, writable
            att = np.array(reply.tensors[1].numpy()) if len(reply.tensors) > 1 else None
            if query.attention and att is None:
                raise ServeError("reducer_error", "the reply lacks the attention asked for")
            return Prediction(outputs, reply.task, reply.classes, reply.experts,
                              reply.expert_names, reply.batch_rows, time.monotonic() - t0,
                              _row_experts(reply, len(outputs)),
                              attention=None if att is None else att[:, 1:],
                              attention_cls=None if att is None else att[:, 0],
                              hops=_hops(reply))  # fmt: skip
        self._reset()  # a fresh socket: nothing of this request lingers
        raise ServeError("timeout", f"no reply from {self.endpoint} in {deadline - t0:.1f}s")

    # -- the socket -------------------------------------------------------------------

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            from traci_ml.core.link import dealer

            self._socket = dealer(self._context, self.endpoint, self.curve)
        return self._socket

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_rows(rows: Any, columns: Sequence[str] | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """(R, F) float32 C-contiguous rows and their column names, checked."""
    if isinstance(rows, Mapping) or (hasattr(rows, "keys") and hasattr(rows, "columns")):
        names = tuple(str(c) for c in (columns or list(rows.keys())))
        lacking = [c for c in names if c not in rows]
        if lacking:
            raise ServeError("bad_request", f"rows lack column(s) {', '.join(lacking)}")
        try:
            cols = [np.asarray(rows[c], dtype=np.float64) for c in names]
            if all(c.ndim == 1 for c in cols) and len({len(c) for c in cols}) == 1:
                x = np.array(cols).T  # one copy: ~4x column_stack's speed for 256 columns
            else:
                x = np.column_stack(cols)
        except (TypeError, ValueError) as exc:
            cells = {c: np.asarray(rows[c], dtype=object).ravel() for c in names}
            where = _non_numeric(cells) or f"rows are not numeric columns: {exc}"
            raise ServeError("bad_request", where) from None
    else:
        if columns is None:
            raise ServeError("bad_request", "columns are needed to name the rows' features")
        names = tuple(str(c) for c in columns)
        try:
            x = np.asarray(rows, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            where = _non_numeric_row(rows, names) or f"rows are not numbers: {exc}"
            raise ServeError("bad_request", where) from None
    x = np.ascontiguousarray(x.reshape(1, -1) if x.ndim == 1 else x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] != len(names):
        raise ServeError(
            "bad_request", f"rows of shape {x.shape} do not match {len(names)} column names"
        )
    return x, names


def _hops(reply: proto.Reply) -> dict[str, float]:
    """REPLY.hops as seconds by hop name (an older broker's shorter list: what it sent)."""
    return {hop: us * 1e-6 for hop, us in zip(proto.SERVE_HOPS, reply.hops, strict=False)}


def _row_experts(reply: proto.Reply, n: int) -> tuple[tuple[int, ...], ...]:
    """Per row, the experts of ``reply.experts`` that took part in it (``reply.rows``)."""
    if not reply.rows:
        return (reply.experts,) * n
    masks = [proto.unpack_rows(bits, n) for bits in reply.rows]  # decode checked them
    return tuple(
        tuple(e for e, mask in zip(reply.experts, masks, strict=True) if mask[r]) for r in range(n)
    )


def _as_ids(ids: Any) -> tuple[int, ...] | tuple[str, ...]:
    """Row ids as the wire takes them: all int (signed 64-bit) or all str (non-empty, at
    most ``MAX_STR`` characters), unique, at least one, and few enough for one header."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
        raise ServeError("bad_request", f"ids are a sequence of ids, got {type(ids).__name__}")
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ServeError("bad_request", f"ids are a 1-D array, got shape {ids.shape}")
        if ids.dtype.kind == "u" and ids.size and int(ids.max()) > wire.ID_MAX:
            raise ServeError("bad_request", f"id {int(ids.max())} is beyond a signed 64-bit id")
        if ids.dtype.kind not in "iuU":
            raise ServeError("bad_request", f"ids are integers or strings, not {ids.dtype}")
        ids = ids.tolist()  # Python ints / strs
    ids = list(ids)
    if not ids:
        raise ServeError("bad_request", "no ids: ask for at least one row")
    kind = int if isinstance(ids[0], (int, np.integer)) and not isinstance(ids[0], bool) else str
    out: list[Any] = []
    for k, value in enumerate(ids):
        if kind is int and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = int(value)
            if not wire.ID_MIN <= value <= wire.ID_MAX:
                raise ServeError("bad_request", f"id {value} (at {k}) is beyond a signed 64-bit id")
        elif kind is str and isinstance(value, (str, np.str_)):
            value = str(value)
            if not 0 < len(value) <= wire.MAX_STR:
                raise ServeError("bad_request", f"id at {k} is empty or longer than {wire.MAX_STR}")
        else:
            first = "int" if kind is int else "str"
            raise ServeError("bad_request", f"id {value!r} (at {k}) is a {type(value).__name__}; "
                             f"the first id is a {first}: ids are all int or all str")  # fmt: skip
        out.append(value)
    repeated = wire.first_repeat(out)
    if repeated is not None:
        raise ServeError("bad_request", f"id {repeated!r} is asked twice")
    size = wire.ids_bytes(out)
    if size > wire.MAX_IDS_BYTES:
        raise ServeError("bad_request", f"{len(out)} ids take {size} bytes, more than one request "
                         f"carries ({wire.MAX_IDS_BYTES}): split them")  # fmt: skip
    return tuple(out)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _non_numeric(columns: Mapping[str, Sequence[Any]]) -> str:
    """Where the first cell that is not a number sits (rows counted from 0): '' if none."""
    for name, values in columns.items():
        for r, value in enumerate(values):
            if not _is_number(value):
                return f"column {name!r} row {r} holds {value!r}, not a number"
    return ""


def _non_numeric_row(rows: Any, names: tuple[str, ...]) -> str:
    """The same for rows given as (R, F) nested sequences, or one flat row."""
    try:
        table = np.asarray(rows, dtype=object)
    except (TypeError, ValueError):
        return ""
    if table.ndim == 1:
        if any(isinstance(v, (Sequence, np.ndarray)) and not isinstance(v, str) for v in table):
            return ""  # ragged rows: the shape check names that
        table = table.reshape(1, -1)
    if table.ndim != 2:
        return ""
    for (r, j), value in np.ndenumerate(table):
        if not _is_number(value):
            name = repr(names[j]) if j < len(names) else f"#{j}"
            return f"column {name} row {r} holds {value!r}, not a number"
    return ""
