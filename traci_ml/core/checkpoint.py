"""Atomic checkpoints (``files.write_atomic``, durable: fsynced, then renamed), and loading
their contents into the nets a config builds: ``load_weights`` says in one line which tensor
does not fit (``traci_ml/core/fits.py`` checks a whole run with it)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from traci_ml.core.errors import CheckpointError
from traci_ml.core.files import write_atomic

FORMAT = 1


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` so that ``path`` is always either the old or the new checkpoint."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    write_atomic(path, buf.getvalue(), durable=True)


def load(path: Path, *, run_id: str, **expect: Any) -> dict[str, Any]:
    """Load a checkpoint and check it belongs to this run (and expert, etc.)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has an unknown format")
    for key, want in {"run_id": run_id, **expect}.items():
        if state.get(key) != want:
            raise CheckpointError(f"checkpoint {path} has {key}={state.get(key)!r}, not {want!r}")
    return state


def load_weights(
    net: nn.Module, state: Mapping[str, Any], key: str, path: Path, *,
    against: str = "the config", why: str = "",
) -> None:  # fmt: skip
    """Load ``state[key]`` into ``net``, or raise a one-line ``CheckpointError``: ``checkpoint
    PATH does not fit AGAINST: <the first tensor that differs>; WHY`` (``why``: what shapes the
    net and what to do)."""
    if key not in state:
        raise CheckpointError(f"checkpoint {path} holds no {key!r} weights")
    problem = weights_problem(net.state_dict(), state[key])
    if problem is None:
        try:
            net.load_state_dict(state[key])
        except (RuntimeError, TypeError, ValueError) as exc:
            problem = str(exc).strip().splitlines()[-1].strip()
        else:
            return
    raise CheckpointError(f"checkpoint {path} does not fit {against}: {problem}" +
                          (f"; {why}" if why else ""))  # fmt: skip


def weights_problem(want: Mapping[str, torch.Tensor], got: Any) -> str | None:
    """Why the saved weights ``got`` do not load into a net whose state dict is ``want`` (the
    first tensor of another shape, else the names that differ); None when they fit."""
    if not isinstance(got, Mapping):
        return f"its weights are a {type(got).__name__}, not a state dict"
    shapes = [
        (name, list(got[name].shape), list(tensor.shape))
        for name, tensor in want.items()
        if name in got and hasattr(got[name], "shape") and got[name].shape != tensor.shape
    ]
    if shapes:
        name, there, here = shapes[0]
        more = f" (and {len(shapes) - 1} more tensors)" if len(shapes) > 1 else ""
        return f"{name} is {there} in the checkpoint, {here} in the net the config builds{more}"
    lacks = [name for name in want if name not in got]
    extra = [name for name in got if name not in want]
    if lacks or extra:
        parts = [f"{what} {_few(names)}" for what, names in (("it lacks", lacks),
                 ("it has extra", extra)) if names]  # fmt: skip
        return "its tensors are another net's: " + "; ".join(parts)
    return None


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def load_into(obj: Any, state: Mapping[str, Any], key: str, path: Path, *, why: str = "") -> None:
    """``obj.load_state_dict(state[key])`` (an optimizer, error feedback ...), its failure a
    one-line ``CheckpointError``."""
    try:
        obj.load_state_dict(state[key])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else repr(exc)
        raise CheckpointError(f"checkpoint {path}: its {key!r} state does not fit: {detail}" +
                              (f"; {why}" if why else "")) from None  # fmt: skip
