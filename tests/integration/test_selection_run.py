"""Model selection in real `traci up` runs (docs/config.md "Model selection").

A two-party CSV whose validation rows have their labels flipped, by construction: the better
a model is on the task (and on the test split), the worse it scores on validation. The best
round is then an early one, chosen on validation, never on test; early stopping ends the run
long before its step budget; every service's best checkpoint is of that round; and `traci
predict` answers with the best round's model, not the last one. Then a digits run whose
expert is SIGKILLed: it is restarted, and the best checkpoints still agree on one round."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cluster import Cluster
from traci_ml.app import predict as P
from traci_ml.app.checkpoints import choose
from traci_ml.app.cli import main
from traci_ml.core import checkpoint
from traci_ml.core.align import split_order, validation_split
from traci_ml.core.rundir import RunDir

pytestmark = pytest.mark.integration
TRACI = [sys.executable, "-m", "traci_ml.app.cli"]
N, SEED, TEST, VAL, STEPS = 600, 0, 0.2, 0.25, 400


def flipped_table(path: Path) -> Path:
    """y = [a + b > 0]; the rows the seed carves for validation have the other label."""
    rng = np.random.default_rng(11)
    x = rng.normal(size=(N, 2)).round(4)
    y = (x.sum(axis=1) > 0).astype(int)
    train, _ = split_order(N, SEED, TEST)
    _, val = validation_split(len(train), SEED, VAL)
    y[train[val]] = 1 - y[train[val]]
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["a", "b", "y"])
        out.writerows([a, b, label] for (a, b), label in zip(x, y, strict=True))
    return path


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.read_text().splitlines()))


def probs(table: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(r["prob_0"]), float(r["prob_1"])] for r in table])


def accuracy(table: list[dict[str, str]]) -> float:
    return float(np.mean([r["label"] == r["prediction"] for r in table]))


@pytest.mark.timeout(240)
def test_best_on_validation_early_stopping_and_predict_uses_the_best(run_config, tmp_path):
    data = flipped_table(tmp_path / "flipped.csv")
    path, cfg = run_config({
        "seed": SEED, "embed_dim": 8,
        "data": {"source": "csv", "path": str(data), "label": "y", "test_fraction": TEST,
                 "val_fraction": VAL, "views": [{"name": "a", "columns": ["a"]},
                                                {"name": "b", "columns": ["b"]}]},
        "expert": {"model": {"hidden": [16]}, "lr": 0.0005},
        "reducer": {"layers": 1, "heads": 2, "ff": 16, "lr": 0.0005},
        "train": {"steps": STEPS, "batch_size": 32, "eval_every": 10, "checkpoint_every": 0,
                  "log_every": 10, "lr_schedule": "constant", "patience": 2},
    })  # fmt: skip
    proc = subprocess.run([*TRACI, "up", str(path)], capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = RunDir(cfg["run_dir"])
    summary = json.loads(run.summary.read_text())
    history = summary["eval_history"]

    # early stopping: two rounds without a better validation accuracy, long before the budget
    assert summary["stop_reason"] == "early_stopping"
    assert summary["steps"] < STEPS and len(history) < STEPS // 10
    assert [r["best"] for r in history[-2:]] == [False, False]
    # the best round is the best on validation: accuracy on flipped labels, max (the later
    # of rounds that tie)
    assert all(r["split"] == "val" and r["eligible"] for r in history)
    val = [r["accuracy"] for r in history]
    best = summary["best"]
    assert best["round"] == len(val) - 1 - int(np.argmax(val[::-1])) and best["value"] == max(val)
    assert best["step"] == 10 * (best["round"] + 1) and best["monitor"] == "accuracy"
    assert val[best["round"]] > val[-1]  # validation got worse as the model got better ...
    assert f"(best round {best['round']}, step {best['step']}; stopped early)" in proc.stdout

    # ... every service kept the weights of that round, and nothing else is left
    saved = [checkpoint.load(p, run_id=cfg["run_id"]) for p in run.best_checkpoints(2)]
    marks = {(state["round"], state["step"]) for state in saved}
    assert marks == {(best["round"], best["step"])}
    assert not run.expert_candidates(0) and not run.expert_candidates(1)

    # predict uses the best round's model: it answers exactly as the test scoring did
    out, last_out = tmp_path / "best.csv", tmp_path / "last.csv"
    assert main(["predict", "--run", str(run.path), "--split", "test", "--output", str(out)]) == 0
    scored = rows(run.eval_predictions)
    got = rows(out)
    assert [r["id"] for r in got] == [r["id"] for r in scored] and len(got) == 120
    np.testing.assert_allclose(probs(got), probs(scored), rtol=1e-5, atol=1e-6)
    assert accuracy(got) == pytest.approx(summary["test_accuracy"], abs=1e-7)
    assert summary["test"]["samples"] == 120 and summary["test"]["round"] == len(history)
    predictor = P.load_predictor(run.path)  # --input and export load through here
    x = np.array([[float(r["a"]), float(r["b"])] for r in rows(data)], dtype=np.float32)
    ids = [int(r["id"]) for r in got]
    np.testing.assert_allclose(P.predict_array(predictor, x[ids])["prob_1"], probs(got)[:, 1],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # ... and not the last model's, which is better on test: selection never looked at it
    argv = ["predict", "--run", str(run.path), "--split", "test", "--checkpoint", "last"]
    assert main([*argv, "--output", str(last_out)]) == 0
    assert accuracy(rows(last_out)) > accuracy(got)
    # traci serve answers with the best round's model too
    served = serve_probs(run.path, x[ids])
    np.testing.assert_allclose(served, probs(got), rtol=1e-4, atol=1e-5)
    print(
        f"\nvalidation accuracy by round {np.round(val, 3).tolist()}, best round "
        f"{best['round']}; test accuracy best {accuracy(got):.3f}, last "
        f"{accuracy(rows(last_out)):.3f}; stopped after {summary['steps']} of {STEPS} steps"
    )


def serve_probs(run: Path, x: np.ndarray) -> np.ndarray:
    """The probabilities `traci serve` answers for rows ``x`` (columns a, b)."""
    from tests.helpers.serve_proc import traci_serve
    from tests.helpers.support import free_ports
    from traci_ml.app.client import Client
    from traci_ml.core.errors import ServeError

    ports = free_ports(3)
    sets = {
        "network.expert_port": ports[0],
        "network.reducer_port": ports[1],
        "network.serve_port": ports[2],
        "serve.http_port": 0,
        "launcher.restart": "never",
    }
    with traci_serve(run, sets, "serve.out"):
        deadline = time.monotonic() + 90
        with Client(f"tcp://127.0.0.1:{ports[2]}", timeout=5) as client:
            while True:
                try:
                    pred = client.predict(x, ["a", "b"])
                    break
                except ServeError as exc:  # until every service has registered
                    if exc.status not in ("no_expert", "no_reducer", "timeout") or (
                        time.monotonic() > deadline
                    ):
                        raise
                    time.sleep(0.3)
    assert pred.classes == ("0", "1"), pred.classes
    return np.asarray(pred.outputs)


@pytest.mark.timeout(300)
def test_a_sigkilled_expert_keeps_the_best_checkpoints_of_one_round(run_config, tmp_path):
    path, cfg = run_config({
        "train": {"steps": 600, "eval_every": 60, "checkpoint_every": 100},
        "launcher": {"restart_delay": 0.5},
    })  # fmt: skip
    with Cluster(path, cfg) as cluster:
        cluster.wait_for_step(150)
        old = cluster.kill("expert-1")
        cluster.wait_restarted("expert-1", old)
        code, output = cluster.finish()
    assert code == 0, output[-4000:]
    run = RunDir(cfg["run_dir"])
    summary = json.loads(run.summary.read_text())
    assert summary["stop_reason"] == "steps_exhausted" and summary["test_accuracy"] >= 0.9
    eligible = [r for r in summary["eval_history"] if r["eligible"]]
    assert len(eligible) < len(summary["eval_history"])  # a round expert 1 missed: not a candidate
    chosen = choose(run, 4, cfg["run_id"], "best")  # raises unless all are of one round
    assert (chosen.round, chosen.step) == (summary["best"]["round"], summary["best"]["step"])
    assert not any(run.expert_candidates(i) for i in range(4))
    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(run.path), "--split", "test", "--output", str(out)]) == 0
    np.testing.assert_allclose(probs_all(rows(out)), probs_all(rows(run.eval_predictions)),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def probs_all(table: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in table])
