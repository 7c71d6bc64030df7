"""The GPU path, checked on one CUDA device in a few minutes (issue 12 part 5).

Two runs of the same config (default ``examples/digits.yaml``) on the same device, every net on
the device and the embeddings (and gradients) rounded to ``bfloat16`` on the wire:

1. TRACI: ``traci up`` with ``expert.device`` and ``reducer.device`` set (broker, reducer and
   four experts as real processes over tcp loopback). Samples/s from the reducer's
   ``metrics.jsonl`` after ``warmup`` train steps (``bench.cluster.train_rate``); the accuracy
   is ``summary.json``'s ``test_accuracy``.
2. fused: the same algorithm in this process (``traci_ml.core.reference.ReferenceTrainer``,
   every net moved to the device), over the same schedule; samples/s over the same window
   (train step ``warmup`` to the last train step, eval rounds in between included, as the
   reducer's records count them); the accuracy is the last eval round (the whole test split).

Both figures and the ratio are printed and written to ``--out`` (JSON). Without a CUDA device
it says so and exits with code 2; ``--device cpu`` runs the same code on the CPU (a dry run,
written to ``bench/results/gpu-dryrun.json`` unless ``--out`` says otherwise).

    python -m bench.gpu_check                       # make gpu-check
    python -m bench.gpu_check --device cpu --steps 40
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from traci_ml.core.config import Config, validate
from traci_ml.core.data import load_dataset
from traci_ml.core.errors import ConfigError
from traci_ml.core.files import write_json_atomic
from traci_ml.core.reference import Batch, ReferenceData, ReferenceTrainer
from traci_ml.core.tensors import resolve_device

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "examples" / "digits.yaml"
GPU_OUT = ROOT / "bench" / "results" / "gpu.json"
DRY_RUN_OUT = ROOT / "bench" / "results" / "gpu-dryrun.json"
WIRE_DTYPE = "bfloat16"
BUDGET_S = 300  # the whole check should fit in 5 minutes on one GPU
NO_CUDA = 2  # exit code: asked for CUDA, none visible


class NoCuda(Exception):
    """``--device cuda`` but torch sees no CUDA device."""


def check_device(device: str) -> torch.device:
    """The device to run on (``core.tensors.resolve_device``, the services' own rule); raises
    ``NoCuda`` with the reason and what to do when CUDA is asked for and absent."""
    try:
        return resolve_device(device)
    except ConfigError as exc:
        if device.startswith("cuda") and not torch.cuda.is_available():
            build = (f"built with CUDA {torch.version.cuda}" if torch.version.cuda
                     else "a CPU-only build")  # fmt: skip
            raise NoCuda(
                f"no CUDA device is visible (torch {torch.__version__}, {build}). Run it on a "
                "machine with a GPU and a CUDA build of torch, or pass --device cpu for a dry "
                "run of the same code path on the CPU."
            ) from None
        raise NoCuda(str(exc)) from None


def build_config(
    config_path: Path, *, device: str, dtype: str = WIRE_DTYPE, steps: int | None = None
) -> dict[str, Any]:
    """The run's config dict: ``config_path`` with every service on ``device``, ``dtype`` on
    the wire, ``steps`` train steps (default: the config's), no restarts (a crash must show)."""
    raw: dict[str, Any] = yaml.safe_load(Path(config_path).read_text())
    raw.setdefault("expert", {}).update(device=device, dtype=dtype)
    raw.setdefault("reducer", {})["device"] = device
    train = raw.setdefault("train", {})
    if steps is not None:
        train["steps"] = steps
    cfg = validate(raw).train
    # at least ~10 train records, so that samples/s has a window after warmup
    train["log_every"] = max(1, min(cfg.log_every, cfg.steps // 10))
    raw["launcher"] = {**raw.get("launcher", {}), "restart": "never"}
    validate(raw)  # fail here, not in six processes
    return raw


def warmup_steps(steps: int) -> int:
    """Train steps not timed (CUDA context, kernel selection, allocator): a fifth, at most 100."""
    return min(100, steps // 5)


# ---------------------------------------------------------------- TRACI: traci up


def run_traci(raw: dict[str, Any], *, warmup: int, timeout: float) -> dict[str, Any]:
    from bench.cluster import run_cluster, train_rate

    started = time.monotonic()
    records, summary = run_cluster(raw, timeout=timeout)
    batch_size = validate(raw).train.batch_size
    return {
        "samples_per_sec": train_rate(records, batch_size, warmup),
        "test_accuracy": summary.get("test_accuracy"),
        "steps": summary.get("steps"),
        "wall_seconds": round(time.monotonic() - started, 1),
    }


# ---------------------------------------------------------------- fused: one process


class DeviceTrainer(ReferenceTrainer):
    """``ReferenceTrainer`` with every net on ``device`` (built seeded on the CPU, then moved,
    as the services build theirs). The batches must be on ``device`` too (``device_batch``)."""

    def __init__(self, config: Config, *, in_dims: list[int], out_dim: int, task: str,
                 device: torch.device, train_rows: int | None = None) -> None:  # fmt: skip
        super().__init__(config, in_dims=in_dims, out_dim=out_dim, task=task,
                         train_rows=train_rows)  # fmt: skip
        self.device = device
        # Module.to keeps each Parameter object, so the Adams (no state yet) still hold them.
        for net in (*self.online, *self.target, self.reducer):
            net.to(device)

    def _absent(self, batch: Batch) -> torch.Tensor:
        if batch.absent is not None:
            return batch.absent
        return torch.zeros(len(batch.y), self.n, dtype=torch.bool, device=self.device)


def device_batch(batch: Batch, device: torch.device) -> Batch:
    return Batch(
        [x.to(device, non_blocking=True) for x in batch.xs],
        batch.y.to(device, non_blocking=True),
        batch.seq,
        batch.index,
        None if batch.absent is None else batch.absent.to(device),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_fused(raw: dict[str, Any], *, warmup: int, device: torch.device) -> dict[str, Any]:
    """The config's whole schedule (eval rounds included) in this process on ``device``."""
    config = validate(raw)
    started_wall = time.monotonic()
    ds = load_dataset(config)
    if ds.task != "classification":
        raise ValueError("gpu_check reports accuracy: it needs a classification config")
    data = ReferenceData(config, ds)
    # the whole table on the device, as each expert service holds its own: a step's batch is
    # gathered there, not copied from the host
    data.views = {phase: [v.to(device) for v in views] for phase, views in data.views.items()}
    data.labels = {phase: y.to(device) for phase, y in data.labels.items()}
    in_dims = [len(ds.view_columns(i)) for i in range(ds.n_experts)]
    trainer = DeviceTrainer(config, in_dims=in_dims, out_dim=ds.out_dim, task=ds.task,
                            device=device, train_rows=len(data.schedule.fit_rows))  # fmt: skip
    last_train = config.train.steps - 1
    timed_from = timed_to = None
    losses: list[float] = []
    accuracies: list[float] = []
    correct = seen = 0
    for seq in range(data.schedule.total):
        step, batch = data.batch(seq)
        batch = device_batch(batch, device)  # no copy: already there
        if step.phase == "train":
            if step.index == warmup:
                _sync(device)
                timed_from = time.perf_counter()
            losses.append(trainer.step(batch))  # .item(): the step is done on the device
            if step.index == last_train:
                timed_to = time.perf_counter()
            continue
        logits = trainer.evaluate(batch)
        correct += int((logits.argmax(-1) == batch.y).sum())
        seen += len(batch.y)
        if step.last_in_round:
            accuracies.append(correct / seen)
            correct = seen = 0
    if timed_from is None or timed_to is None:
        raise RuntimeError(f"warmup {warmup} leaves no timed train step of {config.train.steps}")
    timed_steps = config.train.steps - warmup
    return {
        "samples_per_sec": timed_steps * config.train.batch_size / (timed_to - timed_from),
        "test_accuracy": accuracies[-1],
        "steps": len(losses),
        "final_loss": losses[-1],
        "wall_seconds": round(time.monotonic() - started_wall, 1),
    }


# ---------------------------------------------------------------- the check


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def run_check(
    *, config_path: Path, device: str, steps: int | None, timeout: float
) -> dict[str, Any]:
    dev = check_device(device)
    raw = build_config(config_path, device=device, steps=steps)
    cfg = validate(raw)
    warmup = warmup_steps(cfg.train.steps)
    t0 = time.monotonic()
    fused = run_fused(raw, warmup=warmup, device=dev)
    traci = run_traci(raw, warmup=warmup, timeout=timeout)
    return {
        "device": str(dev),
        "device_name": device_name(dev),
        "dry_run": dev.type != "cuda",
        "torch": torch.__version__,
        "config": _shown(config_path),
        "wire_dtype": cfg.expert.dtype,
        "steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size,
        "warmup_steps": warmup,
        "traci": traci,
        "fused": fused,
        "traci_vs_fused": traci["samples_per_sec"] / fused["samples_per_sec"],
        "wall_seconds": round(time.monotonic() - t0, 1),
    }


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _accuracy(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def report(result: dict[str, Any]) -> str:
    lines = [
        f"{result['device']} ({result['device_name']}), {result['config']}, "
        f"{result['steps']} steps of {result['batch_size']}, {result['wire_dtype']} on the wire"
        + (" [dry run]" if result["dry_run"] else ""),
        f"{'':8}{'samples/s':>12}{'accuracy':>10}{'wall s':>8}",
    ]
    for name in ("traci", "fused"):
        r = result[name]
        lines.append(f"{name:8}{r['samples_per_sec']:12.0f}{_accuracy(r['test_accuracy']):>10}"
                     f"{r['wall_seconds']:8.1f}")  # fmt: skip
    lines.append(f"traci / fused: {result['traci_vs_fused']:.3f}; "
                 f"whole check {result['wall_seconds']:.0f} s")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (dry run)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=None, help="train steps (default: config's)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON results (default {GPU_OUT.relative_to(ROOT)}; dry run: "
                             f"{DRY_RUN_OUT.relative_to(ROOT)})")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=BUDGET_S,
                        help="seconds the traci up run may take")  # fmt: skip
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be at least 2")
    try:
        result = run_check(config_path=args.config, device=args.device, steps=args.steps,
                           timeout=args.timeout)  # fmt: skip
    except NoCuda as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return NO_CUDA
    out = args.out or (DRY_RUN_OUT if result["dry_run"] else GPU_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print(report(result))
    if not result["dry_run"] and result["wall_seconds"] > BUDGET_S:
        print(f"warning: the check took {result['wall_seconds']:.0f} s, over its {BUDGET_S} s "
              "budget", file=sys.stderr)  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
