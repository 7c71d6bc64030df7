"""Staleness trade-off on digits quadrants: `window` and `tau` against samples/s and accuracy.

A larger window pipelines expert compute, transport and reducer compute, at the price of
gradients computed against older target embeddings; tau sets how fast the sent (target)
representation follows the trained (online) one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bench.cluster import run_cluster, train_rate

WINDOWS = (1, 2, 4, 8)
TAUS = (0.02, 0.1, 0.5)


def run(*, quick: bool = False, plot: Path | None = None) -> dict[str, Any]:
    base = yaml.safe_load(Path("examples/digits.yaml").read_text())
    steps = 400 if quick else 1500
    rows = []
    for tau in TAUS:
        for window in WINDOWS if tau == 0.1 else (1, 4):
            cfg = {**base, "expert": {**base["expert"], "window": window, "tau": tau},
                   "train": {**base["train"], "steps": steps, "eval_every": steps,
                             "checkpoint_every": 0, "log_every": 25}}  # fmt: skip
            records, summary = run_cluster(cfg)
            rows.append({"window": window, "tau": tau,
                         "samples_per_sec": train_rate(records, 64, warmup=50),
                         "test_accuracy": summary["test_accuracy"]})  # fmt: skip
    if plot is not None:
        _plot(rows, plot)
    return {"steps": steps, "rows": rows}


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_sps) = plt.subplots(1, 2, figsize=(10, 4))
    for tau in sorted({r["tau"] for r in rows}):
        pts = sorted((r["window"], r["test_accuracy"], r["samples_per_sec"])
                     for r in rows if r["tau"] == tau)  # fmt: skip
        ax_acc.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"tau {tau}")
        ax_sps.plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=f"tau {tau}")
    for ax, title in ((ax_acc, "held-out accuracy"), (ax_sps, "training samples/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(WINDOWS), [str(w) for w in WINDOWS])
        ax.set_xlabel("window (steps in flight per expert)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("TRACI staleness trade-off, digits quadrants")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
