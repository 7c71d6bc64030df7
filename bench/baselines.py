"""Baselines for the end-to-end figure (issue #5): the reference model without TRACI.

Two ways to train exactly what TRACI trains (``bench.reference``), step for step as TRACI
computes it with ``window: 1`` (the expert sends its *target* net's embedding, the reducer's
gradient w.r.t. that embedding is applied to the *online* net, then a Polyak update):

* fused: every net in one process, torch using every core: ``traci_ml.core.reference``'s
  ``ReferenceTrainer``, the algorithm itself. The speed TRACI would have with no split at all.
* rpc: the same split as TRACI (one process per expert plus the reducer, one torch thread
  each) over ``torch.distributed.rpc`` (TensorPipe) and distributed autograd. What the
  off-the-shelf PyTorch tooling gives for the same job.

Both count train steps only (no evaluation) and time only after ``warmup`` steps. Rows come
from TRACI's own schedule, so every baseline sees the batches TRACI sees.

    python -m bench.baselines [--quick]     # samples/s at batch 64, 256 and 1024
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from torch import nn

from bench.e2e import free_ports
from bench.reference import reference_config
from traci_ml.core.config import Config, validate
from traci_ml.core.data import load_dataset, view_specs
from traci_ml.core.models.expert import build_expert, polyak_update
from traci_ml.core.models.reducer import build_reducer, dropout_mask, loss_and_metric
from traci_ml.core.reference import ReferenceData, ReferenceTrainer
from traci_ml.core.schedule import schedule_for, set_lr

ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZES = (64, 256, 1024)
# TRACI's services run one torch thread each (expert/reducer ``torch_threads: 1``): several
# processes share few cores, and more threads per process only oversubscribe them.
SERVICE_THREADS = 1
RPC_WORKER_THREADS = 4  # TensorPipe's default is 16; a few suffice for 4 peers on few cores
RPC_TIMEOUT_S = 60.0  # one rpc; a run whose peer died fails after this, not never
REDUCER, EXPERT = "reducer", "expert{}"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class RunResult:
    """One training run: its per-step losses and the wall time of the steps after warmup."""

    batch_size: int
    timed_steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    # {"online": state_dict, "target": state_dict} per expert, when asked for (tests)
    experts: list[dict[str, dict[str, torch.Tensor]]] = field(default_factory=list)

    @property
    def samples_per_sec(self) -> float:
        return self.timed_steps * self.batch_size / self.seconds


def bench_config(*, batch_size: int, steps: int) -> dict[str, Any]:
    """The reference model's config for a run of ``steps`` train steps (no evaluation rounds
    are run here, whatever the schedule says after the last train step)."""
    # run_dir is required by the config but never written: the baselines save nothing.
    return reference_config(
        batch_size=batch_size, steps=steps, run_dir=Path(tempfile.gettempdir()) / "traci-bench"
    )


def _state(online: nn.Module, target: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "online": {k: v.detach().clone() for k, v in online.state_dict().items()},
        "target": {k: v.detach().clone() for k, v in target.state_dict().items()},
    }


# ---------------------------------------------------------------- fused: one process


def run_fused(
    raw: dict[str, Any], *, warmup: int, threads: int | None = None, keep_state: bool = False
) -> RunResult:
    """``train.steps`` train steps of ``raw``'s model in this process; the first ``warmup``
    are not timed. ``threads``: torch intra-op threads (default: every core)."""
    config = validate(raw)
    steps = config.train.steps
    if not 0 <= warmup < steps:
        raise ValueError(f"warmup {warmup} must be in [0, steps {steps})")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        return _fused_loop(config, warmup=warmup, keep_state=keep_state)
    finally:
        torch.set_num_threads(previous_threads)


def _fused_loop(config: Config, *, warmup: int, keep_state: bool) -> RunResult:
    ds = load_dataset(config)
    data = ReferenceData(config, ds)
    trainer = ReferenceTrainer.for_dataset(config, ds)
    losses: list[float] = []
    started = time.perf_counter()
    for seq in range(config.train.steps):
        if seq == warmup:
            started = time.perf_counter()
        _, batch = data.batch(seq)  # the train views' rows of step seq
        losses.append(trainer.step(batch))
    seconds = time.perf_counter() - started
    return RunResult(
        batch_size=config.train.batch_size,
        timed_steps=config.train.steps - warmup,
        seconds=seconds,
        losses=losses,
        experts=[_state(o, t) for o, t in zip(trainer.online, trainer.target, strict=True)]
        if keep_state
        else [],
    )


def fused_samples_per_sec(
    *, batch_size: int, steps: int, warmup: int, threads: int | None = None
) -> float:
    """Train samples/s of the reference model in one process (threads: default every core)."""
    raw = bench_config(batch_size=batch_size, steps=warmup + steps)
    return run_fused(raw, warmup=warmup, threads=threads).samples_per_sec


# ---------------------------------------------------------------- rpc: the same split
#
# Design. Each expert process owns its online net, its target and its own Adam, as a TRACI
# expert does; the reducer process owns the reducer and drives the loop. Per step, inside one
# distributed-autograd context:
#   reducer --rpc(rows)--> expert i: token = target(x) + (online(x) - online(x).detach())
#   reducer: forward, loss, dist_autograd.backward -> dL/dtoken flows over rpc into online_i
#   reducer --rpc(context id)--> expert i: Adam on the context's gradients, then Polyak
#   reducer: its own Adam (overlapping the experts' updates), wait for the experts.
# The straight-through token has the target's value exactly (online - online.detach() is
# exactly 0) and the online net's gradient, which is TRACI's semantics. One "apply" rpc per
# expert does the optimizer step and the Polyak update together, as TRACI's expert does on a
# gradient; a DistributedOptimizer would do the same Adam with one rpc per expert, plus a
# second round of rpcs for Polyak. The next step starts after every update is applied
# (window 1), so the run is the fused computation, step for step.


class RpcExpert:
    """Lives in an expert process (built there by ``rpc.remote``); reads its own view."""

    def __init__(self, raw: dict[str, Any], expert_id: int) -> None:
        config = validate(raw)
        ds = load_dataset(config)
        self.x = torch.from_numpy(ds.view(expert_id, "train"))  # (n, F_i)
        rows = len(schedule_for(config, ds).fit_rows)
        self.online, self.target, self.opt = build_expert(config, expert_id, self.x.shape[1],
                                                          train_rows=rows)  # fmt: skip
        self.tau = config.expert.tau
        self.lr, self.train = config.expert.lr, config.train

    def forward(self, rows: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, d)
        x = self.x[rows]
        with torch.no_grad():
            value = self.target(x)
        out = self.online(x)
        return value + (out - out.detach())  # target's value, online's gradient

    def apply(self, context_id: int, index: int) -> None:
        grads = dist_autograd.get_gradients(context_id)
        for p in self.online.parameters():
            p.grad = grads.get(p)
        set_lr(self.opt, self.lr, index, self.train)
        self.opt.step()
        polyak_update(self.target, self.online, self.tau)

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        return _state(self.online, self.target)


def _on_owner(expert: rpc.RRef, method: str, *args: Any) -> Any:
    return getattr(expert.local_value(), method)(*args)


def _call(expert: rpc.RRef, method: str, *args: Any) -> torch.futures.Future:
    """``expert.method(*args)`` on its process. Not ``expert.rpc_async().method``: that proxy
    sends from a callback thread, outside the caller's distributed-autograd context, so the
    expert would receive no gradient (checked with torch 2.13)."""
    return rpc.rpc_async(expert.owner(), _on_owner, args=(expert, method, *args))


def _drive(spec: dict[str, Any]) -> RunResult:
    """The reducer process's loop (rank 0)."""
    config = validate(spec["config"])
    warmup = spec["warmup"]
    ds = load_dataset(config)
    sched = schedule_for(config, ds)
    n = ds.n_experts
    labels = torch.from_numpy(ds.y_train)
    experts = [rpc.remote(EXPERT.format(i), RpcExpert, args=(spec["config"], i)) for i in range(n)]
    reducer, r_opt = build_reducer(config, n_experts=n, out_dim=ds.out_dim,
                                   train_rows=len(sched.fit_rows))  # fmt: skip
    reducer.train()
    absent = torch.zeros(config.train.batch_size, n, dtype=torch.bool)
    losses: list[float] = []
    started = time.perf_counter()
    for seq in range(config.train.steps):
        if seq == warmup:
            started = time.perf_counter()
        step = sched.step(seq)
        rows = torch.as_tensor(sched.rows(step))  # (B,)
        with dist_autograd.context() as ctx:
            embedded = [_call(e, "forward", rows) for e in experts]
            tokens = torch.stack(torch.futures.wait_all(embedded), dim=1)  # (B, N, d)
            logits, _ = reducer(tokens, dropout_mask(config, absent, seq))
            loss, _ = loss_and_metric(ds.task, logits, labels[rows])
            dist_autograd.backward(ctx, [loss])
            applied = [_call(e, "apply", ctx, step.index) for e in experts]
            grads = dist_autograd.get_gradients(ctx)
            for p in reducer.parameters():
                p.grad = grads.get(p)
            set_lr(r_opt, config.reducer.lr, step.index, config.train)
            r_opt.step()
            torch.futures.wait_all(applied)
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    states = [_call(e, "state").wait() for e in experts] if spec["keep_state"] else []
    return RunResult(
        batch_size=config.train.batch_size,
        timed_steps=config.train.steps - warmup,
        seconds=seconds,
        losses=losses,
        experts=states,
    )


def _rpc_worker(rank: int, spec_path: Path) -> None:
    """One process of the rpc run: rank 0 drives (reducer), ranks 1.. are experts 0.."""
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=RPC_WORKER_THREADS,
        rpc_timeout=RPC_TIMEOUT_S,
        init_method=f"tcp://127.0.0.1:{spec['port']}",
    )
    name = REDUCER if rank == 0 else EXPERT.format(rank - 1)
    rpc.init_rpc(name, rank=rank, world_size=spec["world_size"], rpc_backend_options=options)
    try:
        if rank == 0:
            result = _drive(spec)
            torch.save(result.__dict__, spec["result"])
    except BaseException:
        rpc.shutdown(graceful=False)  # do not wait for peers that may be gone
        raise
    rpc.shutdown()  # graceful: waits until every process is done


def run_rpc(
    raw: dict[str, Any],
    *,
    warmup: int,
    threads: int = SERVICE_THREADS,
    keep_state: bool = False,
    timeout: float = 600.0,
) -> RunResult:
    """``raw``'s model split over ``n_experts + 1`` processes talking torch rpc; every process
    is killed if the run fails or exceeds ``timeout`` seconds."""
    config = validate(raw)
    if not 0 <= warmup < config.train.steps:
        raise ValueError(f"warmup {warmup} must be in [0, steps {config.train.steps})")
    world_size = len(view_specs(config.data)) + 1  # experts + the reducer
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),  # also for the rpc worker threads, where the nets run
        "TP_SOCKET_IFNAME": "lo",  # TensorPipe: listen on loopback, whatever the host has
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with tempfile.TemporaryDirectory(prefix="traci-rpc-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.pt"
        spec = {
            "config": raw,
            "warmup": warmup,
            "threads": threads,
            "keep_state": keep_state,
            "port": free_ports(1)[0],
            "world_size": world_size,
            "result": str(result_path),
        }
        spec_path.write_text(json.dumps(spec))
        logs = [Path(tmp) / f"rank{rank}.log" for rank in range(world_size)]
        run_processes(
            [
                [sys.executable, "-m", "bench.baselines", "--rpc-worker", str(rank), str(spec_path)]
                for rank in range(world_size)
            ],
            logs=logs,
            env=env,
            timeout=timeout,
        )
        return RunResult(**torch.load(result_path, weights_only=True))


def run_processes(
    commands: list[list[str]], *, logs: list[Path], env: dict[str, str], timeout: float
) -> None:
    """Run ``commands`` together; raise (after killing the rest) when one fails or time runs
    out. No process outlives this call."""
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout
    try:
        for command, log in zip(commands, logs, strict=True):
            with log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        command,
                        cwd=ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        preexec_fn=_die_with_parent,
                    )
                )
        while True:
            codes = [p.poll() for p in procs]  # every one: a failure may hide behind a runner
            failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                raise RuntimeError(f"rpc rank {failed[0]} failed:\n{_tail(logs[failed[0]])}")
            if None not in codes:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"rpc run exceeded {timeout:.0f}s:\n{_tail(logs[0])}")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it if this process dies first (Linux), so a run
    whose driver is killed (no ``finally``) still leaves nothing behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def rpc_samples_per_sec(
    *, batch_size: int, steps: int, warmup: int, threads: int = SERVICE_THREADS
) -> float:
    """Train samples/s of the reference model split over torch rpc (threads per process)."""
    raw = bench_config(batch_size=batch_size, steps=warmup + steps)
    return run_rpc(raw, warmup=warmup, threads=threads).samples_per_sec


# ---------------------------------------------------------------- CLI


def measure(run: Callable[[], float], repeats: int) -> tuple[float, float, float]:
    """(median, min, max) of ``repeats`` calls of ``run``."""
    values = [run() for _ in range(repeats)]
    return statistics.median(values), min(values), max(values)


def steps_for(batch_size: int, samples: int) -> int:
    """Enough steps to see ``samples`` samples (at least 20), so each size runs a similar time."""
    return max(20, samples // batch_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and one repetition")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (default 3)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--rpc-worker", nargs=2, metavar=("RANK", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rpc_worker:
        _rpc_worker(int(args.rpc_worker[0]), Path(args.rpc_worker[1]))
        return
    samples, warmup = (12_800, 5) if args.quick else (51_200, 10)
    repeats = args.repeats or (1 if args.quick else 3)
    print(f"samples/s, median [min-max] of {repeats}; {os.cpu_count()} cores")
    print(f"{'batch':>6} {'fused':>24} {'rpc':>24}")
    for batch in args.batch_sizes:
        steps = steps_for(batch, samples)
        row = []
        for samples_per_sec in (fused_samples_per_sec, rpc_samples_per_sec):
            run = functools.partial(samples_per_sec, batch_size=batch, steps=steps, warmup=warmup)
            median, low, high = measure(run, repeats)
            row.append(f"{median:8.0f} [{low:.0f}-{high:.0f}]")
        print(f"{batch:>6} {row[0]:>24} {row[1]:>24}", flush=True)


if __name__ == "__main__":
    main()
