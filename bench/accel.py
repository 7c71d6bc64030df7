"""Simulated accelerators: how much of a fixed per-pass expert latency TRACI hides (issue 12).

Digits quadrants (``examples/digits.yaml``: 4 experts, batch 64) through ``traci up``, each
expert's net a ``traci_ml.core.models.simulated:SimulatedAccelerator``: the digits MLP whose
forward and backward passes each take ``pass_ms`` of wall time -- the net's arithmetic, then a
sleep for the rest, using no core -- as a host waits on a GPU kernel. An expert's train step
is three passes (target forward, online forward, backward), so with perfect pipelining the
run goes at

    ideal steps/s = 1 / (3 * pass_s)

and ``efficiency`` = measured steps/s / ideal. Steps/s are the reducer's own ``metrics.jsonl``
train records (``bench.cluster.train_rate`` / batch) from the record at ``steps // 5`` to the
last one, so start-up and the final evaluation are not counted.

* ``grid``: pass 2, 10, 20 ms x ``expert.window`` 1, 2, 4. At window 1 the expert idles while
  the broker and reducer work; a larger window should approach the ideal. At 2 ms the
  CPU work of six processes on the machine's cores, not the sleep, sets the rate.
* ``straggler``: expert 3 at 50 ms a pass, the other three at 10 ms (``data.views[3].model``),
  window 4, against the same run with all four at 10 ms: ``straggler_ratio`` (steps/s with /
  without) and both runs' held-out ``test_accuracy``. ``STRAGGLER_EXTRA`` holds the config
  sections both runs share (the broker's join policy once it has one).
* ``zero_compute``: the plain MLP (no sleep), window 2 against window 1.

``--quick``: pass 10 ms at windows 1 and 4 (100 steps; the straggler pair's run without the
straggler is the window-4 run), one zero-compute pair (200 steps). Full length: 15 runs of
``traci up``, each ~15 s of start-up and final evaluation besides its training.

Top level (``bench.run.ratios``): ``pipeline_efficiency_10ms`` (window 4),
``pipeline_efficiency_10ms_w1``, ``straggler_ratio``, ``straggler_accuracy``,
``no_straggler_accuracy``, ``zero_compute_w2_vs_w1``.

    python -m bench.accel [--quick]
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from bench.cluster import run_cluster, section_main, train_rate

SIMULATED = "traci_ml.core.models.simulated:SimulatedAccelerator"
BASE_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "digits.yaml"
PASSES_MS = (2, 10, 20)
WINDOWS = (1, 2, 4)
QUICK_PASSES_MS = (10,)
QUICK_WINDOWS = (1, 4)
STRAGGLER_MS, FAST_MS, STRAGGLER_ID, STRAGGLER_WINDOW = 50, 10, 3, 4
# Config sections merged into both straggler runs (with and without): the one place to set the
# broker's join policy, e.g. {"join": {"quorum": 3, "deadline": "adaptive"}}. Empty: defaults.
STRAGGLER_EXTRA: dict[str, dict[str, Any]] = {}
ZERO_REPEATS = 2  # zero-compute pairs (full length)
TRAIN_SECONDS = 6.0  # grid: steps for about this long at the ideal rate (full length)


def base_config() -> dict[str, Any]:
    """examples/digits.yaml with no evaluation but the final one, no checkpoints, records
    every 10 steps, no restarts (a failure fails the benchmark)."""
    cfg = yaml.safe_load(BASE_CONFIG.read_text())
    cfg["run_id"] = "bench-accel"
    cfg["train"] = {**cfg["train"], "eval_every": 0, "checkpoint_every": 0, "log_every": 10}
    cfg["launcher"] = {"restart": "never"}
    return cfg


def simulated_model(pass_ms: float, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """An ``expert.model`` section: ``base``'s MLP (widths, activation, ...) as a simulated
    accelerator taking ``pass_ms`` per forward and per backward."""
    base = base if base is not None else base_config()["expert"]["model"]
    kwargs = {k: v for k, v in base.items() if k not in ("module", "kwargs")}
    return {"module": SIMULATED, "kwargs": {**kwargs, "pass_ms": pass_ms}}


def accel_config(
    *,
    passes_ms: list[float],
    window: int,
    steps: int,
    extra: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Digits quadrants with expert i a simulated accelerator at ``passes_ms[i]`` (all equal:
    through ``expert.model``; else one model per view, through ``data.views[i].model``)."""
    from traci_ml.core.data import digits_views

    cfg = base_config()
    views = digits_views(cfg["data"]["views"])
    if len(set(passes_ms)) == 1:
        cfg["expert"] = {**cfg["expert"], "model": simulated_model(passes_ms[0])}
    elif len(passes_ms) == len(views):
        cfg["data"] = {**cfg["data"], "views": [
            {"name": v.name, "columns": list(v.columns), "model": simulated_model(p)}
            for v, p in zip(views, passes_ms, strict=True)
        ]}  # fmt: skip
    else:
        raise ValueError(f"passes_ms: one entry or {len(views)}, got {len(passes_ms)}")
    return _finish(cfg, window=window, steps=steps, extra=extra)


def plain_config(*, window: int, steps: int) -> dict[str, Any]:
    """Digits quadrants with the plain MLP: no simulated latency."""
    return _finish(base_config(), window=window, steps=steps, extra=None)


def _finish(
    cfg: dict[str, Any], *, window: int, steps: int, extra: dict[str, dict[str, Any]] | None
) -> dict[str, Any]:
    cfg["expert"] = {**cfg["expert"], "window": window}
    cfg["train"] = {**cfg["train"], "steps": steps}
    for section, values in copy.deepcopy(extra or {}).items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return cfg


def ideal_steps_per_s(pass_ms: float) -> float:
    """One expert's rate with every other hop hidden: three passes a step."""
    return 1.0 / (3 * pass_ms / 1000.0)


def grid_steps(pass_ms: float, *, quick: bool) -> int:
    """About ``TRAIN_SECONDS`` (quick: a third) at the ideal rate, within [100, 600]."""
    seconds = TRAIN_SECONDS / 3 if quick else TRAIN_SECONDS
    return int(min(600, max(100, round(seconds * ideal_steps_per_s(pass_ms)))))


class Runner:
    """Runs configs through ``traci up``; a config already run is not run again."""

    def __init__(self) -> None:
        self.done: dict[str, dict[str, Any]] = {}

    def __call__(self, cfg: dict[str, Any], label: str, *, repeat: int = 0) -> dict[str, Any]:
        key = json.dumps([cfg, repeat], sort_keys=True)
        if key not in self.done:
            t = time.monotonic()
            try:
                records, summary = run_cluster(cfg)
            except (RuntimeError, TimeoutError, OSError) as exc:  # the other cells still run
                self.done[key] = {"steps_per_s": None, "test_accuracy": None,
                                  "error": str(exc)[-3000:]}  # fmt: skip
                print(f"  accel {label}: FAILED {exc}", flush=True)
                return dict(self.done[key])
            batch = cfg["train"]["batch_size"]
            steps = cfg["train"]["steps"]
            self.done[key] = {
                "steps_per_s": train_rate(records, batch, warmup=steps // 5) / batch,
                "test_accuracy": summary.get("test_accuracy"),
                "steps": summary["steps"],
                "steps_skipped": summary.get("steps_skipped", 0),
                # per expert, the share of train steps its token was in (a deadline join
                # masks a late one); absent from a reducer that does not count it
                "participation": summary.get("participation"),
                "run_seconds": round(time.monotonic() - t, 1),
            }
            print(f"  accel {label}: {self.done[key]['steps_per_s']:.1f} steps/s, accuracy "
                  f"{self.done[key]['test_accuracy']}, {self.done[key]['run_seconds']} s",
                  flush=True)  # fmt: skip
        else:
            print(f"  accel {label}: the same run as above, reused", flush=True)
        return dict(self.done[key])


def run(*, quick: bool = False) -> dict[str, Any]:
    began = time.monotonic()
    runner = Runner()
    grid = []
    for pass_ms in QUICK_PASSES_MS if quick else PASSES_MS:
        steps = grid_steps(pass_ms, quick=quick)
        for window in QUICK_WINDOWS if quick else WINDOWS:
            cfg = accel_config(passes_ms=[pass_ms], window=window, steps=steps)
            row = runner(cfg, f"pass {pass_ms} ms window {window}")
            ideal = ideal_steps_per_s(pass_ms)
            grid.append({"pass_ms": pass_ms, "window": window, "ideal_steps_per_s": ideal,
                         "efficiency": _ratio(row["steps_per_s"], ideal), **row})  # fmt: skip

    s_steps = grid_steps(FAST_MS, quick=quick) if quick else 300
    passes = [FAST_MS] * 4
    without = runner(
        accel_config(passes_ms=passes, window=STRAGGLER_WINDOW, steps=s_steps,
                     extra=STRAGGLER_EXTRA), "straggler: none"
    )  # fmt: skip
    passes[STRAGGLER_ID] = STRAGGLER_MS
    with_ = runner(
        accel_config(passes_ms=passes, window=STRAGGLER_WINDOW, steps=s_steps,
                     extra=STRAGGLER_EXTRA),
        f"straggler: expert {STRAGGLER_ID} at {STRAGGLER_MS} ms",
    )  # fmt: skip
    straggler = {
        "passes_ms": passes, "window": STRAGGLER_WINDOW, "steps": s_steps,
        "extra": STRAGGLER_EXTRA, "with": with_, "without": without,
        "ratio": _ratio(with_["steps_per_s"], without["steps_per_s"]),
        "efficiency_vs_fast": _ratio(with_["steps_per_s"], ideal_steps_per_s(FAST_MS)),
    }  # fmt: skip

    # Both CPU-bound: the ratio is the most noise-prone figure, so (full length) the pair runs
    # twice, interleaved, and the ratio is of the medians.
    z_steps = 200 if quick else 400
    runs: dict[str, list[dict[str, Any]]] = {"1": [], "2": []}
    for repeat in range(1 if quick else ZERO_REPEATS):
        for w in (1, 2):
            cfg = plain_config(window=w, steps=z_steps)
            runs[str(w)].append(runner(cfg, f"zero compute w{w} #{repeat + 1}", repeat=repeat))
    zero = {w: {"steps_per_s": _median([r["steps_per_s"] for r in rs]), "runs": rs}
            for w, rs in runs.items()}  # fmt: skip
    return {
        "grid": grid,
        "straggler": straggler,
        "zero_compute": {"steps": z_steps, "windows": zero,
                         "w2_vs_w1": _ratio(zero["2"]["steps_per_s"], zero["1"]["steps_per_s"])},
        "settings": {"quick": quick, "batch_size": base_config()["train"]["batch_size"],
                     "experts": 4, "ideal": "1 / (3 * pass_s) steps/s"},
        "elapsed_s": round(time.monotonic() - began, 1),
    }  # fmt: skip


def _median(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.median(values)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _fmt(value: float | None, spec: str) -> str:
    return "failed" if value is None else format(value, spec)


def efficiency(result: dict[str, Any], pass_ms: float, window: int) -> float | None:
    for row in result.get("grid", []):
        if row["pass_ms"] == pass_ms and row["window"] == window:
            return row["efficiency"]
    return None


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    """The section's top-level figures."""
    out: dict[str, Any] = {
        "pipeline_efficiency_10ms": efficiency(result, 10, 4),
        "pipeline_efficiency_10ms_w1": efficiency(result, 10, 1),
    }
    s = result.get("straggler")
    if s:
        out["straggler_ratio"] = s["ratio"]
        out["straggler_accuracy"] = s["with"]["test_accuracy"]
        out["no_straggler_accuracy"] = s["without"]["test_accuracy"]
    z = result.get("zero_compute")
    if z:
        out["zero_compute_w2_vs_w1"] = z["w2_vs_w1"]
    return out


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = ["simulated accelerators, digits quadrants (efficiency = steps/s / (1 / 3 pass)):"]
    for row in result.get("grid", []):
        lines.append(
            f"  pass {row['pass_ms']:>2} ms window {row['window']}: "
            f"{_fmt(row['steps_per_s'], '6.1f')} steps/s of {row['ideal_steps_per_s']:6.1f} "
            f"ideal, efficiency {_fmt(row['efficiency'], '.2f')}"
        )
    s = result.get("straggler")
    if s:
        lines.append(
            f"  straggler ({s['passes_ms']} ms, window {s['window']}): "
            f"{_fmt(s['with']['steps_per_s'], '.1f')} vs {_fmt(s['without']['steps_per_s'], '.1f')}"
            f" steps/s (ratio {_fmt(s['ratio'], '.2f')}), accuracy "
            f"{_fmt(s['with']['test_accuracy'], '.4f')} vs "
            f"{_fmt(s['without']['test_accuracy'], '.4f')}"
        )
        share = s["with"].get("participation")
        if share:
            cells = ", ".join(f"{e} {v:.2f}" for e, v in share.items())
            lines.append(f"    with the straggler, share of train steps per expert: {cells}")
    z = result.get("zero_compute")
    if z:
        w = z["windows"]
        lines.append(
            f"  zero compute: window 2 {_fmt(w['2']['steps_per_s'], '.1f')}, window 1 "
            f"{_fmt(w['1']['steps_per_s'], '.1f')} steps/s (ratio {_fmt(z['w2_vs_w1'], '.2f')})"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    section_main(__doc__, run, summary_lines, ratios, argv)


if __name__ == "__main__":
    main()
