"""Fail fast (issue 14, item 5): do a run's checkpoints fit a config (``traci_ml.core.fits``)?
The checks ``traci up --resume`` and ``traci serve`` make before any process starts, the one
line a service exits with (code 2, never restarted) when its own checkpoint does not fit,
and the exit codes themselves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from traci_ml.core import checkpoint
from traci_ml.core.config import Config, load_config
from traci_ml.core.data import view_specs
from traci_ml.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    PeerTimeout,
    exit_code,
)
from traci_ml.core.fits import check_run, reducer_weights, remedy
from traci_ml.core.models.expert import build_expert
from traci_ml.core.models.reducer import build_reducer
from traci_ml.core.rundir import RunDir

TRACI = [sys.executable, "-m", "traci_ml.app.cli"]
SMALL = {"embed_dim": "8", "expert.model.hidden": "[8]", "reducer.layers": "1",
         "reducer.heads": "2", "reducer.ff": "8"}  # fmt: skip


def config(tmp_path: Path, **sets: str) -> Config:
    """Digits, four quadrant views, tiny nets; its run in ``tmp_path/run``."""
    base = {"run_id": "fits", "run_dir": str(tmp_path / "run"), **SMALL}
    return load_config(overrides={**base, **sets}, env={})


def save_run(cfg: Config, *, steps: int = 10, out_dim: int = 10) -> RunDir:
    """Checkpoints as the services write them (the fields the checks read), no training."""
    run = RunDir(cfg.run_path)
    views = view_specs(cfg.data)
    for i, view in enumerate(views):
        online, target, opt = build_expert(cfg, i, len(view.columns))
        checkpoint.save_atomic({
            "run_id": cfg.run_id, "expert_id": i, "online": online.state_dict(),
            "target": target.state_dict(), "optimizer": opt.state_dict(), "seq_next": steps,
            "accounts": {"sent": steps, "applied": steps},
        }, run.expert_checkpoint(i))  # fmt: skip
    model, opt = build_reducer(cfg, n_experts=len(views), out_dim=out_dim)
    checkpoint.save_atomic({
        "run_id": cfg.run_id, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "train_steps": steps, "last_seq": steps - 1,
    }, run.reducer_checkpoint)  # fmt: skip
    return run


def refusal(cfg: Config, *, serve: bool = False) -> str:
    with pytest.raises(CheckpointError) as info:
        check_run(cfg, serve=serve)
    message = str(info.value)
    assert "\n" not in message  # one line
    return message


def test_checkpoints_that_fit_pass(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    save_run(cfg)
    check_run(cfg)
    check_run(cfg, serve=True)
    check_run(config(tmp_path, **{"train.steps": "5000", "expert.lr": "0.01"}))  # not shapes


def test_no_checkpoints_resume_afresh_but_serve_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    check_run(cfg)
    assert "holds no checkpoints: train the run first" in refusal(cfg, serve=True)


def test_a_changed_number_of_views_is_named(tmp_path: Path) -> None:
    save_run(config(tmp_path))
    message = refusal(config(tmp_path, **{"data.views": "halves"}))
    assert "reducer.pt was trained with 4 experts, the config has 2 views" in message
    assert "data.views: 'halves'" in message
    assert f"delete {tmp_path / 'run'}" in message and "--fresh" in message


def test_expert_checkpoints_beyond_the_views_are_named(tmp_path: Path) -> None:
    run = save_run(config(tmp_path))
    run.reducer_checkpoint.unlink()  # no reducer to count the experts: the files do
    message = refusal(config(tmp_path, **{"data.views": "halves"}))
    assert "holds expert-2.pt, expert-3.pt but the config has 2 views" in message


def test_a_changed_hidden_size_names_the_tensor_and_the_key(tmp_path: Path) -> None:
    save_run(config(tmp_path))
    message = refusal(config(tmp_path, **{"expert.model.hidden": "[12]"}))
    assert "expert-0.pt does not fit the config" in message
    assert "net.0.weight is [8, 16] in the checkpoint, [12, 16] in the net the config" in message
    assert "16 columns), expert.model, embed_dim and reducer.linear_path" in message
    message = refusal(config(tmp_path, **{"reducer.ff": "16"}))
    assert "reducer.pt does not fit the config: blocks.0.mlp.0.weight is [8, 8]" in message


def test_a_missing_expert_checkpoint_of_a_trained_run(tmp_path: Path) -> None:
    run = save_run(config(tmp_path))
    run.expert_checkpoint(2).unlink()
    message = refusal(config(tmp_path))
    assert "lacks expert-2.pt of a run that has trained" in message
    assert "lacks expert-2.pt" in refusal(config(tmp_path), serve=True)


def test_a_missing_expert_checkpoint_before_any_step_starts_it_afresh(tmp_path: Path) -> None:
    run = save_run(config(tmp_path), steps=0)  # stopped before its first step
    run.expert_checkpoint(2).unlink()
    check_run(config(tmp_path))


def test_another_runs_checkpoint_is_named(tmp_path: Path) -> None:
    save_run(config(tmp_path))
    message = refusal(config(tmp_path, run_id="other"))
    assert "has run_id='fits', not 'other'" in message and "start afresh" in message


def test_serving_says_to_serve_with_the_trained_config(tmp_path: Path) -> None:
    save_run(config(tmp_path))
    message = refusal(config(tmp_path, embed_dim="16"), serve=True)
    assert message.endswith(remedy(config(tmp_path), serve=True))


def test_a_user_module_that_does_not_import_is_a_config_error(tmp_path: Path) -> None:
    save_run(config(tmp_path))
    cfg = config(tmp_path, **{"expert.model.module": "no_such_pkg.nets:Tower"})
    with pytest.raises(ConfigError, match="no_such_pkg.nets:Tower"):
        check_run(cfg)


def test_the_reducer_names_changed_classes(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run = save_run(cfg, out_dim=10)
    net, _ = build_reducer(cfg, n_experts=4, out_dim=3)
    state = torch.load(run.reducer_checkpoint, weights_only=False)
    with pytest.raises(CheckpointError, match="predicts 10 outputs, the data now gives 3"):
        reducer_weights(cfg, state, run.reducer_checkpoint, net, fix="fix it")


def test_weights_of_another_net_are_named() -> None:
    want = {"a": torch.zeros(2), "b": torch.zeros(3)}
    assert checkpoint.weights_problem(want, {"a": torch.zeros(2), "b": torch.zeros(3)}) is None
    assert checkpoint.weights_problem(want, {"a": torch.zeros(2), "c": torch.zeros(3)}) == (
        "its tensors are another net's: it lacks b; it has extra c"
    )
    assert "not a state dict" in (checkpoint.weights_problem(want, [1, 2]) or "")


def test_exit_codes_are_stable() -> None:
    """2 and 3 are what the Kubernetes Jobs fail on at once (podFailurePolicy) and what
    ``traci up`` never restarts; a lost peer is a crash (1): a restart may find it back."""
    assert exit_code(CheckpointError("x"), service=True) == 2
    assert exit_code(ConfigError("x"), service=True) == 2
    assert exit_code(DataError("x"), service=True) == 3
    assert exit_code(DataError("x")) == 2  # a command's, not a service's
    assert exit_code(PeerTimeout("x"), service=True) == 1
    assert exit_code(PeerTimeout("x")) == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("service", [["reducer"], ["expert", "--id", "1"]])
def test_a_service_with_a_checkpoint_that_does_not_fit_exits_2_in_one_line(
    tmp_path: Path, service: list[str]
) -> None:
    save_run(config(tmp_path))
    sets = {**SMALL, "run_id": "fits", "run_dir": str(tmp_path / "run"), "data.views": "halves",
            "metrics.reducer_port": "0", "metrics.expert_base_port": "0"}  # fmt: skip
    argv = [
        *TRACI,
        *service,
        "--resume",
        *(a for k, v in sets.items() for a in ("--set", f"{k}={v}")),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    want = "trained with 4 experts, the config has 2" if service == ["reducer"] else (
        "expert-1.pt does not fit the config: net.0.weight is [8, 16] in the checkpoint, "
        "[8, 32] in the net the config builds"
    )  # fmt: skip
    assert lines[0].startswith(f"traci {service[0]}: error: ") and want in lines[0]
