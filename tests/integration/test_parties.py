"""Data where it lives (docs/parties.md): each party reads only its own file, rows align by id
through the broker (plain or psi), and rows an expert lacks train with that expert masked.

Real runs: ``traci up`` (or the services by hand behind a recording proxy), digits split into
four quadrant files and a label file by ``traci_ml.app.partysplit``, every file in its own
shuffled row order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.helpers.recorder import Recorder
from tests.helpers.support import deep_update, free_ports
from traci_ml.app.partysplit import split_run
from traci_ml.core.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TRACI = [sys.executable, "-m", "traci_ml.app.cli"]
STEPS = 400
# lock-step (window 1): the same rows meet the same weights in both runs of a comparison
SETTINGS = {"expert": {"window": 1}, "train": {"steps": STEPS, "eval_every": 0,
                                               "checkpoint_every": 0}}  # fmt: skip
AUDIT_HOOK = """
import os, sys
_dir = os.environ.get("TRACI_TEST_AUDIT_DIR")
if _dir:
    _log = os.path.join(_dir, f"{os.getpid()}.log")
    def _hook(event, args):
        if event == "traci_ml.core.data.read":
            with open(_log, "a") as fh:
                fh.write(" ".join(sys.argv[1:4]) + "\\t" + str(args[0]) + "\\n")
    sys.addaudithook(_hook)
"""


def configure(path: Path, run_dir: Path, extra: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """``path``'s config on fresh loopback ports, metrics off, into ``run_dir``."""
    expert_port, reducer_port, serve_port = free_ports(3)
    raw = yaml.safe_load(path.read_text())
    raw = deep_update(raw, {
        "run_id": run_dir.name, "run_dir": str(run_dir),
        "network": {"expert_port": expert_port, "reducer_port": reducer_port,
                    "serve_port": serve_port, "heartbeat_interval": 0.2, "liveness": 2.0,
                    "connect_timeout": 60},
        "metrics": {"broker_port": 0, "reducer_port": 0, "expert_base_port": 0},
    })  # fmt: skip
    raw = deep_update(raw, extra)
    out = run_dir.parent / f"{run_dir.name}.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out, raw


def up(config: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run([*TRACI, "up", str(config)], capture_output=True, text=True,
                          timeout=400, env={**os.environ, **(env or {})})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = Path(yaml.safe_load(config.read_text())["run_dir"])
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def digits_config(tmp_path_factory) -> Path:
    """The one-table digits run (examples/digits.yaml) this module compares against."""
    root = tmp_path_factory.mktemp("one")
    path = root / "digits.yaml"
    path.write_text(Path("examples/digits.yaml").read_text())
    return path


def split(root: Path, **kw: Any) -> Path:
    return split_run(load_config("examples/digits.yaml"), root, **kw)


def test_quadrant_files_with_shuffled_rows_train_as_the_one_table_run(digits_config, tmp_path):
    """Full overlap, every file shuffled: the same held-out accuracy as the one-table run;
    each expert process read its own file alone, the reducer the labels alone."""
    one, _ = configure(digits_config, tmp_path / "one", SETTINGS)
    baseline = up(one)
    parties = split(tmp_path / "files", overlap=1.0, fmt="parquet")
    cfg, raw = configure(parties, tmp_path / "parties", SETTINGS)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT_HOOK)
    audit = tmp_path / "audit"
    audit.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
           "TRACI_TEST_AUDIT_DIR": str(audit)}  # fmt: skip
    summary = up(cfg, env)
    print(f"accuracy: one table {baseline['test_accuracy']:.4f}, "
          f"quadrant files {summary['test_accuracy']:.4f}")  # fmt: skip
    assert abs(summary["test_accuracy"] - baseline["test_accuracy"]) <= 0.005
    assert summary["test_accuracy"] >= 0.9
    assert all(o["overlap"] == 1.0 for o in summary["overlap"].values())
    assert len(summary["overlap"]) == 4 and not summary["rows_skipped"]

    reads: dict[str, set[str]] = {}
    for log in audit.glob("*.log"):
        for line in log.read_text().splitlines():
            who, path = line.split("\t")
            reads.setdefault(who.split(" --config")[0].strip(), set()).add(Path(path).name)
    views = [v["path"] for v in raw["data"]["views"]]
    assert reads.pop("reducer") == {"labels.parquet"}
    for i, path in enumerate(views):
        assert reads.pop(f"expert --id {i}") == {Path(path).name}
    assert not reads, f"other processes read data: {reads}"  # the broker and traci up: none
    # traci up drew the heat map of attention by class from the reducer's own scoring
    run_dir = Path(raw["run_dir"])
    assert (run_dir / "plots" / "attention_by_class.png").stat().st_size > 1000

    # the same test rows, by id, in both runs' row-by-row predictions
    def rows(run: str) -> list[dict[str, str]]:
        text = (tmp_path / run / "eval_predictions.csv").read_text()
        return [dict(zip(text.splitlines()[0].split(","), line.split(","), strict=True))
                for line in text.splitlines()[1:]]  # fmt: skip

    a, b = rows("one"), rows("parties")
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["label"] for r in a] == [r["label"] for r in b]


def test_partial_overlap_trains_with_per_row_masks_better_than_shared_rows_only(tmp_path):
    """Each expert holds a random 70% of the ids. Every labelled row trains (absent experts
    masked per row) against the same model trained only on the rows all experts share
    (data.train_rows: shared, with a 4x batch so a step sees as many rows); both are scored
    on the same test rows, masks and all."""
    parties = split(tmp_path / "files", overlap=0.7, fmt="csv", seed=1)
    masked_cfg, _ = configure(parties, tmp_path / "masked", SETTINGS)
    masked = up(masked_cfg)
    shared_cfg, _ = configure(parties, tmp_path / "shared", deep_update(SETTINGS, {
        "data": {"train_rows": "shared"}, "train": {"batch_size": 256}}))  # fmt: skip
    shared = up(shared_cfg)
    print(f"accuracy: per-row masks {masked['test_accuracy']:.4f}, shared rows only "
          f"{shared['test_accuracy']:.4f}; by experts present: masked "
          f"{masked['test_accuracy_by_experts_present']}, shared "
          f"{shared['test_accuracy_by_experts_present']}")  # fmt: skip
    assert masked["test_accuracy"] > shared["test_accuracy"]
    for summary in (masked, shared):
        for name, o in summary["overlap"].items():
            assert o["overlap"] == pytest.approx(0.7, abs=0.001), name
        by = summary["test_accuracy_by_experts_present"]
        assert sum(p["samples"] for p in by.values()) == summary["test"]["samples"]
        assert set(by) <= {"1", "2", "3", "4"}
    # shared rows: about 0.7**4 of the train rows, the others skipped and counted
    skipped = shared["rows_skipped"]["train/not_shared"]
    assert skipped > 0.5 * STEPS * 256
    assert masked["rows_skipped"].get("train/not_shared", 0) == 0


# ---- psi: the frames that cross the broker ----------------------------------------------


def recorded_run(parties: Path, run_dir: Path, mode: str) -> tuple[dict[str, Any], Recorder]:
    """The services by hand, the peers behind a recorder; the run's summary and recording."""
    cfg, raw = configure(parties, run_dir, deep_update(SETTINGS, {"data": {"align": mode}}))
    net = raw["network"]
    rec = Recorder(broker_experts=f"tcp://127.0.0.1:{net['expert_port']}",
                   broker_reducer=f"tcp://127.0.0.1:{net['reducer_port']}")  # fmt: skip
    rec.start()
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str) -> None:
        with (logs / f"{name}.log").open("w") as fh:
            procs[name] = subprocess.Popen([*TRACI, *args, "--config", str(cfg)], stdout=fh,
                                           stderr=subprocess.STDOUT)  # fmt: skip

    try:
        start("broker", "broker")
        start("reducer", "reducer", "--set", f"network.reducer_port={rec.ports['reducer']}")
        for i in range(len(raw["data"]["views"])):
            start(f"expert-{i}", "expert", "--id", str(i),
                  "--set", f"network.expert_port={rec.ports['expert']}")  # fmt: skip
        deadline = time.monotonic() + 300
        while procs["reducer"].poll() is None and time.monotonic() < deadline:
            for name, p in procs.items():
                assert p.poll() in (None, 0), (logs / f"{name}.log").read_text()[-3000:]
            time.sleep(0.2)
        assert procs["reducer"].returncode == 0, (logs / "reducer.log").read_text()[-3000:]
        for p in procs.values():
            p.wait(30)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        rec.stop()
    assert rec.error is None, rec.error
    return json.loads((run_dir / "summary.json").read_text()), rec


def ids_of(path: Path) -> set[str]:
    import pyarrow.csv as pacsv

    return set(pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types={"id": "string"})).column("id").to_pylist())  # fmt: skip


def test_psi_alignment_lets_no_id_cross_the_broker_and_trains_as_plain(tmp_path):
    """Text ids (``row-000042-id``): experts hold 70% of them each, the labels 85%. Every
    frame through the broker is recorded: in psi mode no party receives an id it does not
    hold, and the broker (which holds none) receives none at all; the plain run is the
    control (ids do travel there) and trains to the same accuracy."""
    parties = split(tmp_path / "files", overlap=0.7, labelled=0.85, id_type="str", seed=2)
    raw = yaml.safe_load(parties.read_text())
    everyone = ids_of(Path(raw["data"]["labels"]["path"]))
    held = {"reducer": everyone}
    for i, v in enumerate(raw["data"]["views"]):
        held[f"expert-{i}"] = ids_of(Path(v["path"]))
        everyone = everyone | held[f"expert-{i}"]
    assert all(len(everyone - h) > 100 for h in held.values())  # each lacks many ids

    def foreign(rec: Recorder, party: str, direction: str, own: set[str]) -> list[str]:
        blob = b"".join(rec.frames[(party, direction)])
        assert len(blob) > 10_000, (party, direction)  # the recording has the traffic
        return [i for i in everyone - own if i.encode() in blob]

    psi, rec = recorded_run(parties, tmp_path / "psi", "psi")
    assert "ALIGN" in rec.kinds[("expert-0", "up")] and "ALIGN" in rec.kinds[("reducer", "down")]
    for party, own in held.items():
        leaked = foreign(rec, party, "down", own)
        assert not leaked, f"{party} received ids it does not hold: {leaked[:5]}"
    for party in held:  # what the broker received from every party
        leaked = foreign(rec, party, "up", set())
        assert not leaked, f"the broker received ids from {party}: {leaked[:5]}"

    plain, rec = recorded_run(parties, tmp_path / "plain", "plain")
    assert foreign(rec, "reducer", "down", held["reducer"])  # control: plain ids do travel
    print(f"accuracy: psi {psi['test_accuracy']:.4f}, plain {plain['test_accuracy']:.4f}")
    assert abs(psi["test_accuracy"] - plain["test_accuracy"]) <= 0.005
    assert psi["overlap"] == plain["overlap"]


def test_an_expert_with_no_labelled_id_stops_the_run_with_one_clear_line(tmp_path):
    parties = split(tmp_path / "files", overlap=1.0, fmt="csv")
    raw = yaml.safe_load(parties.read_text())
    first = Path(raw["data"]["views"][0]["path"])
    text = first.read_text().splitlines()  # ids shifted out of the labels' range
    shifted = [text[0]] + [str(int(line.split(",")[0]) + 10_000) + line[line.index(","):]
                           for line in text[1:]]  # fmt: skip
    first.write_text("\n".join(shifted) + "\n")
    cfg, _ = configure(parties, tmp_path / "run", SETTINGS)
    t0 = time.monotonic()
    proc = subprocess.run([*TRACI, "up", str(cfg)], capture_output=True, text=True, timeout=200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "expert-0 exited with code 3" in out, out[-3000:]
    assert "zero overlap" in out and str(first) in out, out[-3000:]
    assert "restart 1/" not in out and time.monotonic() - t0 < 120
    assert not (tmp_path / "run" / "checkpoints" / "expert-0.pt").exists()


def test_parties_with_different_id_types_are_refused_before_training(tmp_path):
    parties = split(tmp_path / "files", overlap=1.0, fmt="csv")
    raw = yaml.safe_load(parties.read_text())
    first = Path(raw["data"]["views"][1]["path"])
    lines = first.read_text().splitlines()
    first.write_text("\n".join([lines[0]] + [f"u{line}" for line in lines[1:]]) + "\n")
    cfg, _ = configure(parties, tmp_path / "run", SETTINGS)
    proc = subprocess.run([*TRACI, "up", str(cfg)], capture_output=True, text=True, timeout=200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "expert-1 exited with code 3" in out, out[-3000:]
    assert "holds str ids but" in out and "int ids" in out, out[-3000:]
    assert not list((tmp_path / "run").glob("summary.json"))


def test_served_prediction_by_id_equals_traci_predict_with_absent_experts_masked(tmp_path):
    """`traci serve` on a finished 70%-overlap run: a client sends only ids; each expert
    looks its own rows up. The answers equal `traci predict` on the same ids (same masks),
    and say per row which experts took part."""
    from traci_ml import Client
    from traci_ml.app.client import ServeError
    from traci_ml.app.predict import predict_ids

    parties = split(tmp_path / "files", overlap=0.7, fmt="csv", seed=3)
    raw = yaml.safe_load(parties.read_text())
    cfg, _ = configure(parties, tmp_path / "run", deep_update(SETTINGS, {
        "train": {"steps": 150}}))  # fmt: skip
    up(cfg)
    run = tmp_path / "run"
    held = [ids_of(Path(v["path"])) for v in raw["data"]["views"]]
    everyone = sorted(set.union(*held), key=int)
    ids = [int(i) for i in everyone[:60]] + [10**9]  # an id no party holds, last
    lacking = [(k, i) for k, i in enumerate(ids[:-1]) if not all(str(i) in h for h in held)]
    assert lacking, "some rows must lack an expert"

    ports = free_ports(3)
    sets = {"network.expert_port": ports[0], "network.reducer_port": ports[1],
            "network.serve_port": ports[2], "launcher.restart": "never",
            "serve.max_wait_ms": 20}  # fmt: skip
    log = (tmp_path / "serve.out").open("w")
    proc = subprocess.Popen([*TRACI, "serve", "--run", str(run),
                             *(f"--set={k}={v}" for k, v in sets.items())],
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        with Client(f"tcp://127.0.0.1:{ports[2]}", timeout=10) as client:
            deadline = time.monotonic() + 150
            while True:
                try:
                    got = client.predict_ids(ids, timeout=5)
                    if len(got.experts) == 4:
                        break
                except ServeError as exc:
                    if exc.status not in ("no_expert", "no_reducer", "timeout"):
                        raise
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
            text = client.predict_ids([str(i) for i in ids[:3]], timeout=5)  # wrong id type
        cli = subprocess.run([*TRACI, "request", "--endpoint", f"tcp://127.0.0.1:{ports[2]}",
                              "--ids", ",".join(str(i) for i in ids)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert cli.returncode == 0, cli.stderr[-2000:]
    finally:
        proc.send_signal(2)
        proc.wait(90)
        log.close()
    offline = predict_ids(run, ids)
    probs = np.stack([offline[f"prob_{c}"] for c in got.classes], axis=1).astype(np.float32)
    np.testing.assert_allclose(got.outputs, probs, rtol=1e-5, atol=1e-6)
    assert got.labels == [str(p) for p in offline["prediction"]]
    for k, row in enumerate(got.row_experts):
        masked = {int(e) for e in str(offline["absent"][k]).split()}
        assert set(row) == set(range(4)) - masked, (ids[k], row, masked)
    for k, i in lacking:
        assert set(got.row_experts[k]) == {e for e in range(4) if str(i) in held[e]}
    assert got.row_experts[-1] == ()  # held by no party: every expert masked
    assert got.ids == tuple(ids) and offline["id"] == ids
    assert all(r == () for r in text.row_experts)  # text ids never match int ids
    lines = [line.split(",") for line in cli.stdout.splitlines()]  # traci request --ids
    assert lines[0][:3] == ["row", "id", "prediction"] and lines[0][-1] == "experts"
    assert [line[2] for line in lines[1:]] == got.labels
    assert [line[-1] for line in lines[1:]] == [" ".join(map(str, r)) for r in got.row_experts]
