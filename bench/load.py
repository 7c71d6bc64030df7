"""Load generators and process plumbing shared by ``bench/transport.py`` and ``bench/scaling.py``.

Everything a measurement starts is a separate process: the real broker (``traci broker``, a
subprocess) and the fake peers (forked ``multiprocessing`` children). ``Procs`` owns them all
and stops them on exit, error or not; every child also asks the kernel to kill it if the
benchmark process dies (``PR_SET_PDEATHSIG``), so no peer outlives a crash.

The fake peers speak ``traci_ml.proto`` but stay lean, because on a 2-core machine every
microsecond they spend is taken from the process being measured:

* headers are packed by ``Headers`` (plain ``msgpack.packb`` of the same map ``proto.encode``
  builds; checked against ``encode`` once at start-up),
* received messages are read by their header only (``peek``): the broker validates
  everything, the load generators do not re-validate what it forwards,
* tensor frames are one preallocated buffer sent with ``copy=False`` again and again.

Parent and children share a few numbers through ``Shared`` (raw shared memory, no locks: each
field has one writer) and hand back their timing arrays through a ``multiprocessing`` queue.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import yaml
import zmq

from bench.e2e import free_ports
from traci_ml.proto import Ack, Emb, Grad, Hello, Tensor, encode

RUN_ID = "bench"
DTYPE = "float32"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_FORK = mp.get_context("fork")  # children inherit Shared and start in milliseconds


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def endpoints(n: int) -> list[str]:
    return [f"tcp://127.0.0.1:{port}" for port in free_ports(n)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads (zmq I/O too)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14, 15


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (``/proc/stat``): with our own
    processes' CPU subtracted, how much the rest of the machine took during a measurement."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median with the spread over repeats (and the values themselves)."""
    arr = np.asarray(values, dtype=float)
    return {
        "median": float(np.median(arr)),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "values": [round(float(v), 6) for v in arr],
    }


def percentiles_us(latencies_ns: np.ndarray) -> dict[str, float]:
    p50, p99 = np.percentile(latencies_ns, [50, 99]) / 1e3
    return {"p50_us": float(p50), "p99_us": float(p99)}


def broker_config(
    path: Path, *, n_experts: int, embed_dim: int, ports: Sequence[int], window: int
) -> Path:
    """Write a broker config: ``n_experts`` synthetic views, metrics endpoint off.

    Liveness is long because the fake peers never send HEARTBEAT (their traffic keeps them
    alive once running); ``max_pending_steps`` leaves room for every expert's window.
    """
    cfg = {
        "run_id": RUN_ID,
        "embed_dim": embed_dim,
        "data": {
            "source": "synthetic",
            "views": "even",
            "synthetic": {"rows": 64, "features": n_experts, "classes": 2, "experts": n_experts},
        },
        "expert": {"window": window, "dtype": DTYPE, "step_timeout": 60.0},
        "reducer": {"heads": 1},
        "network": {
            "expert_port": ports[0],
            "reducer_port": ports[1],
            "heartbeat_interval": 0.5,
            "liveness": 60.0,
            "max_pending_steps": max(256, 4 * window),
        },
        "metrics": {"broker_port": 0, "reducer_port": 0, "expert_base_port": 0},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the benchmark process dies (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child(target: Callable[..., None], args: tuple[Any, ...]) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    target(*args)


class Procs:
    """Every process of one measurement. Use as a context manager: ``close`` always runs."""

    def __init__(self) -> None:
        self.children: list[mp.Process] = []
        self.popens: list[subprocess.Popen] = []  # brokers
        self.tools: list[subprocess.Popen] = []  # profilers: may end on their own
        self.results: mp.Queue = _FORK.Queue()

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fork(self, target: Callable[..., None], *args: Any) -> mp.Process:
        proc = _FORK.Process(target=_child, args=(target, args), daemon=True)
        proc.start()
        self.children.append(proc)
        return proc

    def broker(self, config: Path, log: Path, *, cprofile: Path | None = None) -> subprocess.Popen:
        """``traci broker --config`` as its own process, its log in ``log``; with ``cprofile``,
        under cProfile (see ``_profiled``), dumping into that file when it exits."""
        wrap = ["bench.load", "cprofile", str(cprofile)] if cprofile else ["traci_ml.app.cli"]
        args = ["broker", "--config", str(config), "--log-level", "WARNING"]
        cmd = [sys.executable, "-m", *wrap, *args]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
        self.popens.append(proc)
        return proc

    def pyspy(self, pid: int, out: Path, seconds: float, *, gil: bool) -> subprocess.Popen:
        """Sample ``pid`` with py-spy for ``seconds`` (raw collapsed stacks into ``out``);
        with ``gil``, only samples where it holds the GIL (runs Python code).

        ``--nonblocking`` leaves the target running while sampled, so the figures of a
        profiled run stay close to an unprofiled one (py-spy itself takes some CPU)."""
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        cmd = [exe, "record", "--nonblocking", "-r", "250", "-f", "raw", "-p", str(pid),
               "-d", str(math.ceil(seconds)), "-o", str(out)]  # fmt: skip
        if gil:
            cmd.append("--gil")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
        self.tools.append(proc)
        return proc

    def stop_broker(self, timeout: float = 10.0) -> None:
        """SIGTERM the broker and wait for its clean exit (a cProfile'd one then dumps)."""
        for proc in self.popens:
            proc.terminate()
            proc.wait(timeout)

    def pids(self) -> list[int]:
        return [p.pid for p in (*self.popens, *self.tools)] + [c.pid for c in self.children]

    def result(self, timeout: float = 30.0) -> Any:
        return self.results.get(timeout=timeout)

    def check_alive(self) -> None:
        for proc in self.popens:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited early with {proc.returncode}")
        for child in self.children:
            if not child.is_alive() and child.exitcode not in (0, None):
                raise RuntimeError(f"a load-generator process exited with {child.exitcode}")

    def close(self) -> None:
        """SIGTERM everything (the broker says GOODBYE and exits), SIGKILL what lingers."""
        for proc in (*self.popens, *self.tools):
            if proc.poll() is None:
                proc.terminate()
        for child in self.children:
            if child.is_alive():
                child.terminate()
        deadline = time.monotonic() + 3.0
        for proc in (*self.popens, *self.tools):
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for child in self.children:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join()
        self.results.close()
        self.results.join_thread()


class Shared:
    """Numbers the parent and the forked peers of one stack share. One writer per field."""

    def __init__(self, n_senders: int = 1) -> None:
        self.stop = _FORK.RawValue(ctypes.c_bool, False)  # parent -> everyone: exit
        self.paused = _FORK.RawValue(ctypes.c_bool, True)  # parent -> senders: send nothing new
        self.delivered = _FORK.RawValue(ctypes.c_longlong, 0)  # receiver: tensors (or steps)
        self.ready = _FORK.RawArray(ctypes.c_bool, n_senders)  # each sender: registered
        self.errors = _FORK.RawValue(ctypes.c_longlong, 0)  # receiver: unexpected messages
        self.sender_errors = _FORK.RawArray(ctypes.c_longlong, n_senders)


@dataclass(frozen=True)
class Stack:
    """One system under test, started and paused: its shared numbers, the process measured
    (broker or forwarder; None for direct) and its load generators."""

    name: str
    shared: Shared
    main: int | None
    peers: tuple[int, ...]


@dataclass(frozen=True)
class Window:
    """What happened during one measured window."""

    seconds: float
    count: int  # delivered messages (or steps)
    main_cpu: float  # CPU seconds of the process under test (broker or forwarder)
    peers_cpu: float  # CPU seconds of the load generators
    background_cores: float  # cores' worth of CPU the rest of the machine used meanwhile


def measure_window(stack: Stack, duration: float, *, ours: Sequence[int] = ()) -> Window:
    """Read the stack's counter and CPU clocks, sleep ``duration``, read them again.

    ``ours``: every process of the benchmark (paused stacks included), left out of the
    background figure."""

    def read() -> tuple[float, int, float, float, float, float]:
        main_cpu = cpu_seconds(stack.main) if stack.main else 0.0
        peers_cpu = sum(cpu_seconds(pid) for pid in stack.peers)
        ours_cpu = sum(cpu_seconds(pid) for pid in ours)
        now, count = time.monotonic(), stack.shared.delivered.value
        return now, count, main_cpu, peers_cpu, ours_cpu, machine_busy_seconds()

    t0, n0, m0, p0, o0, b0 = read()
    time.sleep(duration)
    t1, n1, m1, p1, o1, b1 = read()
    seconds = t1 - t0
    background = max(0.0, (b1 - b0) - (o1 - o0)) / seconds
    return Window(seconds, n1 - n0, m1 - m0, p1 - p0, background)


def interleave(
    procs: Procs,
    stacks: list[Stack],
    *,
    rounds: int,
    duration: float,
    settle: float = 0.3,
    profile: Profile | None = None,
) -> dict[str, list[Window]]:
    """Measure every stack ``rounds`` times for ``duration`` s, one unpaused at a time.

    Each round visits the stacks in a rotated order; ``settle`` s after unpausing lets the
    previous stack drain and this one fill its windows. With a py-spy ``profile``, the
    process under test is sampled during its first window."""
    for stack in stacks:
        what = f"{stack.name}: peers registered"
        wait_until(lambda s=stack: all(s.shared.ready), procs, timeout=60, what=what)
    ours = [os.getpid(), *procs.pids()]
    windows: dict[str, list[Window]] = {stack.name: [] for stack in stacks}
    for r in range(rounds):
        for stack in stacks[r % len(stacks) :] + stacks[: r % len(stacks)]:
            stack.shared.paused.value = False
            delivered = stack.shared.delivered
            what = f"{stack.name}: first delivery"
            wait_until(lambda d=delivered: d.value > 0, procs, timeout=30, what=what)
            time.sleep(settle)
            spy = None
            if profile and profile.tool.startswith("pyspy") and stack.main and r == 0:
                gil = profile.tool == "pyspy"
                spy = procs.pyspy(stack.main, profile.out, duration, gil=gil)
            windows[stack.name].append(measure_window(stack, duration, ours=ours))
            stack.shared.paused.value = True
            if spy is not None:
                spy.wait(duration + 30)
    procs.check_alive()
    return windows


def stop_stacks(procs: Procs, stacks: list[Stack], logs: Path) -> None:
    """Stop the stacks, take every peer's final report, and fail if any peer saw a message
    it should not have (a DROP or GOODBYE: the harness, not the broker, is wrong then).
    ``logs / <stack name> / broker.log`` is quoted when there is one."""
    for stack in stacks:
        stack.shared.stop.value = True
    for _ in range(sum(len(stack.peers) for stack in stacks)):
        procs.result()
    for stack in stacks:
        errors = stack.shared.errors.value + sum(stack.shared.sender_errors)
        if errors:
            log = logs / stack.name / "broker.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{stack.name}: {errors} unexpected messages\n{tail}")


@contextlib.contextmanager
def started(
    names: Sequence[str], start: Callable[[Procs, str, Path], Stack]
) -> Iterator[tuple[Procs, list[Stack], Path]]:
    """``start(procs, name, folder)`` for each name, each in its own folder of a fresh temporary
    one; yields the processes, the stacks and that temporary folder, all stopped on exit."""
    with Procs() as procs, tempfile.TemporaryDirectory(prefix="traci-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        stacks = []
        for name in names:
            (tmp / name).mkdir()
            stacks.append(start(procs, name, tmp / name))
        yield procs, stacks, tmp


def measure_stacks(
    names: Sequence[str],
    start: Callable[[Procs, str, Path, Path | None], Stack],
    *,
    rounds: int,
    duration: float,
    profile: Profile | None = None,
) -> tuple[list[Stack], dict[str, list[Window]]]:
    """A stack per name, all started at once (``start(procs, name, folder, cprofile)``, the
    last the broker's cProfile output or None); ``interleave``d, then stopped."""
    cprofile = profile.out if profile and profile.tool == "cprofile" else None
    with started(names, lambda p, name, tmp: start(p, name, tmp, cprofile)) as (procs, stacks, tmp):
        windows = interleave(procs, stacks, rounds=rounds, duration=duration, profile=profile)
        stop_stacks(procs, stacks, tmp)
        if cprofile is not None:
            procs.stop_broker()
    return stacks, windows


def wait_until(condition: Callable[[], bool], procs: Procs, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        procs.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------------------
# The wire, lean
# --------------------------------------------------------------------------------------


class Headers:
    """Pack EMB/ACK/GRAD headers exactly as ``proto.encode`` does, without building messages."""

    def __init__(self, *, expert_id: int, rows: int, dim: int, phase: str) -> None:
        self.expert_id, self.phase = expert_id, phase
        self.spec = [[DTYPE, [rows, dim]]]
        probe = Tensor.from_numpy(np.zeros((rows, dim), np.float32))
        if self.emb(7) != encode(Emb(7, expert_id, phase, probe))[0]:
            raise RuntimeError("bench header packing disagrees with proto.encode")
        if ack(7) != encode(Ack(7))[0]:
            raise RuntimeError("bench ACK packing disagrees with proto.encode")

    def emb(self, seq: int) -> bytes:
        return msgpack.packb(
            {
                "v": 1,
                "k": "EMB",
                "seq": seq,
                "expert_id": self.expert_id,
                "phase": self.phase,
                "t": self.spec,
            }
        )


def ack(seq: int) -> bytes:
    return msgpack.packb({"v": 1, "k": "ACK", "seq": seq})


def grad_header(seq: int, specs: list[list[Any]]) -> bytes:
    """The reducer's GRAD: one tensor per present expert, ``expert_id`` -1."""
    return msgpack.packb({"v": 1, "k": "GRAD", "seq": seq, "expert_id": -1, "t": specs})


def check_grad_header() -> None:
    probe = Tensor.from_numpy(np.zeros((2, 3), np.float32))
    if grad_header(5, [[DTYPE, [2, 3]]] * 2) != encode(Grad(5, -1, (probe, probe)))[0]:
        raise RuntimeError("bench GRAD packing disagrees with proto.encode")


def peek(header: bytes | memoryview) -> tuple[str, int]:
    """(kind, seq) of a received header; seq is -1 for kinds without one."""
    fields = msgpack.unpackb(header)
    return fields["k"], fields.get("seq", -1)


def drain(sock: Any, most: int, *, copy: bool = True) -> Iterator[list]:
    """Up to ``most`` multipart messages ``sock`` holds now, without waiting for more."""
    for _ in range(most):
        try:
            yield sock.recv_multipart(zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            return


def hello_expert(expert_id: int, dim: int, window: int) -> list[bytes]:
    hello = Hello("expert", RUN_ID, dim, DTYPE, expert_id=expert_id, window=window)
    return encode(hello)


def hello_reducer(n_experts: int, dim: int) -> list[bytes]:
    return encode(Hello("reducer", RUN_ID, dim, DTYPE, n_experts=n_experts))


def await_welcome(sock: Any, *, timeout: float = 60.0) -> int:
    """Wait for WELCOME (ignoring HEARTBEAT); return its start_seq or raise on a refusal."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sock.poll(100):
            continue
        fields = msgpack.unpackb(sock.recv_multipart()[0])
        if fields["k"] == "WELCOME":
            if not fields["ok"]:
                raise RuntimeError(f"broker refused HELLO: {fields['reason']}")
            return int(fields["start_seq"])
    raise RuntimeError("no WELCOME from the broker")


# --------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How to profile the process under test while it is measured.

    ``pyspy``: py-spy samples of its Python thread while it holds the GIL, i.e. runs Python
    code: where its Python CPU goes (time inside libzmq calls, which release the GIL, is not
    in it). ``pyspy-wall``: every sample of a non-idle thread; on a busy 2-core machine this
    is dominated by time spent preempted, which lands on ``Socket.send`` (the send that woke
    another thread). ``cprofile``: the broker runs under cProfile timed by
    ``time.thread_time`` (CPU of its main thread); exact call counts, heavy call overhead."""

    tool: str  # "pyspy" | "pyspy-wall" | "cprofile"
    out: Path


def _profiled(out: str, argv: list[str]) -> int:
    """``python -m bench.load cprofile OUT <traci args>``: traci under cProfile, CPU-timed."""
    import cProfile

    from traci_ml.app.cli import main

    profiler = cProfile.Profile(time.thread_time)
    try:
        return profiler.runcall(main, argv)
    finally:
        profiler.dump_stats(out)


def print_cprofile(title: str, path: Path, *, top: int = 25) -> None:
    """The ``top`` functions by own CPU time and by cumulative CPU time, in % of the total."""
    import pstats

    stats = pstats.Stats(str(path))
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = stats.stats.items()  # type: ignore[attr-defined]

    def name(key: tuple[str, int, str]) -> str:
        file, _, fn = key
        return f"{fn} ({'/'.join(Path(file).parts[-2:])})"

    by_own = sorted(rows, key=lambda kv: -kv[1][2])[:top]
    by_cum = sorted(rows, key=lambda kv: -kv[1][3])[:top]
    print(f"--- {title}: {total:.2f} CPU s in the main thread; own%  calls  |  cumulative%")
    for (k1, v1), (k2, v2) in zip(by_own, by_cum, strict=True):
        own = f"{100 * v1[2] / total:5.1f} {v1[1]:>8} {name(k1)[:52]:52}"
        print(f"{own} | {100 * v2[3] / total:5.1f} {name(k2)[:52]}")


def hot_functions(raw: Path, *, top: int = 20) -> dict[str, Any]:
    """Share of samples per function in py-spy raw output: ``self`` (leaf) and ``total``
    (anywhere on the stack), as (percent, "function (file)") pairs, largest first."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        frames = [re.sub(r" \((.*?):\d+\)", r" (\1)", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n

    def share(counter: collections.Counter[str]) -> list[tuple[float, str]]:
        return [(round(100 * n / samples, 1), f) for f, n in counter.most_common(top)]

    return {"samples": samples, "self": share(own), "total": share(total)}


def print_profile(title: str, profile: dict) -> None:
    print(f"--- {title}: {profile['samples']} samples; self%  |  total%")
    for (s_pct, s_fn), (t_pct, t_fn) in zip(profile["self"], profile["total"], strict=False):
        print(f"{s_pct:5.1f}  {s_fn[:60]:60}  | {t_pct:5.1f}  {t_fn[:60]}")


def show_profile(title: str, profiler: str, out: Path) -> None:
    """Print the profile ``out`` that ``profiler`` (a ``Profile.tool``) wrote."""
    if profiler.startswith("pyspy"):
        print_profile(title, hot_functions(out))
    else:
        print_cprofile(title, out)


# --------------------------------------------------------------------------------------
# The command line of transport and scaling
# --------------------------------------------------------------------------------------


def suite_main(
    argv: list[str] | None,
    *,
    doc: str,
    repeats: int,
    profile_help: str,
    run: Callable[..., dict],
    table: Callable[[dict], str],
    profile: Callable[[Path, str], None],
) -> None:
    """``[--quick] [--repeats N] [--json FILE]``: ``run`` the suite and print its ``table``;
    ``--profile DIR [--profiler ...]``: ``profile(DIR, profiler)`` instead."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short repeat")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--json", type=Path, help="also write the full result here")
    parser.add_argument("--profile", type=Path, metavar="DIR", help=profile_help)
    parser.add_argument("--profiler", choices=("pyspy", "pyspy-wall", "cprofile"), default="pyspy")
    args = parser.parse_args(argv)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        profile(args.profile, args.profiler)
        return
    result = run(repeats=args.repeats, quick=args.quick)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "cprofile":
        sys.exit("usage: python -m bench.load cprofile OUT <traci arguments>")
    sys.exit(_profiled(sys.argv[2], sys.argv[3:]))
