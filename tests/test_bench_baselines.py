"""The benchmark's baselines: the fused one is ``traci_ml.core.reference`` (TRACI's algorithm in
one process, window-1 semantics) under a timer; the torch-rpc split must compute the same thing
step for step."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.baselines import run_fused, run_processes, run_rpc
from bench.reference import reference_config
from traci_ml.core.config import validate
from traci_ml.core.models.expert import build_expert
from traci_ml.core.reference import train_reference

STEPS = 30


def tiny_config(tmp_path: Path) -> dict:
    """The reference model's shape, shrunk: 2 experts, hidden 32, tokens of 32, 2000 rows."""
    raw = reference_config(batch_size=32, steps=STEPS, run_dir=tmp_path, n_experts=2, hidden=32)
    raw["data"]["synthetic"]["rows"] = 2000
    raw["embed_dim"] = 32
    raw["reducer"]["ff"] = 64
    return raw


def assert_same_run(result, reference) -> None:
    """Same losses and the same online and target weights at the end."""
    torch.testing.assert_close(
        torch.tensor(result.losses), torch.tensor(reference.losses), rtol=1e-4, atol=1e-5
    )
    trainer = reference.trainer
    for got, online, target in zip(result.experts, trainer.online, trainer.target, strict=True):
        torch.testing.assert_close(got["online"], online.state_dict(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["target"], target.state_dict(), rtol=1e-4, atol=1e-5)


def test_fused_baseline_times_only_the_steps_after_warmup(tmp_path):
    result = run_fused(tiny_config(tmp_path), warmup=5, threads=1, keep_state=True)
    assert len(result.losses) == STEPS and result.timed_steps == STEPS - 5
    assert result.seconds > 0 and result.samples_per_sec > 0
    assert len(result.experts) == 2  # keep_state: every expert's online and target weights
    assert set(result.experts[0]) == {"online", "target"}


def test_fused_baseline_rejects_warmup_without_timed_steps(tmp_path):
    with pytest.raises(ValueError, match="warmup"):
        run_fused(tiny_config(tmp_path), warmup=STEPS, threads=1)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_rpc_baseline_trains_the_split_like_the_reference(tmp_path):
    """Three processes over torch rpc: every expert's online net gets the reducer's gradient
    (distributed autograd through the straight-through token), its target moves toward it,
    and the losses are the reference's."""
    raw = tiny_config(tmp_path)
    result = run_rpc(raw, warmup=5, keep_state=True, timeout=100)
    reference = train_reference(validate(raw), max_seq=STEPS)
    assert_same_run(result, reference)
    # The same claims, in words (they follow from the equivalence, but fail more readably).
    first, last = result.losses[:5], result.losses[-5:]
    assert sum(last) < sum(first)
    config = validate(raw)
    for i, state in enumerate(result.experts):
        start = build_expert(config, i, in_dim=64)[0].state_dict()  # both nets began here
        for k, w0 in start.items():
            online, target = state["online"][k], state["target"][k]
            assert (online - w0).abs().max() > 0  # the gradient reached the online net
            assert (target - w0).abs().max() > 0  # Polyak pulled the target along
            assert (online - target).abs().max() > 0  # ... lagging, not a copy


SLEEPER = """
import os, sys, time
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    f.write(str(os.getpid()))
os.replace(tmp, sys.argv[1])  # appears whole
time.sleep(60)
"""
FAILER = """
import os, sys, time
while not os.path.exists(sys.argv[1]):  # fail once the other one is up
    time.sleep(0.01)
print("boom")
sys.exit(3)
"""


def test_a_failing_process_takes_the_others_down(tmp_path):
    """One rank fails: the call raises with its log, and the rank still running is killed."""
    pid_file = str(tmp_path / "sleeper.pid")
    commands = [
        [sys.executable, "-c", SLEEPER, pid_file],
        [sys.executable, "-c", FAILER, pid_file],
    ]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 failed:\nboom"):
        run_processes(commands, logs=logs, env=dict(os.environ), timeout=30)
    assert time.monotonic() - started < 10
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(int(Path(pid_file).read_text()), 0)
