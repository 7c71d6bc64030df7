"""Network namespaces joined by one Linux bridge: a small private network for a test.

``Lab`` makes a hub namespace that holds a bridge, then one namespace per host, each joined
to the bridge by a veth pair (``eth0`` inside the host, ``v<host>`` on the hub) with one
address in a private /24 of 10.213.0.0/16. Nothing is added to the namespace the test runs
in, and no namespace has a route beyond its /24: traffic goes only between the lab's own
addresses. ``close`` stops every process the lab started, then deletes every namespace it
made; call it in a finalizer.

Needs root and a working ``ip netns`` (iproute2): ``unavailable()`` says why not.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["Lab", "unavailable"]

IP = "ip"


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    proc = subprocess.run([IP, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which(IP) is None:
        return "`ip` (iproute2) is not installed: deploy/ci/install-netns.sh"
    probe = f"traci-probe-{os.getpid()}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` fails: {made.stderr.strip()}"
        link = _ip("-n", probe, "link", "add", "br-probe", "type", "bridge", check=False)
        if link.returncode != 0:
            return f"cannot make a bridge in a namespace: {link.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` unusable: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class Lab:
    """A hub namespace with a bridge and hosts on it; see the module docstring."""

    def __init__(self, tag: str = "traci") -> None:
        self.prefix = f"{tag}-{os.getpid()}-"
        # Random-ish, so that concurrent labs are told apart in logs (they never collide:
        # each lab's bridge is its own).
        self.subnet = f"10.213.{random.SystemRandom().randint(1, 254)}"
        self.hub = self.prefix + "hub"
        self.hosts: dict[str, str] = {}  # host -> its address
        self._namespaces: list[str] = []
        self._procs: list[tuple[subprocess.Popen, IO[Any] | None]] = []
        try:
            self._netns("add", self.hub)
            _ip("-n", self.hub, "link", "set", "lo", "up")
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _netns(self, verb: str, name: str) -> None:
        _ip("netns", verb, name)
        if verb == "add":
            self._namespaces.append(name)

    def ns(self, host: str) -> str:
        return self.prefix + host

    def add(self, host: str) -> str:
        """A new namespace for ``host``, on the bridge; returns its address."""
        number = len(self.hosts) + 1
        if number > 250 or len(host) > 14:
            raise ValueError(f"host {host!r}: at most 250 hosts of up to 14 characters")
        ns, hub_end = self.ns(host), f"v{host}"
        address = f"{self.subnet}.{number}"
        self._netns("add", ns)
        # Made in the hub with the other end put straight into the host: the namespace the
        # test runs in never holds either end, not even for a moment.
        _ip("-n", self.hub, "link", "add", hub_end, "type", "veth", "peer", "name", "eth0",
            "netns", ns)  # fmt: skip
        _ip("-n", self.hub, "link", "set", hub_end, "master", "br0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        self.hosts[host] = address
        return address

    def argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return [IP, "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.argv(host, argv), **kwargs)

    def popen(
        self, host: str, argv: Sequence[str], *, log: Path, **kwargs: Any
    ) -> subprocess.Popen:
        """Start ``argv`` in ``host``'s namespace, stdout and stderr to ``log``. ``ip netns
        exec`` execs the command, so the Popen's pid is the command's own."""
        out = open(log, "wb")  # closed by close()
        try:
            proc = subprocess.Popen(
                self.argv(host, argv), stdout=out, stderr=subprocess.STDOUT, **kwargs
            )
        except BaseException:
            out.close()
            raise
        self._procs.append((proc, out))
        return proc

    def link_stats(self, host: str) -> dict[str, int]:
        """``eth0``'s counters in ``host`` (rx_bytes, tx_bytes, ...)."""
        shown = _ip("-n", self.ns(host), "-j", "-s", "link", "show", "eth0")
        stats = json.loads(shown.stdout)[0]["stats64"]
        return {f"{way}_{k}": v for way in ("rx", "tx") for k, v in stats[way].items()}

    def close(self, timeout: float = 10.0) -> None:
        """Stop every process started here (SIGTERM, then SIGKILL), delete every namespace."""
        for proc, _ in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc, out in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if out is not None:
                out.close()
        errors = []
        for ns in reversed(self._namespaces):
            # Anything still inside (a child of a process started here) would keep the
            # namespace alive after its name is gone: end it by its pid first.
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            deleted = _ip("netns", "del", ns, check=False)
            if deleted.returncode != 0:
                errors.append(f"{ns}: {deleted.stderr.strip()}")
        self._namespaces.clear()
        self._procs.clear()
        if errors:
            raise RuntimeError("namespaces not deleted: " + "; ".join(errors))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
