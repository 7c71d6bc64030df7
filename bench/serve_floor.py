"""The floor of the served request's message topology on this machine (issue 15): the same
processes and the same messages as `traci serve` answering one row, with no work in them.

    python -m bench.serve_floor

A client DEALER sends one message of a one-row QUERY's size (256 column names and one row)
to a "broker" ROUTER, which sends it to 4 "expert" DEALERs; each echoes an embedding-sized
message (128 float32); when all 4 are back the broker sends one QBATCH-sized message to a
"reducer" DEALER, whose answer goes back to the client. Six Python processes and the client,
ZeroMQ over loopback TCP like TRACI's defaults, raw bytes (no msgpack, no checks, no torch,
no metrics). What is left is what the topology itself costs here: the wake-ups, the
ZeroMQ I/O threads and the loopback hops. A served request can not be faster than this on
the same machine; ``bench.serve`` prints it beside TRACI's own figure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from typing import Any

import numpy as np

EXPERTS = 4
QUERY_BYTES = 256 * 6 + 256 * 4  # ~256 short column names and one float32 row
EMB_BYTES = 128 * 4  # one row's embedding
OUT_BYTES = 10 * 4  # one row's class probabilities


def _broker(front: str, experts: str, reducer: str) -> None:
    import zmq

    ctx = zmq.Context()
    fs, es, rs = (ctx.socket(zmq.ROUTER) for _ in range(3))
    for sock, ep in ((fs, front), (es, experts), (rs, reducer)):
        sock.bind(ep)
    peers: list[bytes] = []
    red: bytes | None = None
    while len(peers) < EXPERTS or red is None:  # each worker says hello first
        for sock, _ in zmq.zmq_poll([(es, zmq.POLLIN), (rs, zmq.POLLIN)], -1):
            rid, _hello = sock.recv_multipart()
            if sock is es:
                peers.append(rid)
            else:
                red = rid
    poller = [(fs, zmq.POLLIN), (es, zmq.POLLIN), (rs, zmq.POLLIN)]
    client, waiting = b"", 0
    while True:
        for sock, _ in zmq.zmq_poll(poller, -1):
            if sock is fs:
                client, body = fs.recv_multipart()
                if body == b"stop":
                    for rid in peers:
                        es.send_multipart([rid, b"stop"])
                    rs.send_multipart([red, b"stop"])
                    return
                for rid in peers:
                    es.send_multipart([rid, body])
                waiting = EXPERTS
            elif sock is es:
                es.recv_multipart()
                waiting -= 1
                if waiting == 0:
                    rs.send_multipart([red, b"t" * (EMB_BYTES * EXPERTS)])
            else:
                _, out = rs.recv_multipart()
                fs.send_multipart([client, out])


def _worker(endpoint: str, answer: int) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"hello")
    reply = b"e" * answer
    while sock.recv() != b"stop":
        sock.send(reply)


def run(requests: int = 2000) -> dict[str, Any]:
    """One client, one row, closed loop through the empty topology: p50/p99 in ms."""
    import zmq

    from bench.e2e import free_ports

    front, experts, reducer = (f"tcp://127.0.0.1:{p}" for p in free_ports(3))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_broker, args=(front, experts, reducer), daemon=True)]
    procs += [ctx.Process(target=_worker, args=(experts, EMB_BYTES), daemon=True)
              for _ in range(EXPERTS)]  # fmt: skip
    procs.append(ctx.Process(target=_worker, args=(reducer, OUT_BYTES), daemon=True))
    for p in procs:
        p.start()
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(front)
    body = b"q" * QUERY_BYTES
    lat = []
    try:
        for k in range(200 + requests):
            t0 = time.monotonic()
            sock.send(body)
            if not sock.poll(30_000):
                raise RuntimeError("the empty topology did not answer in 30 s")
            sock.recv()
            if k >= 200:  # after the warm-up
                lat.append(time.monotonic() - t0)
        sock.send(b"stop")
        for p in procs:
            p.join(timeout=10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        sock.close()
        zctx.term()
    ms = np.array(lat) * 1000
    return {"requests": requests, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    out = run(parser.parse_args(argv).requests)
    print(f"empty topology, one client, one row: p50 {out['p50_ms']:.2f} ms  "
          f"p99 {out['p99_ms']:.2f} ms")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
