"""The tests' and benches' free loopback ports (bench/e2e.py ``free_ports``): drawn below the
kernel's ephemeral range, where no loopback connection's source port can take them between
the check and the service's bind; blocks (expert i's metrics on base + i) checked whole."""

from __future__ import annotations

import socket

from bench.e2e import _ephemeral_low, free_port_block, free_ports


def test_ports_are_distinct_free_and_below_the_ephemeral_range() -> None:
    ports = free_ports(8)
    assert len(set(ports)) == 8
    assert all(20000 <= p < _ephemeral_low() for p in ports)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free: binds


def test_blocks_are_free_whole_and_keep_out_of_each_other_and_avoid() -> None:
    avoid = free_ports(3)
    bases = free_ports(4, block=16, avoid=avoid)
    spans = [set(range(b, b + 16)) for b in bases]
    everything = set().union(*spans)
    assert len(everything) == 64 and not everything & set(avoid)
    assert max(everything) < _ephemeral_low()
    held = []
    try:
        for p in sorted(everything):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", p))
    finally:
        for s in held:
            s.close()
    assert free_port_block(16) + 16 <= _ephemeral_low()
