"""``traci serve`` and ``traci request``: served prediction from the command line.

``traci serve --run RUN_DIR`` is ``traci up``'s serve mode: the same supervised processes
(``traci_ml.app.supervisor``), each started with ``--serve`` so it loads the run's latest
checkpoint and only answers queries -- nothing is trained and no run file is rewritten. It
serves until Ctrl-C (or SIGTERM). An expert that fails for good is left down (the broker
masks it, replies say who took part); the broker or reducer failing for good ends it (1).

``traci request --input CSV`` sends a CSV's rows to a front door and prints the answers.
See docs/serving.md.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

import numpy as np
import yaml

from traci_ml.app.attention import served_columns  # no torch: the client's columns
from traci_ml.app.ready import ServeReady
from traci_ml.app.supervisor import Child, Console, Policy, children, supervise
from traci_ml.core.config import Config, parse_set
from traci_ml.core.errors import CheckpointError, ConfigError, DataError
from traci_ml.core.rundir import RunDir


def serve_config(run: str | Path, overrides: list[str], *, insecure: bool = False) -> Config:
    """The run's own config (``RunDir.config``: the reducer's config.json, else launch.yaml) with
    ``run_dir`` set to ``run``, the ``TRACI_*`` environment and the ``--set`` overrides applied."""
    sets = parse_set(overrides)
    if insecure:
        sets["security.insecure"] = "true"
    return RunDir(run).config(sets, environment=True)


def serve(config: Config, *, out: TextIO = sys.stdout) -> int:
    """Run broker, reducer and experts in serve mode until interrupted (and ``traci http``
    with ``serve.http_port`` or ``serve.grpc_port``); the exit code."""
    from traci_ml.core.data import expert_count
    from traci_ml.core.security import tcp_endpoint

    if config.serve.http_port or config.serve.grpc_port:  # traci http's rules, checked
        from traci_ml.app.http_auth import access_for  # here before any process starts

        access_for(config)  # TLS and token files readable; off loopback both, or --insecure
    run = RunDir(config.run_path)
    n = expert_count(config)
    missing = run.missing_checkpoints(n)
    if missing:
        raise CheckpointError(f"{run.checkpoints} lacks {', '.join(missing)}: train the run first")
    if not config.network.serve_port:
        raise ConfigError("traci serve needs network.serve_port (it is 0)")
    from traci_ml.core.fits import check_run

    check_run(config, serve=True)  # every checkpoint fits, before any process starts
    run.serve.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    run.logs.mkdir(parents=True, exist_ok=True)
    where = tcp_endpoint(config.network.broker_host, config.network.serve_port)
    console = _ServeConsole(out)
    procs = children(config, run.serve, serve=True, fork=True)
    code = supervise(procs, Policy(
        config.launcher, run.serve_pids, console,
        started=f"serving {run.path} on {where} ({n} experts; logs in {run.path}/"
        f"{RunDir.LOGS}); Ctrl-C to stop",
        on_tick=ServeReady(config, console, where).update,  # "ready: ..." once it answers
        # an expert that fails for good is left down: the broker masks it, replies say who
        # took part; the broker or reducer failing for good ends serving (1)
        serving=True,
    ))  # fmt: skip
    return 0 if code is None else code  # None: interrupted, the normal end of serving


class _ServeConsole(Console):
    """``traci serve``'s wording: exit codes as numbers, no restart count on giving up."""

    def restarted(self, name: str, code: int, n: int, limit: int, delay: float) -> None:
        self.line(f"{name} exited with code {code}: restart {n}/{limit} in {delay:.1f}s")

    def gave_up(self, child: Child, code: int) -> None:
        self.line(f"{child.name} exited with code {code}; last log lines:\n{child.tail()}")


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
    x, columns = read_rows(args.input, args.columns.split(",") if args.columns else None)
    client = _client(args, config)
    with client:
        pred = client.predict(x, columns, attention=args.attention)
    head = ["row", "prediction"]
    if pred.task == "classification":
        head += [f"prob_{c}" for c in pred.classes]
        body = [
            [lab, *(f"{v:.9g}" for v in row)]
            for lab, row in zip(pred.labels, pred.outputs, strict=True)
        ]
    else:
        body = [[f"{v:.9g}"] for v in pred.values]
    att_head, att = served_columns(pred)  # --attention: attn_cls, attn_<expert>...
    lines = ([r, *cells, *a] for r, (cells, a) in enumerate(zip(body, att, strict=True)))
    _write_csv(args.output, head + att_head, lines)
    who = ", ".join(f"{i} ({n})" for i, n in zip(pred.experts, pred.expert_names, strict=True))
    print(f"{len(x)} rows served by experts {who} in a batch of {pred.batch_rows} rows "
          f"({pred.latency * 1000:.1f} ms)", file=sys.stderr)  # fmt: skip
    return 0


def request_ids(args: argparse.Namespace, config: Config) -> int:
    """``traci request --ids``: rows by id; each expert looks its own rows up. The answer
    as CSV: row, id, prediction, probabilities, and the experts that took part per row."""
    from traci_ml.core.ids import read_ids

    ids = read_ids(args.ids, config.data.id).tolist()
    client = _client(args, config)
    with client:
        pred = client.predict_ids(ids, attention=args.attention)
    rows = pred.row_experts or (tuple(pred.experts),) * len(ids)
    head = ["row", "id", "prediction"]
    if pred.task == "classification":
        head += [f"prob_{c}" for c in pred.classes]
        body = [[lab, *(f"{v:.9g}" for v in row)]
                for lab, row in zip(pred.labels, pred.outputs, strict=True)]  # fmt: skip
    else:
        body = [[f"{v:.9g}"] for v in pred.values]
    att_head, att = served_columns(pred)  # --attention: attn_cls, attn_<expert>...
    _write_csv(args.output, [*head, "experts", *att_head], (
        [r, i, *cells, " ".join(str(e) for e in took), *a]
        for r, (i, cells, took, a) in enumerate(zip(ids, body, rows, att, strict=True))
    ))  # fmt: skip
    lacking = sum(len(t) < len(pred.experts) for t in rows)
    print(f"{len(ids)} ids served by experts {list(pred.experts)}; {lacking} rows with an expert "
          f"masked ({pred.latency * 1000:.1f} ms)", file=sys.stderr)  # fmt: skip
    return 0


def _client(args: argparse.Namespace, config: Config):  # -> Client
    """The front door's client: ``--endpoint`` (with the config's CURVE keys), else the
    config's own serve endpoint."""
    from traci_ml.app.client import Client

    if args.endpoint:
        from traci_ml.core.security import peer_keys

        return Client(args.endpoint, timeout=args.timeout, curve=peer_keys(config, "client"))
    return Client.from_config(config, timeout=args.timeout)


def _write_csv(path: str | None, head: list[str], rows: Iterable[list]) -> None:
    """``head`` and ``rows`` as CSV to ``path``, or stdout when there is none."""
    out = open(path, "w", newline="") if path else sys.stdout  # noqa: SIM115
    try:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(head)
        writer.writerows(rows)
    finally:
        if out is not sys.stdout:
            out.close()
