"""TRACI end to end: the reference model through `traci up` (six real processes, real broker).

Samples/s are taken from the reducer's own ``metrics.jsonl`` records (wall-clock ``time`` and
train ``step``) between the record at ``warmup`` steps and the last one, so process start-up,
registration and the final evaluation are not counted -- the same window the baselines time.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.reference import reference_config

LOWEST_PORT = 20000  # where free_ports starts looking
EXPERT_BLOCK = 16  # consecutive ports held for experts' metrics (expert i: base + i)


def _ephemeral_low() -> int:
    """The first port the kernel hands out as a connection's source port (Linux: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, *, block: int = 1, avoid: Iterable[int] = ()) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now, each the first of ``block`` consecutive
    free ones (expert i serves metrics on base + i), none in ``avoid``. Drawn below the
    kernel's ephemeral range: a port checked free there can be taken, before the service
    binds it, as the source port of any loopback connection (every ZeroMQ connect makes
    one; a CI run lost a test to exactly that). Where that range starts too low, the
    kernel's own free ports (bind to 0)."""
    top = _ephemeral_low() - block
    if top - LOWEST_PORT < 1000:
        return _kernel_ports(n) if block == 1 else [_kernel_block(block) for _ in range(n)]
    rng = random.Random()
    taken, ports = set(avoid), []
    for _ in range(100 * n + 100):
        base = rng.randrange(LOWEST_PORT, top)
        span = set(range(base, base + block))
        if span & taken or not all(_bindable(p) for p in span):
            continue
        ports.append(base)
        taken |= span
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free port(s) in blocks of {block} below {top + block}")


def _kernel_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kernel_block(n: int) -> int:
    for _ in range(200):
        (base,) = _kernel_ports(1)
        if base + n <= 65535 and all(_bindable(p) for p in range(base, base + n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


def free_port_block(n: int) -> int:
    """The first of ``n`` consecutive ports free on 127.0.0.1 now (expert i serves metrics on
    base + i)."""
    return free_ports(1, block=n)[0]


def traci_samples_per_sec(
    *,
    batch_size: int,
    steps: int,
    warmup: int,
    window: int = 2,
    extra: dict | None = None,
    timeout: float = 600,
) -> dict[str, Any]:
    """One `traci up` run of the reference model; returns samples/s and the run's summary."""
    from bench.cluster import run_cluster, train_rate

    cfg = reference_config(batch_size=batch_size, steps=steps, window=window)
    for section, values in (extra or {}).items():
        cfg.setdefault(section, {}).update(values)
    records, summary = run_cluster(cfg, timeout=timeout)
    return {"samples_per_sec": train_rate(records, batch_size, warmup),
            "steps": summary["steps"], "test_accuracy": summary.get("test_accuracy")}  # fmt: skip


if __name__ == "__main__":
    for b in (64, 256, 1024):
        r = traci_samples_per_sec(batch_size=b, steps=300, warmup=50)
        print(f"batch {b:5d}: {r['samples_per_sec']:9.0f} samples/s")
