"""The reference model every end-to-end figure uses (issue #5), as one TRACI config.

4 experts, each an MLP 64 -> 256 -> 128 with ReLU and a Polyak target; a Transformer reducer
(2 layers, d = 128, 4 heads, feed-forward 256) over the 4 tokens; 10 classes; Adam. The data
is the built-in synthetic table (256 Gaussian features, 64 per expert), so the figures do not
depend on a download or on digits' tiny size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

N_EXPERTS = 4
FEATURES_PER_EXPERT = 64
EMBED_DIM = 128


def reference_config(
    *,
    batch_size: int,
    steps: int,
    run_dir: Path | None = None,
    ports: list[int] | None = None,
    window: int = 2,
    n_experts: int = N_EXPERTS,
    hidden: int = 256,
) -> dict[str, Any]:
    """A TRACI config dict for the reference model. ``ports``: [expert, reducer] broker ports."""
    cfg: dict[str, Any] = {
        "run_id": "bench",
        "seed": 0,
        "run_dir": str(run_dir) if run_dir is not None else "runs/bench",
        "embed_dim": EMBED_DIM,
        "data": {
            "source": "synthetic",
            "views": "even",
            "synthetic": {"rows": 20000, "features": FEATURES_PER_EXPERT * n_experts,
                          "classes": 10, "experts": n_experts},
        },
        "expert": {"model": {"hidden": [hidden], "activation": "relu"}, "tau": 0.1,
                   "lr": 1e-3, "window": window},
        # The reducer does ~3/4 of the FLOPs and is the bottleneck: its train batch is split
        # into 2 row slices on 2 threads (one intra-op thread each; core/models/shards.py).
        # On 2 cores at batch 256 that took TRACI from ~7,600 (one thread) / ~7,900 (torch's
        # 2 intra-op threads, which spin at their barriers while experts hold a core) to
        # ~9,300 samples/s. For the small digits reducer (d=64, batch 64) one thread, whole
        # batch, stays the shipped default (docs/config.md).
        "reducer": {"layers": 2, "heads": 4, "ff": 256, "dropout": 0.0, "expert_dropout": 0.0,
                    "lr": 1e-3, "eval_batch_size": 4096, "torch_threads": 1, "shards": 2},
        "train": {"steps": steps, "batch_size": batch_size, "eval_every": 0,
                  "checkpoint_every": 0, "log_every": 10},
        "metrics": {"broker_port": 0, "reducer_port": 0, "expert_base_port": 0},
        "launcher": {"restart": "never"},
    }  # fmt: skip
    if ports:
        cfg["network"] = {"expert_port": ports[0], "reducer_port": ports[1]}
    return cfg
