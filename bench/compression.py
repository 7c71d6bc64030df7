"""`make bench`, section compression: the int8 wire against float32, on the examples.

For each example (digits, heterogeneous) and a few seeds, one `traci up` run with
``expert.dtype: float32`` and one with ``int8`` (per-row scale; docs/compression.md), paired
by seed. Reports the reducer's ``wire_bytes_per_step`` (BATCH + GRAD tensor bytes per train
step) and held-out accuracy of both. Top level: ``compression_bytes_ratio`` (float32 bytes /
int8 bytes per step, digits) and ``compression_accuracy_delta_<example>`` (int8 minus
float32, mean over the seeds, in points). A test row is 0.28 point on digits and 0.88 on
heterogeneous, so one seed alone is noise; the seeds average it.

    python -m bench.compression [--quick]
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import yaml

from bench.cluster import run_cluster, section_main

EXAMPLES = {"digits": "examples/digits.yaml", "heterogeneous": "examples/heterogeneous.yaml"}
DTYPES = ("float32", "int8")
SEEDS, QUICK_SEEDS = (0, 1, 2), (0,)


def example_config(example: str, *, seed: int, dtype: str) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    cfg = yaml.safe_load((root / EXAMPLES[example]).read_text())
    cfg["seed"] = seed
    cfg["run_id"] = f"bench-compression-{example}"
    cfg["expert"] = {**cfg.get("expert", {}), "dtype": dtype}
    cfg["launcher"] = {"restart": "never"}
    data = cfg.get("data", {})
    if data.get("path") and not Path(data["path"]).is_absolute():  # the example's CSV
        cfg["data"] = {**data, "path": str(root / data["path"])}
    return cfg


def run(*, quick: bool = False) -> dict[str, Any]:
    seeds = QUICK_SEEDS if quick else SEEDS
    out: dict[str, Any] = {"seeds": list(seeds), "examples": {}}
    for example in EXAMPLES:
        rows: dict[str, dict[str, list[float]]] = {d: {"acc": [], "bytes": []} for d in DTYPES}
        for seed in seeds:
            for dtype in DTYPES:
                _, summary = run_cluster(example_config(example, seed=seed, dtype=dtype))
                rows[dtype]["acc"].append(summary["test_accuracy"])
                rows[dtype]["bytes"].append(summary["wire_bytes_per_step"])
                print(f"  compression {example} seed {seed} {dtype}: accuracy "
                      f"{summary['test_accuracy']:.4f}, {summary['wire_bytes_per_step']:,.0f} "
                      "bytes/step", flush=True)  # fmt: skip
        f32, i8 = rows["float32"], rows["int8"]
        out["examples"][example] = {
            "float32_accuracy": statistics.mean(f32["acc"]),
            "int8_accuracy": statistics.mean(i8["acc"]),
            "accuracy_delta_points": 100
            * statistics.mean(a - b for a, b in zip(i8["acc"], f32["acc"], strict=True)),
            "float32_bytes_per_step": statistics.mean(f32["bytes"]),
            "int8_bytes_per_step": statistics.mean(i8["bytes"]),
            "bytes_ratio": statistics.mean(f32["bytes"]) / statistics.mean(i8["bytes"]),
            "per_seed": rows,
        }
    return out


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    ex = result.get("examples", {})
    out: dict[str, Any] = {}
    if "digits" in ex:
        out["compression_bytes_ratio"] = ex["digits"]["bytes_ratio"]
    for name, row in ex.items():
        out[f"compression_accuracy_delta_{name}"] = row["accuracy_delta_points"]
    return out


def summary_lines(result: dict[str, Any]) -> list[str]:
    return [
        f"  {name}: float32 {r['float32_accuracy']:.4f} vs int8 {r['int8_accuracy']:.4f} "
        f"({r['accuracy_delta_points']:+.2f} points, {len(result['seeds'])} seeds), bytes/step "
        f"{r['float32_bytes_per_step']:,.0f} vs {r['int8_bytes_per_step']:,.0f} "
        f"({r['bytes_ratio']:.2f}x)"
        for name, r in result.get("examples", {}).items()
    ]


def main(argv: list[str] | None = None) -> None:
    section_main(__doc__, run, summary_lines, ratios, argv)


if __name__ == "__main__":
    main()
