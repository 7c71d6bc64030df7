"""The serve bench's load generator and CPU meter (bench/serve_load.py, bench/serve_cpu.py)
against a fake front door on loopback: what they count is what happened. No time is
asserted beyond the generator's own schedule."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import zmq

from bench.e2e import free_ports
from bench.serve_cpu import CpuMeter, fmt_cpu
from bench.serve_load import drive
from traci_ml import proto


class FakeDoor:
    """A ROUTER that answers each QUERY with an ok REPLY of one row after ``delay`` s; the
    ``bad``-th query and every one after it get a REPLY with the wrong qid (a stray)."""

    def __init__(self, delay: float = 0.0, bad: int | None = None) -> None:
        self.endpoint = f"tcp://127.0.0.1:{free_ports(1)[0]}"
        self.delay, self.bad, self.seen = delay, bad, 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _serve(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(self.endpoint)
        self._ready.set()
        out = proto.Tensor.from_numpy(np.full((1, 3), 1 / 3, np.float32))
        while not self._stop.is_set():
            if not sock.poll(50):
                continue
            rid, *frames = sock.recv_multipart()
            query = proto.decode(frames)
            assert isinstance(query, proto.Query) and query.tensors[0].shape == (1, 256)
            self.seen += 1
            qid = query.qid + 1 if self.bad is not None and self.seen >= self.bad else query.qid
            time.sleep(self.delay)
            reply = proto.Reply(qid, proto.SERVE_OK, "", "classification", ("a", "b", "c"),
                                (0,), ("v",), 1, (out,))  # fmt: skip
            sock.send_multipart([rid, *proto.encode(reply)])
        sock.close(linger=0)
        ctx.term()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def door():
    doors: list[FakeDoor] = []

    def make(**kw) -> FakeDoor:
        doors.append(FakeDoor(**kw))
        return doors[-1]

    yield make
    for d in doors:
        d.close()


def test_closed_loop_counts_every_answer(door) -> None:
    fake = door()
    out = drive(fake.endpoint, None, 0.5, 4, time.monotonic() + 0.2)
    n = len(out["latencies"])
    assert n > 0 and out["errors"] == 0 and out["unsent"] == 0
    assert n == len(out["answered_at"]) == len(out["batches"])
    assert fake.seen == n + 4  # each client's warm-up request is not counted
    assert set(out["batches"].tolist()) == {1}


def test_open_loop_keeps_the_schedule_and_charges_lateness(door) -> None:
    """40 requests/s for 1 s: about 40 sent, on time; a server 30 ms slow at 100/s over 2
    clients (50/s each, 20 ms apart) falls behind, and the latencies show it."""
    fast = door()
    out = drive(fast.endpoint, 40.0, 1.0, 2, time.monotonic() + 0.2)
    assert 38 <= len(out["latencies"]) <= 42 and out["errors"] == 0
    slow = door(delay=0.03)
    late = drive(slow.endpoint, 100.0, 1.0, 2, time.monotonic() + 0.2)
    # each client can finish at most one request per 30 ms but is due one per 20 ms: the
    # later ones wait their turn, charged from their scheduled time
    assert np.max(late["latencies"]) > 0.1
    assert len(late["latencies"]) + late["unsent"] <= 102


def test_a_reply_that_is_not_ours_is_an_error(door) -> None:
    fake = door(bad=10)  # the warm-ups (4) and 5 more are fine, then every qid is wrong
    out = drive(fake.endpoint, None, 0.3, 4, time.monotonic() + 0.2)
    assert len(out["latencies"]) == 5
    assert out["errors"] >= 4


def test_cpu_meter_reads_this_process() -> None:
    meter = CpuMeter(os.getpid())
    start = time.monotonic() + 0.05
    meter.window(start, 0.3)
    end = start + 0.3
    x = 0
    while time.monotonic() < end + 0.05:  # busy: CPU in the window
        x += 1
    cpu = meter.per_request(100)
    assert cpu["total"] > 0 and "clients" in cpu
    assert sum(v for k, v in cpu.items() if k not in ("total", "clients", "experts")) > 0
    assert "CPU per request" in fmt_cpu(cpu) and fmt_cpu({}).endswith("not measured")
