"""Transport: what the broker costs on the wire, against forwarders that do nothing else.

Four paths, each driven by the same load generators (separate processes):

* ``broker``: the real broker (``traci broker``, 4 experts) between 4 fake experts and a fake
  reducer. Experts send eval-phase EMBs, so the reducer answers each BATCH with a tiny ACK
  that the broker fans out to the 4 experts: the return path carries no tensors and the figure
  isolates the EMB -> BATCH forwarding path (join included: that is the broker's job).
* ``null``: a Python loop, ROUTER (senders) -> DEALER (receiver), forwarding frames unchanged
  both ways -- the same poll/recv/send shape as the broker's loop, none of its logic. This is
  the ``broker_vs_null`` baseline.
* ``proxy``: the same topology through ``zmq.proxy`` (libzmq's C forwarder): the ceiling.
* ``direct``: PUSH -> PULL straight to the receiver, one hop; acks return on PUSH -> PULL.

Definitions:

* A *message* is one expert embedding delivered to the receiver (a BATCH of 4 counts 4).
  msgs/s is counted at the receiver; GB/s is msgs/s * payload bytes / 1e9. Senders keep
  ``WINDOW`` messages in flight each (cumulative acks): the forwarder is never idle and no
  queue grows without bound.
* Latency is one-way, sender ``send_multipart`` -> receiver ``recv_multipart`` returned, on
  the system-wide CLOCK_MONOTONIC, with ONE sender and ONE message in flight (the broker then
  has one expert, so every EMB releases a step at once: no join wait, no queueing). The
  round trip (until the sender holds the ack) is reported too. ``added_p50_us`` is a path's
  p50 minus direct's p50 at the same size, paired within a repeat.
* ``forwarder_cpu_us_per_msg``: user+system CPU of the forwarder process (all threads,
  /proc/<pid>/stat) per message while measured: its cost, whoever else shared the cores.
  ``broker_vs_null_cpu`` (null's over the broker's) is the throughput ratio's twin that
  depends least on how busy the machine was; ``background_cores`` says how busy it was.

Noise control: all four paths of one size run at once, paused but for the one being measured;
each repeat measures every path for ``duration`` s in turn (order rotated), so a slow spell of
the machine falls on all paths alike and ratios are paired in time. Latency runs likewise,
one path at a time, fresh processes per repeat. Every figure is the median over repeats with
min/max.

    python -m bench.transport [--quick] [--repeats N] [--json FILE]
    python -m bench.transport --profile DIR [--profiler pyspy|pyspy-wall|cprofile]

``--profile`` profiles the broker (py-spy: and the null forwarder) at each size instead
(py-spy is not a project dependency: ``.venv/bin/pip install py-spy``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from bench.load import (
    Headers,
    Procs,
    Profile,
    Shared,
    Stack,
    Window,
    ack,
    await_welcome,
    broker_config,
    drain,
    endpoints,
    hello_expert,
    hello_reducer,
    measure_stacks,
    peek,
    percentiles_us,
    show_profile,
    started,
    suite_main,
    summary,
    wait_until,
)

KIB = 1024
SIZES = {"32KiB": 32 * KIB, "256KiB": 256 * KIB, "1MiB": 1024 * KIB}
PATHS = ("broker", "null", "proxy", "direct")
DIM = 128  # embed_dim: a message of S bytes is a [S / 512, 128] float32 tensor
SENDERS = 4
WINDOW = 8  # throughput: messages in flight per sender
PHASE = "eval"  # answered by ACK: no tensors on the return path
POLL_MS = 50  # idle wake-up of every peer: how fast it sees pause/stop flags


@dataclass(frozen=True)
class SenderSpec:
    index: int
    path: str
    endpoint: str
    ack_endpoint: str | None  # direct: where acks come back (PULL)
    sizes: tuple[int, ...]  # bytes per message, one part of the run per size
    counts: tuple[int, ...] | None  # messages per part; None: one part until stopped
    window: int


@dataclass(frozen=True)
class ReceiverSpec:
    path: str
    endpoint: str
    ack_endpoints: tuple[str, ...]  # direct: one PUSH per sender
    n_experts: int  # broker: the reducer's HELLO
    record: int  # latency: arrivals to record (0: none)


# --------------------------------------------------------------------------------------
# Peers (each runs in its own forked process)
# --------------------------------------------------------------------------------------


def sender(spec: SenderSpec, shared: Shared, results: Any) -> None:
    """An expert: EMB messages of ``spec.sizes`` with at most ``spec.window`` unacked."""
    ctx = zmq.Context()
    if spec.ack_endpoint is None:  # broker or forwarder: one DEALER both ways
        out = inbox = ctx.socket(zmq.DEALER)
        out.connect(spec.endpoint)
    else:
        out, inbox = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        out.connect(spec.endpoint)
        inbox.connect(spec.ack_endpoint)
    start = 0
    if spec.path == "broker":
        out.send_multipart(hello_expert(spec.index, DIM, spec.window))
        start = await_welcome(inbox)
    shared.ready[spec.index] = True
    parts, bound = [], start  # (end seq, headers, payload frame) per size
    for nbytes, count in zip(spec.sizes, spec.counts or (0,), strict=True):
        rows = nbytes // (4 * DIM)
        bound += count
        payload = memoryview(np.ones((rows, DIM), np.float32)).cast("B")
        parts.append(
            (bound, Headers(expert_id=spec.index, rows=rows, dim=DIM, phase=PHASE), payload)
        )
    end = bound if spec.counts else None
    timed = end is not None
    sent_ns = np.zeros(bound - start if timed else 0, np.int64)
    acked_ns = np.zeros_like(sent_ns)
    seq = acked = start
    part, (part_end, headers, payload) = 0, parts[0]
    while not shared.stop.value:
        while not shared.paused.value and seq - acked < spec.window and (end is None or seq < end):
            if timed and seq >= part_end:
                part += 1
                part_end, headers, payload = parts[part]
            header = headers.emb(seq)
            if timed:
                sent_ns[seq - start] = time.monotonic_ns()
            out.send_multipart([header, payload], copy=False)
            seq += 1
        if end is not None and acked >= end:
            break
        if not inbox.poll(POLL_MS):
            continue
        for frames in drain(inbox, 256):
            kind, got = peek(frames[0])
            if kind == "ACK":
                if timed:
                    acked_ns[got - start] = time.monotonic_ns()
                acked = max(acked, got + 1)
            elif kind != "HEARTBEAT":
                shared.sender_errors[spec.index] += 1
    results.put((spec.path, "sender", start, sent_ns, acked_ns))
    ctx.destroy(linger=0)


def receiver(spec: ReceiverSpec, shared: Shared, results: Any) -> None:
    """The reducer (broker path) or the sink (others): count tensors, ack each message."""
    ctx = zmq.Context()
    acks: list[zmq.Socket] = []
    if spec.path == "direct":
        sock = ctx.socket(zmq.PULL)
        sock.bind(spec.endpoint)
        for endpoint in spec.ack_endpoints:
            acks.append(ctx.socket(zmq.PUSH))
            acks[-1].bind(endpoint)
    else:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(spec.endpoint)
    if spec.path == "broker":
        sock.send_multipart(hello_reducer(spec.n_experts, DIM))
        await_welcome(sock)
    routed = spec.path in ("null", "proxy")  # frames: [sender routing id, header, tensor]
    seqs = np.zeros(spec.record, np.int64)
    arrived_ns = np.zeros(spec.record, np.int64)
    n_recorded = 0
    while not shared.stop.value:
        if not sock.poll(POLL_MS):
            continue
        for frames in drain(sock, 256, copy=False):
            now = time.monotonic_ns()
            head = 1 if routed else 0
            fields = msgpack.unpackb(frames[head].buffer)
            kind = fields["k"]
            if kind not in ("BATCH", "EMB"):
                if kind != "HEARTBEAT":
                    shared.errors.value += 1
                continue
            seq = fields["seq"]
            if spec.path == "broker":
                sock.send(ack(seq))
            elif routed:
                sock.send_multipart([frames[0].bytes, ack(seq)])
            else:
                acks[fields["expert_id"]].send(ack(seq))
            shared.delivered.value += len(frames) - head - 1
            if n_recorded < spec.record:
                seqs[n_recorded], arrived_ns[n_recorded] = seq, now
                n_recorded += 1
    results.put((spec.path, "receiver", seqs[:n_recorded], arrived_ns[:n_recorded]))
    ctx.destroy(linger=0)


def forwarder(front: str, back: str, use_proxy: bool, shared: Shared) -> None:
    """ROUTER (senders) <-> DEALER (receiver), frames forwarded unchanged."""
    ctx = zmq.Context()
    frontend, backend = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    frontend.bind(front)
    backend.bind(back)
    if use_proxy:
        zmq.proxy(frontend, backend)  # until the process is terminated
        return
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    while not shared.stop.value:  # the broker's loop shape: poll, one recv per ready socket
        ready = dict(poller.poll(POLL_MS))
        if ready.get(frontend):
            backend.send_multipart(frontend.recv_multipart(copy=False), copy=False)
        if ready.get(backend):
            frontend.send_multipart(backend.recv_multipart(copy=False), copy=False)
    ctx.destroy(linger=0)


# --------------------------------------------------------------------------------------
# Sessions: start paths (paused), measure them one at a time, stop them
# --------------------------------------------------------------------------------------


def _start(
    procs: Procs,
    path: str,
    tmp: Path,
    *,
    n_senders: int,
    window: int,
    sizes: tuple[int, ...],
    counts: tuple[int, ...] | None = None,
    record: int = 0,
    cprofile: Path | None = None,
) -> Stack:
    """Start one path's forwarder, receiver and senders, paused."""
    shared = Shared(n_senders)
    front, back = endpoints(2)
    main = None
    if path == "broker":
        ports = [int(ep.rsplit(":", 1)[1]) for ep in (front, back)]
        config = broker_config(
            tmp / "broker.yaml", n_experts=n_senders, embed_dim=DIM, ports=ports, window=window
        )
        main = procs.broker(config, tmp / "broker.log", cprofile=cprofile).pid
    elif path in ("null", "proxy"):
        main = procs.fork(forwarder, front, back, path == "proxy", shared).pid
    acks = tuple(endpoints(n_senders)) if path == "direct" else ()
    rspec = ReceiverSpec(path, back, acks, n_senders, record)
    peers = [procs.fork(receiver, rspec, shared, procs.results).pid]
    for i in range(n_senders):
        to, ack_from = (back, acks[i]) if path == "direct" else (front, None)
        sspec = SenderSpec(i, path, to, ack_from, sizes, counts, window)
        peers.append(procs.fork(sender, sspec, shared, procs.results).pid)
    return Stack(path, shared, main, tuple(peers))


def throughput(
    nbytes: int,
    paths: tuple[str, ...] = PATHS,
    *,
    rounds: int,
    duration: float,
    profile: Profile | None = None,
) -> dict[str, list[dict]]:
    """Each path ``rounds`` times for ``duration`` s, all started, one unpaused at a time."""

    def start(procs: Procs, path: str, tmp: Path, cprofile: Path | None) -> Stack:
        return _start(procs, path, tmp, n_senders=SENDERS, window=WINDOW, sizes=(nbytes,),
                      cprofile=cprofile if path == "broker" else None)  # fmt: skip

    stacks, windows = measure_stacks(
        paths, start, rounds=rounds, duration=duration, profile=profile
    )
    return {
        stack.name: [
            _figures(w, nbytes, has_forwarder=bool(stack.main)) for w in windows[stack.name]
        ]
        for stack in stacks
    }


def _figures(window: Window, nbytes: int, *, has_forwarder: bool) -> dict:
    msgs = window.count / window.seconds
    return {
        "msgs_per_s": msgs,
        "gb_per_s": msgs * nbytes / 1e9,
        "forwarder_cpu_us_per_msg": window.main_cpu / window.count * 1e6 if has_forwarder else None,
        "forwarder_cpu_util": window.main_cpu / window.seconds if has_forwarder else None,
        "loadgen_cpu_us_per_msg": window.peers_cpu / window.count * 1e6,
        "background_cores": window.background_cores,
    }


def latency(paths: tuple[str, ...], *, warm: int, count: int) -> dict[str, dict[str, dict]]:
    """One sender, one message in flight, every size in turn, one path at a time."""
    sizes = tuple(SIZES.values())
    per_size = warm + count
    counts = (per_size,) * len(sizes)
    out: dict[str, dict[str, dict]] = {}

    def start(procs: Procs, path: str, tmp: Path) -> Stack:
        return _start(procs, path, tmp, n_senders=1, window=1, sizes=sizes, counts=counts,
                      record=per_size * len(sizes))  # fmt: skip

    with started(paths, start) as (procs, stacks, _):
        for stack in stacks:
            what = f"{stack.name}: peers registered"
            wait_until(lambda s=stack: all(s.shared.ready), procs, timeout=60, what=what)
        for stack in stacks:
            stack.shared.paused.value = False
            sent = procs.result(timeout=300)  # the sender is done
            stack.shared.stop.value = True
            received = procs.result()
            if sent[:2] != (stack.name, "sender") or received[:2] != (stack.name, "receiver"):
                raise RuntimeError(f"{stack.name}: reports out of order")
            start, sent_ns, acked_ns = sent[2:]
            seqs, arrived_ns = received[2:]
            one_way = np.full_like(sent_ns, -1)
            one_way[seqs - start] = arrived_ns - sent_ns[seqs - start]
            out[stack.name] = {}
            for k, name in enumerate(SIZES):
                idx = slice(k * per_size + warm, (k + 1) * per_size)
                if (one_way[idx] < 0).any():
                    raise RuntimeError(f"{stack.name}: {name} messages never reached the receiver")
                out[stack.name][name] = {
                    "one_way": percentiles_us(one_way[idx]),
                    "rtt": percentiles_us(acked_ns[idx] - sent_ns[idx]),
                }
        for stack in stacks:
            if stack.shared.errors.value or sum(stack.shared.sender_errors):
                raise RuntimeError(f"{stack.name}: unexpected messages (DROP/GOODBYE?)")
    return out


# --------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------


def run(*, repeats: int = 5, quick: bool = False) -> dict:
    """Every path at every size, ``repeats`` times interleaved; medians, spreads, ratios."""
    if quick:
        repeats = 1
    duration = 0.6 if quick else 1.5
    warm, count = (50, 300) if quick else (100, 1000)
    began = time.monotonic()
    thr = {name: throughput(nbytes, rounds=repeats, duration=duration)
           for name, nbytes in SIZES.items()}  # fmt: skip
    lat: dict[str, dict[str, list[dict]]] = {s: {p: [] for p in PATHS} for s in SIZES}
    for r in range(repeats):
        order = PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]
        for path, per_size in latency(order, warm=warm, count=count).items():
            for name, figures in per_size.items():
                lat[name][path].append(figures)
    sizes = {name: _size_figures(thr[name], lat[name]) for name in SIZES}
    return {
        "broker_vs_null_32k": sizes["32KiB"]["broker_vs_null"]["median"],
        "broker_vs_proxy_32k": sizes["32KiB"]["broker_vs_proxy"]["median"],
        "broker_vs_null_cpu_32k": sizes["32KiB"]["broker_vs_null_cpu"]["median"],
        "added_p50_us_32k": sizes["32KiB"]["added_p50_us"]["broker"]["median"],
        "sizes": sizes,
        "settings": {
            "repeats": repeats,
            "quick": quick,
            "senders": SENDERS,
            "window": WINDOW,
            "embed_dim": DIM,
            "phase": PHASE,
            "duration_s": duration,
            "latency_messages": count,
            "latency_warmup_messages": warm,
        },
        "elapsed_s": time.monotonic() - began,
    }


def _size_figures(thr: dict[str, list[dict]], lat: dict[str, list[dict]]) -> dict:
    """Per path: each figure's median and spread. Comparisons are paired within a repeat."""
    keys = ("msgs_per_s", "gb_per_s", "loadgen_cpu_us_per_msg", "background_cores")
    fwd_keys = ("forwarder_cpu_us_per_msg", "forwarder_cpu_util")
    paths = {}
    for path in PATHS:
        runs = thr[path]
        figures = {key: summary([r[key] for r in runs]) for key in keys}
        if path != "direct":
            figures.update({key: summary([r[key] for r in runs]) for key in fwd_keys})
        for kind in ("one_way", "rtt"):
            for q in ("p50_us", "p99_us"):
                figures[f"{kind}_{q}"] = summary([r[kind][q] for r in lat[path]])
        paths[path] = figures

    def paired(a: str, b: str, key: str, op: Any, runs: dict[str, list[dict]]) -> dict:
        return summary([op(x[key], y[key]) for x, y in zip(runs[a], runs[b], strict=True)])

    def ratio(x: float, y: float) -> float:
        return x / y

    def minus(x: float, y: float) -> float:
        return x - y

    fwd = ("broker", "null", "proxy")
    one_way = {path: [r["one_way"] for r in lat[path]] for path in PATHS}
    return {
        "paths": paths,
        "broker_vs_null": paired("broker", "null", "msgs_per_s", ratio, thr),
        "broker_vs_proxy": paired("broker", "proxy", "msgs_per_s", ratio, thr),
        # Forwarder CPU per message, null over broker: the same comparison, less sensitive to
        # how the two cores were shared during the run.
        "broker_vs_null_cpu": paired("null", "broker", "forwarder_cpu_us_per_msg", ratio, thr),
        "added_p50_us": {p: paired(p, "direct", "p50_us", minus, one_way) for p in fwd},
        "added_p99_us": {p: paired(p, "direct", "p99_us", minus, one_way) for p in fwd},
    }


def table(result: dict) -> str:
    lines = [
        f"{'size':>7} {'path':>7} {'msgs/s':>9} {'(min-max)':>15} {'GB/s':>6} "
        f"{'fwd us/msg':>10} {'p50 us':>7} {'p99 us':>7} {'rtt50':>7} {'bg cores':>8}"
    ]
    for name, fig in result["sizes"].items():
        for path, f in fig["paths"].items():
            fwd = f.get("forwarder_cpu_us_per_msg", {}).get("median")
            lines.append(
                f"{name:>7} {path:>7} {f['msgs_per_s']['median']:9.0f} "
                f"{f['msgs_per_s']['min']:7.0f}-{f['msgs_per_s']['max']:<7.0f} "
                f"{f['gb_per_s']['median']:6.2f} {'-' if fwd is None else f'{fwd:.1f}':>10} "
                f"{f['one_way_p50_us']['median']:7.0f} {f['one_way_p99_us']['median']:7.0f} "
                f"{f['rtt_p50_us']['median']:7.0f} {f['background_cores']['median']:8.2f}"
            )
        lines.append(
            f"{name:>7} broker/null {fig['broker_vs_null']['median']:.2f}  "
            f"broker/proxy {fig['broker_vs_proxy']['median']:.2f}  "
            f"cpu null/broker {fig['broker_vs_null_cpu']['median']:.2f}  added p50 "
            f"{fig['added_p50_us']['broker']['median']:.0f} us (null "
            f"{fig['added_p50_us']['null']['median']:.0f}, proxy "
            f"{fig['added_p50_us']['proxy']['median']:.0f})  added p99 "
            f"{fig['added_p99_us']['broker']['median']:.0f} us"
        )
    lines.append(
        f"broker_vs_null_32k {result['broker_vs_null_32k']:.3f}   added_p50_us_32k "
        f"{result['added_p50_us_32k']:.0f}   ({result['elapsed_s']:.0f} s)"
    )
    return "\n".join(lines)


def _profile(folder: Path, profiler: str) -> None:
    paths = ("broker", "null") if profiler.startswith("pyspy") else ("broker",)
    for name, nbytes in SIZES.items():
        for path in paths:
            out = folder / f"{path}-{name}.{profiler}"
            prof = Profile(profiler, out)
            fig = throughput(nbytes, (path,), rounds=1, duration=5.0, profile=prof)[path][0]
            print(path, name, {k: v and round(v, 3) for k, v in fig.items()})
            show_profile(f"{path} {name}", profiler, out)


def main(argv: list[str] | None = None) -> None:
    suite_main(
        argv,
        doc=__doc__,
        repeats=5,
        profile_help="instead: profile the broker (py-spy: and the null forwarder)",
        run=run,
        table=table,
        profile=_profile,
    )


if __name__ == "__main__":
    main()
