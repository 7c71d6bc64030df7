"""`make bench`: the whole suite, baselines in the same invocation, ratios at the top level.

    python -m bench.run [--quick] [--only e2e,transport,...] [--out bench/results/latest.json]

Every figure is the median of several repetitions with min and max; TRACI and its baselines
alternate within each repetition so a noisy machine hits them alike. No test asserts a time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

SECTIONS = (
    "transport",
    "e2e",
    "scaling",
    "staleness",
    "memory",
    "serve",
    "data",
    "accel",
    "bandwidth",
    "compression",
    "quality",
)
TARGETS = {"e2e_vs_fused": 0.9, "e2e_vs_rpc": 1.5, "broker_vs_null": 0.8, "scaling_64_vs_4": 0.7,
           "pipeline_efficiency_10ms": 0.9, "pipeline_efficiency_10ms_w1": 0.6,
           "straggler_ratio": 0.8, "zero_compute_w2_vs_w1": 1.0,
           "compression_bytes_ratio": 3.5, "quality_worst_margin_vs_linear": 0.0}  # fmt: skip


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}  # fmt: skip


def e2e(*, quick: bool) -> dict[str, Any]:
    from bench.baselines import fused_samples_per_sec, rpc_samples_per_sec
    from bench.e2e import traci_samples_per_sec

    repeats = 2 if quick else 3
    batches = (256,) if quick else (64, 256, 1024)
    out: dict[str, Any] = {}
    for batch in batches:
        steps = max(150, 60_000 // batch) if not quick else 150
        warmup = steps // 5
        runs: dict[str, list[float]] = {"traci": [], "fused": [], "rpc": []}
        kw = {"batch_size": batch, "steps": steps, "warmup": warmup}
        measures: dict[str, Callable[[], float]] = {
            "traci": lambda kw=kw: traci_samples_per_sec(**kw)["samples_per_sec"],
            "fused": partial(fused_samples_per_sec, **kw),
            "rpc": partial(rpc_samples_per_sec, **kw),
        }
        for _ in range(repeats):
            for name, measure in measures.items():
                runs[name].append(measure())
                print(f"  e2e batch {batch}: {name} {runs[name][-1]:,.0f} samples/s", flush=True)
        out[str(batch)] = {name: spread(v) for name, v in runs.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument(
        "--quick-sections", default="", help="comma-separated sections to run short (--quick: all)"
    )
    parser.add_argument("--out", default="bench/results/latest.json")
    args = parser.parse_args(argv)
    short = set(SECTIONS) if args.quick else {s for s in args.quick_sections.split(",") if s}
    sections = [s for s in args.only.split(",") if s]
    unknown = (set(sections) | short) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},  # fmt: skip
        "quick": sorted(short), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    t0 = time.monotonic()
    for name in sections:
        quick = name in short
        print(f"== {name}" + (" (short)" if quick else ""), flush=True)
        t = time.monotonic()
        if name == "e2e":
            results["e2e"] = e2e(quick=quick)
        elif name == "staleness":
            from bench import staleness

            results["staleness"] = staleness.run(
                quick=quick, plot=Path(args.out).parent / "staleness.png"
            )
        else:  # bench/<name>.py: run(quick=...)
            results[name] = importlib.import_module(f"bench.{name}").run(quick=quick)
        results.setdefault("seconds", {})[name] = round(time.monotonic() - t, 1)
    results["seconds"]["total"] = round(time.monotonic() - t0, 1)
    results.update(ratios(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nwrote {out}")
    return 0


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    e = results.get("e2e", {}).get("256")
    if e:
        out["e2e_vs_fused"] = e["traci"]["median"] / e["fused"]["median"]
        out["e2e_vs_rpc"] = e["traci"]["median"] / e["rpc"]["median"]
    t = results.get("transport")
    if t:
        out["broker_vs_null"] = t["broker_vs_null_32k"]
        out["broker_added_p50_us_32k"] = t.get("added_p50_us_32k")
    s = results.get("scaling")
    if s:
        out["scaling_64_vs_4"] = s["scaling_64_vs_4"]
    if results.get("accel"):
        from bench.accel import ratios as accel_ratios

        out.update(accel_ratios(results["accel"]))
    if results.get("bandwidth"):
        from bench.bandwidth import ratios as bandwidth_ratios

        out.update(bandwidth_ratios(results["bandwidth"]))
    if results.get("compression"):
        from bench.compression import ratios as compression_ratios

        out.update(compression_ratios(results["compression"]))
    if results.get("serve"):
        from bench.serve import figures

        out.update(figures(results["serve"]))
    if results.get("quality"):
        from bench.quality import ratios as quality_ratios

        out.update(quality_ratios(results["quality"]))
    return out


def print_table(results: dict[str, Any]) -> None:
    print("\n== TRACI benchmark summary")
    for key, target in TARGETS.items():
        if key in results:
            verdict = "met" if results[key] >= target else "MISSED"
            print(f"  {key:<18} {results[key]:6.2f}   target >= {target}   {verdict}")
    for batch, row in results.get("e2e", {}).items():
        cells = ", ".join(f"{n} {v['median']:,.0f} [{v['min']:,.0f}-{v['max']:,.0f}]"
                          for n, v in row.items())  # fmt: skip
        print(f"  e2e batch {batch:>5}: {cells} samples/s")
    for row in results.get("staleness", {}).get("rows", []):
        print(
            f"  staleness window {row['window']} tau {row['tau']}: "
            f"{row['samples_per_sec']:,.0f} samples/s, accuracy {row['test_accuracy']:.4f}"
        )
    if results.get("serve"):
        from bench.serve import summary_lines as serve_lines

        print("  served prediction, one row per request (rate max: 16 closed-loop clients):")
        for line in serve_lines(results["serve"]):
            print("    " + line)
    if results.get("data"):
        from bench.data import summary_lines

        print("  data where it lives (issue 10):")
        for line in summary_lines(results["data"]):
            print("  " + line)
    if results.get("accel"):
        from bench.accel import summary_lines as accel_lines

        for line in accel_lines(results["accel"]):
            print("  " + line)
    if results.get("bandwidth"):
        from bench.bandwidth import summary_lines as bandwidth_lines

        for line in bandwidth_lines(results["bandwidth"]):
            print("  " + line)
    if results.get("compression"):
        from bench.compression import summary_lines as compression_lines

        print("  int8 wire against float32:")
        for line in compression_lines(results["compression"]):
            print("  " + line)
    if results.get("quality"):
        from bench.quality import summary_lines as quality_lines

        for line in quality_lines(results["quality"]):
            print("  " + line)
    for name, m in results.get("memory", {}).get("services", {}).items():
        print(
            f"  memory {name:<9} peak {m['peak_rss_mib']:7.1f} MiB, in training (quarter -> "
            f"end) {m.get('growth_in_training_mib', float('nan')):+.2f} MiB, slope "
            f"{m.get('slope_mib_per_1000_steps', float('nan')):+.3f} MiB/1000 steps, final "
            f"eval +{m.get('final_eval_extra_mib', float('nan')):.1f} MiB"
        )


if __name__ == "__main__":
    sys.exit(main())
