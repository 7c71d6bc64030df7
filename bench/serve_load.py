"""The serve bench's load generator: many closed- or open-loop clients in one thread.

Each client is its own DEALER socket (its own connection and route, as one
``traci_ml.Client`` each) with at most one request in flight; one ``zmq_poll`` loop drives
all of them. Requests and replies are the wire's own QUERY and REPLY, encoded and decoded
by ``traci_ml.proto`` as ``Client`` does, and a reply is checked (status ok, one row of
outputs, the request's qid) before it counts. What it saves against one thread per
``Client``: the thread wake-ups and GIL hand-offs, which on a 2-core machine cost the bench's
clients more CPU than the whole cluster spends answering (``bench.serve_cpu``).

Open loop (``rate``): client k sends on a fixed schedule (period ``clients / rate``, offset
by k) and a request's latency runs from its *scheduled* time, so a client that falls behind
is charged for it (no coordinated omission); a load the cluster cannot keep up with is cut
2 s after its window (``unsent``). Closed loop (``rate`` None): each client sends its next
request when the last one is answered.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

FEATURES = 256  # the reference model's synthetic table: x0 .. x255, standard normal


def drive(endpoint: str, rate: float | None, seconds: float, clients: int,
          start: float) -> dict[str, Any]:  # fmt: skip
    """``clients`` clients from ``start`` (monotonic) for ``seconds``: the latencies (s),
    when each came (monotonic), batch rows, errors, unsent requests and finish time, for
    ``bench.serve`` to merge."""
    import zmq

    from traci_ml import proto
    from traci_ml.core.link import dealer
    from traci_ml.proto import SERVE_OK

    columns = tuple(f"x{j}" for j in range(FEATURES))
    data = np.random.default_rng(0).standard_normal((4096, FEATURES)).astype(np.float32)
    ctx = zmq.Context()
    socks = [dealer(ctx, endpoint, None) for _ in range(clients)]
    index = {s: k for k, s in enumerate(socks)}
    period = clients / rate if rate else 0.0
    due = [start + k * period / clients for k in range(clients)]  # open loop: next send
    sent_at = [0.0] * clients  # the (scheduled) time of the request in flight
    busy = [False] * clients
    qid = [(k + 1) << 32 for k in range(clients)]
    count = [0] * clients
    latencies: list[float] = []
    answered: list[float] = []  # when each counted reply came
    batches: list[int] = []
    errors = unsent = 0
    end = start + seconds

    def send(k: int, at: float) -> None:
        qid[k] += 1
        row = (count[k] * 97 + k * 389) % len(data)
        query = proto.Query(qid[k], columns, (proto.Tensor.from_numpy(data[row : row + 1]),))
        socks[k].send_multipart(proto.encode(query), copy=False)
        sent_at[k], busy[k] = at, True
        count[k] += 1

    try:
        for k in range(clients):  # connect and warm each route before the clock starts
            send(k, 0.0)
            if not socks[k].poll(30_000):
                raise RuntimeError(f"no reply from {endpoint} to warm client {k}")
            socks[k].recv_multipart()
            busy[k] = False
        time.sleep(max(0.0, start - time.monotonic()))
        if rate is None:
            for k in range(clients):
                send(k, time.monotonic())
        poller = [(s, zmq.POLLIN) for s in socks]
        while True:
            now = time.monotonic()
            if rate is not None:  # send what is due from the clients that are free
                for k in range(clients):
                    if not busy[k] and due[k] <= now and due[k] < end:
                        send(k, due[k])
                        due[k] += period
            if not any(busy) and (rate is None or min(due) >= end):
                break
            if now > end + 2.0:  # hopelessly behind: the rest is never sent
                if rate is not None:
                    unsent += sum(max(0, int((end - d) / period) + 1) for d in due if d < end)
                break
            wait = 0.05
            if rate is not None:
                free = [due[k] for k in range(clients) if not busy[k] and due[k] < end]
                wait = min([wait, *(max(0.0, d - now) for d in free)])
            for sock, _ in zmq.zmq_poll(poller, int(wait * 1000 + 0.999)):
                k = index[sock]
                reply = proto.decode(sock.recv_multipart(copy=False))
                done = time.monotonic()
                busy[k] = False
                ok = (
                    isinstance(reply, proto.Reply)
                    and reply.qid == qid[k]
                    and reply.status == SERVE_OK
                    and reply.tensors[0].shape[0] == 1
                )
                if ok:
                    latencies.append(done - sent_at[k])
                    answered.append(done)
                    batches.append(reply.batch_rows)
                else:
                    errors += 1
                if rate is None and done < end:
                    send(k, done)
        finished = time.monotonic()
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
    return {"latencies": np.array(latencies), "answered_at": np.array(answered),
            "batches": np.array(batches, dtype=np.int64),
            "errors": errors, "unsent": unsent, "finished": max(finished, end)}  # fmt: skip
