"""Do a run's checkpoints fit a config? One answer for every reader of a checkpoint.

``check_run`` is what ``traci up --resume`` and ``traci serve`` ask before any process
starts: every checkpoint in ``RUN_DIR/checkpoints`` belongs to this run, there is one per
expert the config has (``data.views``) and none for an expert it lacks, and every tensor has
the shape of the net the config builds. It loads the checkpoints and builds the nets (no data
is read, nothing is trained), so a mismatch costs seconds, not a cluster's restarts. The
reducer's output size comes from the data's classes, which it does not read: the reducer
checks that itself when it loads its checkpoint.

The services (``expert_weights``, ``reducer_weights``) and ``traci predict`` load their
weights through the same checks, so each failure is the same one line (a ``CheckpointError``:
exit code 2, never restarted) naming what differs and what to change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from traci_ml.core import checkpoint
from traci_ml.core.config import Config
from traci_ml.core.data import view_specs
from traci_ml.core.errors import CheckpointError
from traci_ml.core.models.expert import build_expert_net
from traci_ml.core.models.reducer import Reducer
from traci_ml.core.rundir import RunDir

EXPERT_FILE = re.compile(r"expert-(\d+)\.pt")


def remedy(config: Config, *, serve: bool = False) -> str:
    """What to do about checkpoints that do not fit ``config``."""
    if serve:
        return "serve the run with the config it was trained with (no --set of its model)"
    return (
        "resume with the config the run was trained with, or start afresh (--fresh, a new "
        f"run_id, or delete {config.run_path})"
    )


def views_key(config: Config) -> str:
    """``data.views`` with the preset it names, if it names one."""
    views = config.data.views
    return f"data.views: {views!r}" if isinstance(views, str) else "data.views"


def expert_shapes(config: Config, expert_id: int) -> str:
    """Where expert ``expert_id``'s tensor shapes come from in ``config``."""
    view = view_specs(config.data)[expert_id]
    return (
        f"its shapes come from {views_key(config)} (view {expert_id} {view.name!r}: "
        f"{len(view.columns)} columns), {config.expert_model_key(expert_id)}, embed_dim and "
        "reducer.linear_path (on for regression since 2026-12-08: false for older runs)"
    )


def reducer_shapes(config: Config, n_experts: int) -> str:
    return (
        f"its shapes come from the number of views ({n_experts}, {views_key(config)}), "
        "embed_dim, reducer.layers/heads/ff, reducer.linear_path and the label's classes"
    )


def expert_weights(
    config: Config, expert_id: int, state: Mapping[str, Any], path: Path,
    nets: Mapping[str, nn.Module], *, fix: str, against: str = "the config",
) -> None:  # fmt: skip
    """Load each ``nets[key]`` (``online``, ``target``) from an expert's checkpoint ``state``;
    ``fix``: what to do if they do not fit (``remedy``)."""
    why = f"{expert_shapes(config, expert_id)}: {fix}"
    for key, net in nets.items():
        checkpoint.load_weights(net, state, key, path, against=against, why=why)


def reducer_weights(
    config: Config, state: Mapping[str, Any], path: Path, net: Reducer, *,
    fix: str, against: str = "the config",
) -> None:  # fmt: skip
    """Load the reducer's ``model`` weights; a changed number of views or classes is named.
    ``fix``: what to do if they do not fit (``remedy``)."""
    n = net.n_experts
    sizes = Reducer.saved_sizes(state.get("model"))
    if sizes is not None and sizes[0] != n:
        raise CheckpointError(
            f"checkpoint {path} was trained with {sizes[0]} experts, the config has {n} views "
            f"({views_key(config)}): {fix}"
        )
    out = net.head.out_features
    if sizes is not None and sizes[1] != out:
        raise CheckpointError(
            f"checkpoint {path} predicts {sizes[1]} outputs, the data now gives {out} (the "
            f"label's classes: data.label, data.labels or the table changed): {fix}"
        )
    why = f"{reducer_shapes(config, n)}: {fix}"
    checkpoint.load_weights(net, state, "model", path, against=against, why=why)


def check_run(config: Config, *, serve: bool = False) -> None:
    """Raise a one-line ``CheckpointError`` (or ``ConfigError``: an expert module that does not
    import) unless every checkpoint of ``config``'s run fits ``config``. No checkpoints: fine
    (a resume then starts afresh); ``serve``: every one must be there."""
    run = RunDir(config.run_path)
    n, fix = len(view_specs(config.data)), remedy(config, serve=serve)
    reducer, experts = _load_all(config, run, fix)
    if reducer is None and not experts:
        if serve:
            raise CheckpointError(f"{run.checkpoints} holds no checkpoints: train the run first")
        return
    sizes = Reducer.saved_sizes(reducer.get("model")) if reducer is not None else None
    if sizes is not None and sizes[0] != n:
        raise CheckpointError(
            f"{run.reducer_checkpoint} was trained with {sizes[0]} experts, the config has {n} "
            f"views ({views_key(config)}): {fix}"
        )
    extra = sorted(i for i in experts if i >= n)
    if extra:
        names = ", ".join(run.expert_checkpoint(i).name for i in extra)
        raise CheckpointError(
            f"{run.checkpoints} holds {names} but the config has {n} views "
            f"({views_key(config)}, experts 0..{n - 1}): {fix}"
        )
    lacks = run.missing_checkpoints(n)
    if lacks and (serve or _trained(reducer, experts)):
        raise CheckpointError(
            f"{run.checkpoints} lacks {', '.join(lacks)} of a run that has trained (the config "
            f"has {n} views, {views_key(config)}): {fix}"
        )
    with torch.random.fork_rng(devices=[]):  # building nets draws initial weights
        if reducer is not None:
            out = sizes[1] if sizes is not None else 1
            net = Reducer(n_experts=n, d=config.embed_dim, out_dim=out, cfg=config.reducer,
                          linear=config.linear_width)  # fmt: skip
            reducer_weights(config, reducer, run.reducer_checkpoint, net, fix=fix)
        views = view_specs(config.data)
        for i, state in sorted(experts.items()):
            net = build_expert_net(
                config.expert_model(i), in_dim=len(views[i].columns),
                out_dim=config.embed_dim, key=config.expert_model_key(i),
                linear=config.linear_width,
            )  # fmt: skip
            nets = {"online": net, "target": net}  # the same shapes, both checked
            expert_weights(config, i, state, run.expert_checkpoint(i), nets, fix=fix)


def _load_all(
    config: Config, run: RunDir, fix: str
) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """The reducer's checkpoint (None: there is none) and every expert's, by id."""
    try:
        reducer = None
        if run.reducer_checkpoint.exists():
            reducer = checkpoint.load(run.reducer_checkpoint, run_id=config.run_id)
        experts = {}
        if run.checkpoints.is_dir():
            for path in run.checkpoints.iterdir():
                match = EXPERT_FILE.fullmatch(path.name)
                if match:
                    i = int(match.group(1))
                    experts[i] = checkpoint.load(path, run_id=config.run_id, expert_id=i)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}: {fix}") from None
    return reducer, experts


def _trained(reducer: dict[str, Any] | None, experts: Mapping[int, dict[str, Any]]) -> bool:
    """Has any model of the run taken a training step? (A run stopped before its first step
    may lack an expert's checkpoint: that expert then starts afresh, harmlessly.)"""
    if reducer is not None and reducer.get("train_steps", 0) > 0:
        return True
    return any((s.get("accounts") or {}).get("applied", 0) > 0 for s in experts.values())
