"""Atomic checkpoints (``files.write_atomic``, durable: fsynced, then renamed)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

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
