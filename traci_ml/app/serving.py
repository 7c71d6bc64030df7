"""``traci serve`` and ``traci request``: served prediction from the command line.

``traci serve --run RUN_DIR`` is ``traci up``'s serve mode: the same supervised processes
(``traci_ml.app.launcher.Child``), each started with ``--serve`` so it loads the run's latest
checkpoint and only answers queries -- nothing is trained and no run file is rewritten. It
serves until Ctrl-C (or SIGTERM). An expert that fails for good is left down (the broker
masks it, replies say who took part); the broker or reducer failing for good ends it (1).

``traci request --input CSV`` sends a CSV's rows to a front door and prints the answers.
See docs/serving.md.
"""

from __future__ import annotations

import argparse
import csv
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np
import yaml

from traci_ml.app.launcher import POLL, STABLE, Child, _interrupt, _stop_all
from traci_ml.app.launcher import _children as _up_children
from traci_ml.core.config import Config, load_config, parse_set
from traci_ml.core.errors import CheckpointError, ConfigError, DataError
from traci_ml.core.files import write_json_atomic

SERVE_CONFIG = "serve.yaml"  # the effective config `traci serve` hands its services
SERVE_PIDS = "serve-pids.json"


def serve_config(run: str | Path, overrides: list[str], *, insecure: bool = False) -> Config:
    """The run's own config (launch.yaml, else the reducer's config.json) with ``run_dir``
    set to ``run`` and the ``--set`` overrides applied."""
    run_path = Path(run)
    found = [run_path / n for n in ("launch.yaml", "config.json") if (run_path / n).exists()]
    if not found:
        raise CheckpointError(f"{run_path} holds no launch.yaml or config.json: not a run")
    sets = {**parse_set(overrides), "run_dir": str(run_path)}
    if insecure:
        sets["security.insecure"] = "true"
    return load_config(found[0], overrides=sets)


def serve(config: Config, *, out: TextIO = sys.stdout) -> int:
    """Run broker, reducer and experts in serve mode until interrupted; the exit code."""
    from traci_ml.core.data import expert_count

    run_path = config.run_path
    n = expert_count(config)
    ckpt = run_path / "checkpoints"
    missing = [p for p in ["reducer.pt", *(f"expert-{i}.pt" for i in range(n))]
               if not (ckpt / p).exists()]  # fmt: skip
    if missing:
        raise CheckpointError(f"{ckpt} lacks {', '.join(missing)}: train the run first")
    if not config.network.serve_port:
        raise ConfigError("traci serve needs network.serve_port (it is 0)")
    path = run_path / SERVE_CONFIG
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (run_path / "logs").mkdir(parents=True, exist_ok=True)
    children = _children(config, path)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for child in children:
            child.start()
        _write_pids(run_path, children)
        net = config.network
        from traci_ml.core.security import tcp_endpoint

        where = tcp_endpoint(net.broker_host, net.serve_port)
        print(f"serving {run_path} on {where} ({n} experts; logs in {run_path}/logs); "
              "Ctrl-C to stop", file=out, flush=True)  # fmt: skip
        code = _watch(children, config, out)
    except KeyboardInterrupt:
        print("interrupted: stopping every service", file=out, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_all(children)
    return code


def _children(config: Config, path: Path) -> list[Child]:
    """``traci up``'s processes (``launcher._children``), each with ``--serve``; a restart
    runs the same command (serving always starts from the latest checkpoint)."""
    children = _up_children(config, path, resume=False, gpus=0)
    for child in children:
        child.argv = child.restart_argv = [*child.argv, "--serve"]
        child.log_path = child.log_path.with_name(f"serve-{child.name}.log")
    return children


def _write_pids(run_path: Path, children: list[Child]) -> None:
    pids = {c.name: c.pid for c in children if c.pid is not None and c.code is None}
    write_json_atomic(run_path / SERVE_PIDS, pids)


def _watch(children: list[Child], config: Config, out: TextIO) -> int:
    """Restart what fails (``launcher`` policy); 1 when the broker or reducer is gone."""
    policy, gone = config.launcher, set()
    while True:
        now = time.monotonic()
        for child in children:
            if child.name in gone:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.start()
                    _write_pids(config.run_path, children)
                continue
            code = child.code
            if code is None:
                continue
            if policy.restart == "never" or child.restarts >= policy.max_restarts:
                print(f"{child.name} exited with code {code}; last log lines:\n{child.tail()}",
                      file=out, flush=True)  # fmt: skip
                if not child.name.startswith("expert-"):
                    return 1
                gone.add(child.name)  # the broker masks it; replies say who took part
                _write_pids(config.run_path, children)
                continue
            child.restarts += 1
            child.streak = 1 if now - child.started_at >= STABLE else child.streak + 1
            delay = policy.restart_delay * 2 ** (child.streak - 1)
            child.restart_at = now + delay
            print(f"{child.name} exited with code {code}: restart {child.restarts}/"
                  f"{policy.max_restarts} in {delay:.1f}s", file=out, flush=True)  # fmt: skip
        time.sleep(POLL)


# -- traci request --------------------------------------------------------------------------


def read_rows(path: str, columns: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Feature rows of a CSV with a header (the one table reader): the ``columns`` given,
    else every column whose values are all numbers (a label column of names is left out).
    NaN and Inf cells are sent as they are: the cluster answers ``non_finite``."""
    from traci_ml.core.data import read_csv_table

    table = read_csv_table(path)
    if table.rows < 1:
        raise DataError(f"{path} needs a header row and at least one row")
    if columns:
        table.require(columns)
    else:
        columns = [h for h in table.header if table.numeric(h)]
    table.check_unique(columns)
    return table.numbers(columns, finite=False), columns


def request(args: argparse.Namespace, config: Config) -> int:
    """``traci request``: CSV rows to the front door, answers as CSV (stdout or --output)."""
    from traci_ml.app.client import Client

    x, columns = read_rows(args.input, args.columns.split(",") if args.columns else None)
    if args.endpoint:
        from traci_ml.core.security import peer_keys

        client = Client(args.endpoint, timeout=args.timeout, curve=peer_keys(config, "client"))
    else:
        client = Client.from_config(config, timeout=args.timeout)
    with client:
        pred = client.predict(x, columns)
    head = ["row", "prediction"]
    if pred.task == "classification":
        head += [f"prob_{c}" for c in pred.classes]
        body = [
            [lab, *(f"{v:.9g}" for v in row)]
            for lab, row in zip(pred.labels, pred.outputs, strict=True)
        ]
    else:
        body = [[f"{v:.9g}"] for v in pred.values]
    out = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(head)
        for r, cells in enumerate(body):
            writer.writerow([r, *cells])
    finally:
        if out is not sys.stdout:
            out.close()
    who = ", ".join(f"{i} ({n})" for i, n in zip(pred.experts, pred.expert_names, strict=True))
    print(f"{len(x)} rows served by experts {who} in a batch of {pred.batch_rows} rows "
          f"({pred.latency * 1000:.1f} ms)", file=sys.stderr)  # fmt: skip
    return 0


def request_ids(args: argparse.Namespace, config: Config) -> int:
    """``traci request --ids``: rows by id; each expert looks its own rows up. The answer
    as CSV: row, id, prediction, probabilities, and the experts that took part per row."""
    from traci_ml.app.client import Client
    from traci_ml.core.ids import read_ids

    ids = read_ids(args.ids, config.data.id).tolist()
    if args.endpoint:
        from traci_ml.core.security import peer_keys

        client = Client(args.endpoint, timeout=args.timeout, curve=peer_keys(config, "client"))
    else:
        client = Client.from_config(config, timeout=args.timeout)
    with client:
        pred = client.predict_ids(ids)
    rows = pred.row_experts or (tuple(pred.experts),) * len(ids)
    head = ["row", "id", "prediction"]
    if pred.task == "classification":
        head += [f"prob_{c}" for c in pred.classes]
        body = [[lab, *(f"{v:.9g}" for v in row)]
                for lab, row in zip(pred.labels, pred.outputs, strict=True)]  # fmt: skip
    else:
        body = [[f"{v:.9g}"] for v in pred.values]
    out = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*head, "experts"])
        for r, (i, cells, took) in enumerate(zip(ids, body, rows, strict=True)):
            writer.writerow([r, i, *cells, " ".join(str(e) for e in took)])
    finally:
        if out is not sys.stdout:
            out.close()
    lacking = sum(len(t) < len(pred.experts) for t in rows)
    print(f"{len(ids)} ids served by experts {list(pred.experts)}; {lacking} rows with an expert "
          f"masked ({pred.latency * 1000:.1f} ms)", file=sys.stderr)  # fmt: skip
    return 0
