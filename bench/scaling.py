"""Scaling: the broker's cost per expert-token as the number of experts grows (4 .. 64).

The experts are tiny (``[8, 16]`` float32 embeddings, 512 bytes) so the broker's per-message
work is what is measured, not the bytes. Setup per measurement:

* the real broker (``traci broker``) configured for N experts (synthetic views "even"),
* ONE load-generator process driving N DEALER sockets (one per expert identity) in a single
  poll loop -- N processes would swamp 2 cores at N = 64 -- each expert keeping ``WINDOW``
  train steps in flight and sending its next EMB when that step's GRAD comes back,
* a fake reducer that answers every BATCH with a GRAD (one zero slice per present expert), so
  the broker does the whole train round trip: join, BATCH, split GRAD into N replies.

Figures over ``duration`` seconds: released steps/s (BATCHes the reducer got),
broker CPU seconds per step (utime + stime of the broker process, all threads, from
/proc/<pid>/stat), per-expert-token throughput (steps/s * N) and the broker's CPU utilisation
(the share of a core it got: with the generator and reducer as light as they are, the broker
is the bottleneck). ``scaling_64_vs_4`` is the per-expert-
token throughput at 64 over that at 4; ``cpu_scaling_64_vs_4`` is the same ratio from broker
CPU per expert-token (4 over 64), which depends least on how the 2 cores were shared.

Noise control: the five brokers (with their generators and reducers) run at once, all paused
but the one being measured; each repeat measures every N for ``duration`` s in turn (order
rotated), so a busy spell of the machine falls on all N alike and the ratio is paired in time.
``background_cores`` is the CPU the rest of the machine used meanwhile.

    python -m bench.scaling [--quick] [--repeats N] [--json FILE]
    python -m bench.scaling --profile DIR [--profiler pyspy|pyspy-wall|cprofile]

``--profile`` samples the broker at 4 and 64 experts instead (py-spy is not a project
dependency: ``.venv/bin/pip install py-spy``; see ``bench.load.Profile`` for what each shows).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.load import (
    DTYPE,
    Headers,
    Procs,
    Profile,
    Shared,
    Stack,
    Window,
    await_welcome,
    broker_config,
    check_grad_header,
    drain,
    free_ports,
    grad_header,
    hello_expert,
    hello_reducer,
    measure_stacks,
    peek,
    show_profile,
    suite_main,
    summary,
)

EXPERTS = (4, 8, 16, 32, 64)
ROWS, DIM = 8, 16  # one token: [8, 16] float32
WINDOW = 4  # train steps in flight per expert
PHASE = "train"  # answered by GRAD: the broker splits it into one reply per expert
POLL_MS = 50  # idle wake-up of every peer: how fast it sees pause/stop flags


def experts(endpoint: str, ids: list[int], shared: Shared, results: Any) -> None:
    """N experts in one loop: one DEALER per expert id, ``WINDOW`` steps in flight each."""
    ctx = zmq.Context()
    socks = []
    for eid in ids:
        socks.append(ctx.socket(zmq.DEALER))
        socks[-1].connect(endpoint)
        socks[-1].send_multipart(hello_expert(eid, DIM, WINDOW))
    starts = [await_welcome(sock) for sock in socks]  # all come once every expert registered
    shared.ready[0] = True
    headers = [Headers(expert_id=eid, rows=ROWS, dim=DIM, phase=PHASE) for eid in ids]
    payload = np.full((ROWS, DIM), 0.5, np.float32).tobytes()
    next_seq, acked = list(starts), list(starts)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    index = {sock: k for k, sock in enumerate(socks)}

    def fill(k: int) -> None:
        while next_seq[k] - acked[k] < WINDOW:
            socks[k].send_multipart([headers[k].emb(next_seq[k]), payload])
            next_seq[k] += 1

    was_paused = True
    while not shared.stop.value:
        paused = shared.paused.value
        if was_paused and not paused:
            for k in range(len(socks)):
                fill(k)
        was_paused = paused
        for sock, _ in poller.poll(POLL_MS):
            k = index[sock]
            for frames in drain(sock, 64):
                kind, seq = peek(frames[0])
                if kind == "GRAD":
                    acked[k] = max(acked[k], seq + 1)
                elif kind != "HEARTBEAT":
                    shared.sender_errors[0] += 1
            if not paused:
                fill(k)
    results.put(("experts", len(ids)))
    ctx.destroy(linger=0)


def reducer(endpoint: str, n_experts: int, shared: Shared, results: Any) -> None:
    """Answer every BATCH with a GRAD of zeros, one slice per present expert."""
    check_grad_header()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send_multipart(hello_reducer(n_experts, DIM))
    await_welcome(sock)
    zeros = bytes(ROWS * DIM * 4)
    specs: dict[int, list] = {}  # tensors in the BATCH -> the GRAD's tensor specs
    while not shared.stop.value:
        if not sock.poll(POLL_MS):
            continue
        for frames in drain(sock, 64):
            kind, seq = peek(frames[0])
            if kind != "BATCH":
                if kind != "HEARTBEAT":
                    shared.errors.value += 1
                continue
            n = len(frames) - 1
            spec = specs.get(n) or specs.setdefault(n, [[DTYPE, [ROWS, DIM]]] * n)
            sock.send_multipart([grad_header(seq, spec), *([zeros] * n)])
            shared.delivered.value += 1
    results.put(("reducer", 0))
    ctx.destroy(linger=0)


def _start(procs: Procs, n_experts: int, tmp: Path, *, cprofile: Path | None = None) -> Stack:
    """A broker for ``n_experts``, its reducer and its experts' load generator, paused."""
    shared = Shared(1)
    ports = free_ports(2)
    config = broker_config(
        tmp / "broker.yaml", n_experts=n_experts, embed_dim=DIM, ports=ports, window=WINDOW
    )
    broker = procs.broker(config, tmp / "broker.log", cprofile=cprofile).pid
    expert_ep, reducer_ep = (f"tcp://127.0.0.1:{p}" for p in ports)
    peers = (
        procs.fork(reducer, reducer_ep, n_experts, shared, procs.results).pid,
        procs.fork(experts, expert_ep, list(range(n_experts)), shared, procs.results).pid,
    )
    return Stack(str(n_experts), shared, broker, peers)


def session(
    counts: tuple[int, ...], *, rounds: int, duration: float, profile: Profile | None = None
) -> dict[int, list[dict]]:
    """A broker per expert count, all started at once; each round measures every one for
    ``duration`` s in turn, the others paused."""
    _, windows = measure_stacks(
        [str(n) for n in counts],
        lambda procs, name, tmp, cprofile: _start(procs, int(name), tmp, cprofile=cprofile),
        rounds=rounds,
        duration=duration,
        profile=profile,
    )
    return {n: [_figures(w, n) for w in windows[str(n)]] for n in counts}


def _figures(window: Window, n_experts: int) -> dict:
    steps_per_s = window.count / window.seconds
    cpu_per_step = window.main_cpu / window.count
    return {
        "steps_per_s": steps_per_s,
        "tokens_per_s": steps_per_s * n_experts,
        "broker_cpu_s_per_step": cpu_per_step,
        "broker_cpu_us_per_token": cpu_per_step / n_experts * 1e6,
        "broker_cpu_util": window.main_cpu / window.seconds,
        "loadgen_cpu_us_per_token": window.peers_cpu / window.count / n_experts * 1e6,
        "background_cores": window.background_cores,
    }


def run(*, repeats: int = 3, quick: bool = False) -> dict:
    """Every N measured ``repeats`` times, interleaved; medians with spreads, 64-vs-4 ratios."""
    if quick:
        repeats = 1
    duration = 0.7 if quick else 2.0
    began = time.monotonic()
    raw = session(EXPERTS, rounds=repeats, duration=duration)
    experts_fig = {
        str(n): {key: summary([r[key] for r in raw[n]]) for key in raw[n][0]} for n in EXPERTS
    }
    lo, hi = raw[EXPERTS[0]], raw[EXPERTS[-1]]
    scaling = [h["tokens_per_s"] / low["tokens_per_s"] for h, low in zip(hi, lo, strict=True)]
    cpu_scaling = [
        low["broker_cpu_us_per_token"] / h["broker_cpu_us_per_token"]
        for h, low in zip(hi, lo, strict=True)
    ]
    return {
        "scaling_64_vs_4": summary(scaling)["median"],
        "cpu_scaling_64_vs_4": summary(cpu_scaling)["median"],
        "scaling_64_vs_4_spread": summary(scaling),
        "cpu_scaling_64_vs_4_spread": summary(cpu_scaling),
        "experts": experts_fig,
        "settings": {
            "repeats": repeats,
            "quick": quick,
            "rows": ROWS,
            "embed_dim": DIM,
            "window": WINDOW,
            "phase": PHASE,
            "duration_s": duration,
            "load_generators": 1,
        },
        "elapsed_s": time.monotonic() - began,
    }


def table(result: dict) -> str:
    lines = [
        f"{'experts':>7} {'steps/s':>9} {'(min-max)':>15} {'tokens/s':>9} "
        f"{'cpu ms/step':>11} {'cpu us/token':>12} {'broker util':>11} {'bg cores':>8}"
    ]
    for n, f in result["experts"].items():
        lines.append(
            f"{n:>7} {f['steps_per_s']['median']:9.0f} "
            f"{f['steps_per_s']['min']:7.0f}-{f['steps_per_s']['max']:<7.0f} "
            f"{f['tokens_per_s']['median']:9.0f} "
            f"{f['broker_cpu_s_per_step']['median'] * 1e3:11.3f} "
            f"{f['broker_cpu_us_per_token']['median']:12.1f} "
            f"{f['broker_cpu_util']['median']:11.2f} {f['background_cores']['median']:8.2f}"
        )
    lines.append(
        f"scaling_64_vs_4 {result['scaling_64_vs_4']:.3f}   cpu_scaling_64_vs_4 "
        f"{result['cpu_scaling_64_vs_4']:.3f}   ({result['elapsed_s']:.0f} s)"
    )
    return "\n".join(lines)


def _profile(folder: Path, profiler: str) -> None:
    for n in (EXPERTS[0], EXPERTS[-1]):
        out = folder / f"broker-{n}-experts.{profiler}"
        fig = session((n,), rounds=1, duration=5.0, profile=Profile(profiler, out))[n][0]
        print(n, "experts:", {k: round(v, 6) for k, v in fig.items()})
        show_profile(f"broker, {n} experts", profiler, out)


def main(argv: list[str] | None = None) -> None:
    suite_main(
        argv,
        doc=__doc__,
        repeats=3,
        profile_help="instead: profile the broker at 4 and 64 experts into DIR",
        run=run,
        table=table,
        profile=_profile,
    )


if __name__ == "__main__":
    main()
