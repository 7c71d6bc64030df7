"""``traci``: the command line. Parses flags, builds the config once, runs one thing.

    traci up CONFIG [--fresh | --resume]       a local cluster: broker, reducer, experts
    traci broker  [--config CONFIG]            one service, as a container runs it
    traci reducer [--config CONFIG] [--resume]
    traci expert  [--config CONFIG] (--id I | --id-from-hostname) [--metrics-port P] [--resume]
    traci keys generate DIR [--experts N | --config CONFIG] [--force]
                                               CurveZMQ keys (docs/security.md)
    traci collect --config CONFIG [--out DIR] [--namespace NS]
                                               a Kubernetes run's parts in one run directory
    traci health SERVICE [--id I] [--config CONFIG]
                                               exit 0 if that service's metrics answer
                                               (container health checks)
    traci predict --run RUN_DIR (--input CSV | --split test|train | --ids FILE|ID,ID,..)
        [--output CSV] [--attention] [--checkpoint best|last]
                                               a trained run in one process (docs/predict.md)
    traci export --run RUN_DIR --format torchscript|onnx [--output FILE]
        [--checkpoint best|last]               the whole model in one file (docs/predict.md)
    traci plot RUN_DIR                         loss, throughput, attention (per class),
                                               queue latency PNGs in RUN_DIR/plots
    traci serve --run RUN_DIR [--grpc-port P]  serve a trained run until Ctrl-C (docs/serving.md)
    traci request --input CSV [--config CONFIG | --endpoint URL] [--output CSV]
                                               ask a running cluster's front door

Every command takes ``--set KEY=VALUE`` (repeatable) and reads ``TRACI_<SECTION>__<KEY>``
environment variables; see docs/config.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from traci_ml.core.errors import ConfigError, DataError, TraciError, exit_code

SERVICES = ("broker", "reducer", "expert")

# What `traci --help` says (the module docstring above is for whoever reads this file).
DESCRIPTION = (
    "TRACI: one prediction model trained across cooperating processes -- a broker, a reducer "
    "and one expert per view of the data. `traci up CONFIG` trains on this machine; `traci "
    "predict`, `traci export` and `traci serve` use the trained run. README.md and docs/ "
    "describe every command."
)
EPILOG = (
    "Every command that reads a run config takes --set KEY=VALUE (repeatable) and "
    "TRACI_<SECTION>__<KEY> environment variables (docs/config.md). `traci COMMAND --help` "
    "shows a command's flags."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="traci", description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config key, e.g. train.steps=100",
        )
        p.add_argument("--run-dir", help="run directory (config key run_dir)")
        p.add_argument("--broker-host", help="where peers reach the broker (network.broker_host)")
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    up = sub.add_parser("up", help="run broker, reducer and every expert on this machine")
    up.add_argument("config", nargs="?", help="YAML run config (default: built-in digits)")
    mode = up.add_mutually_exclusive_group()
    mode.add_argument("--fresh", action="store_true", help="clear the run directory first")
    mode.add_argument("--resume", action="store_true", help="resume every service")
    up.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="spread experts over this many GPUs (CUDA_VISIBLE_DEVICES = id %% N)",
    )
    common(up)
    insecure(up)

    for name in SERVICES:
        p = sub.add_parser(name, help=f"run the {name} service alone")
        p.add_argument("--config", help="YAML run config (default: built-in digits)")
        if name == "expert":
            who = p.add_mutually_exclusive_group(required=True)
            who.add_argument(
                "--id", dest="expert_id", type=int, help="expert id, 0 <= id < number of views"
            )
            who.add_argument(
                "--id-from-hostname",
                action="store_true",
                help="take the id from the host name's ordinal suffix: a Kubernetes StatefulSet "
                "pod expert-3 is expert 3",
            )
            p.add_argument(
                "--metrics-port",
                type=int,
                help="serve metrics on this port instead of metrics.expert_base_port + id "
                "(one port for every pod of a StatefulSet; 0 disables)",
            )
        p.add_argument(
            "--serve",
            action="store_true",
            help="serve: load the latest checkpoint, answer queries, train nothing (traci serve)",
        )
        if name != "broker":
            p.add_argument("--resume", action="store_true", help="resume from the checkpoint")
            p.add_argument("--device", help="torch device: auto, cpu, cuda, cuda:N")
        else:
            insecure(p)
        common(p)

    keys = sub.add_parser("keys", help="CurveZMQ keys for the broker and its peers")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    gen = keys_sub.add_parser(
        "generate", help="write a broker key pair, one per peer, and authorized/"
    )
    gen.add_argument("dir", help="directory for the keys (security.curve_dir)")
    count = gen.add_mutually_exclusive_group()
    count.add_argument("--experts", type=int, help="number of experts (default: 4)")
    count.add_argument("--config", help="take the number of experts from this run config")
    gen.add_argument("--force", action="store_true", help="replace keys already in DIR")

    deploy = sub.add_parser("deploy", help="write the deployment files of a run config")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    dc = deploy_sub.add_parser(
        "compose", help="the Docker Compose stack: one expert service per view, its files"
    )
    dc.add_argument("config", help="YAML run config (data paths from the working directory)")
    dc.add_argument("--out", default="deploy/run", help="output folder (default: deploy/run)")
    dk = deploy_sub.add_parser(
        "k8s", help="the kustomize tree: experts = views, a data volume per pod that reads a file"
    )
    dk.add_argument("config", help="YAML run config (data paths from the working directory)")
    dk.add_argument(
        "--out", default="deploy/run-k8s", help="output folder (default: deploy/run-k8s)"
    )

    col = sub.add_parser(
        "collect", help="copy a Kubernetes run's parts (every checkpoint) into one run directory"
    )
    col.add_argument("--out", default="runs", help="where the run directory goes (default: runs)")
    col.add_argument("--namespace", default="traci", help="the run's namespace (default: traci)")
    col.add_argument("--config", required=True, help="the run config (its run_id and views)")
    col.add_argument("--kubectl", default="kubectl", help="the kubectl to run (default: kubectl)")
    common(col)

    health = sub.add_parser(
        "health", help="exit 0 if SERVICE's metrics endpoint answers as that service"
    )
    health.add_argument("service", choices=SERVICES)
    health.add_argument("--id", dest="expert_id", type=int, default=0, help="expert id")
    health.add_argument("--config", help="YAML run config the service runs with")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for it")
    health.add_argument(
        "--ready",
        action="store_true",
        help="broker: exit 0 only while its front door can answer (a reducer and a live "
        "expert registered, the run started)",
    )
    common(health)

    predict = sub.add_parser("predict", help="predict with a trained run, in this process")
    predict.add_argument("--run", required=True, metavar="RUN_DIR", help="the run directory")
    rows = predict.add_mutually_exclusive_group(required=True)
    rows.add_argument(
        "--input", metavar="CSV", help="raw feature rows to predict: a CSV with a header"
    )
    rows.add_argument(
        "--split", choices=["test", "train"], help="predict the run's own held-out (or train) rows"
    )
    rows.add_argument(
        "--ids",
        metavar="PATH|IDS",
        help="predict rows by id: a CSV or Parquet file with the data.id column, or ids inline "
        "(12,57,903); one-table runs: the row's number in the table",
    )
    predict.add_argument("--output", metavar="CSV", help="write here (default: stdout)")
    predict.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N")
    predict.add_argument(
        "--attention",
        action="store_true",
        help="also each row's attention per expert: columns attn_cls, attn_<expert>",
    )
    export = sub.add_parser("export", help="write a trained run's whole model to one file")
    export.add_argument("--run", required=True, metavar="RUN_DIR", help="the run directory")
    export.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    export.add_argument(  # the names of export.FORMATS (not imported here: it loads torch)
        "--output",
        metavar="FILE",
        help="default: RUN_DIR/model.torchscript.pt (torchscript) or RUN_DIR/model.onnx (onnx)",
    )
    for p in (predict, export):  # model selection (docs/predict.md)
        p.add_argument("--checkpoint", choices=["best", "last"], default=None,
                       help="the best validation round's weights (default, where the run has "
                       "them) or the last")  # fmt: skip
    plot = sub.add_parser("plot", help="draw a run's PNGs (loss, throughput, attention, ...)")
    plot.add_argument("run", metavar="RUN_DIR", help="the run directory")
    for p in (predict, export, plot):
        p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING"])
    serve_parsers(sub, common)
    return parser


def serve_parsers(sub: argparse._SubParsersAction, common: Callable) -> None:
    """``traci serve`` and ``traci request`` (traci_ml/app/serving.py, docs/serving.md)."""
    serve = sub.add_parser("serve", help="serve a trained run's predictions until Ctrl-C")
    serve.add_argument("--run", required=True, metavar="RUN_DIR", help="the run directory")
    serve.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a key of the run's config")  # fmt: skip
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    grpc_port(serve)
    insecure(serve)
    req = sub.add_parser("request", help="send CSV rows to a cluster's front door")
    req.add_argument("--config", help="run config naming the broker (network.serve_port)")
    req.add_argument("--endpoint", help="front door address, e.g. tcp://127.0.0.1:5557")
    what = req.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", metavar="CSV", help="rows, with a header")
    what.add_argument("--ids", metavar="IDS|CSV",
                      help="rows by id: 12,57,903 or a CSV with the data.id column")  # fmt: skip
    req.add_argument("--columns", help="comma-separated feature columns (default: numeric)")
    req.add_argument("--output", metavar="CSV", help="write here (default: stdout)")
    req.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")
    req.add_argument(
        "--attention",
        action="store_true",
        help="also each row's attention per expert that took part: attn_cls, attn_<expert>",
    )
    common(req)
    http = sub.add_parser("http", help="the Open Inference Protocol (KServe v2 REST, and gRPC "
                          "with --grpc-port) in front of a front door (serve.http_port; traci "
                          "serve starts it)")  # fmt: skip
    http.add_argument("--config", help="run config naming the front door and the run")
    http.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # always serves
    http.add_argument(
        "--insecure",
        action="store_true",
        help="let it listen off loopback without TLS and tokens or client certificates "
        "(serve.http_tls_cert, serve.http_tls_key, serve.http_token_file, "
        "serve.http_tls_client_ca; sets security.insecure)",
    )
    grpc_port(http)
    common(http)


def grpc_port(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        metavar="PORT",
        help="also the Open Inference Protocol over gRPC (KServe v2 GRPCInferenceService) on "
        "serve.http_bind:PORT, beside the REST endpoint; sets serve.grpc_port (0: off, the "
        "default)",
    )


def insecure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--insecure",
        action="store_true",
        help="let the broker bind a non-loopback address without CURVE (security.insecure)",
    )


def generate_keys(args: argparse.Namespace) -> int:
    """``traci keys generate``: the user-facing output of security.generate."""
    from pathlib import Path

    from traci_ml.core.security import AUTHORIZED, generate

    n_experts = args.experts if args.experts is not None else 4
    if args.config:
        from traci_ml.core.config import load_config
        from traci_ml.core.data import expert_count

        n_experts = expert_count(load_config(args.config))
    generate(args.dir, n_experts, force=args.force)
    where = Path(args.dir).resolve()
    experts = "expert-0" if n_experts == 1 else f"expert-0 .. expert-{n_experts - 1}"
    print(f"wrote CurveZMQ key pairs to {where}: broker, reducer, {experts}")
    print(f"  the broker needs broker.key_secret and {AUTHORIZED}/ (the peer keys it admits)")
    print("  each peer needs its own <name>.key_secret and broker.key")
    print("add to the run config:")
    print(f"  security:\n    curve_dir: {where}")
    print(f"or pass --set security.curve_dir={where}")
    return 0


def expert_id_from_hostname(hostname: str) -> int:
    """``expert-3`` (or ``expert-3.expert.traci.svc``) -> 3: a StatefulSet pod's ordinal."""
    _, sep, ordinal = hostname.split(".")[0].rpartition("-")
    if not sep or not ordinal.isdigit():
        raise ConfigError(
            f"--id-from-hostname: host name {hostname!r} does not end in -<ordinal> "
            "(as a StatefulSet pod's does); pass --id instead"
        )
    return int(ordinal)


# A metric each service registers up front: its presence says the endpoint is that service.
HEALTH_METRIC = {
    "broker": "traci_broker_live_experts",
    "reducer": "traci_reducer_experts_present",
    "expert": "traci_expert_seq",
}


def check_health(config, args: argparse.Namespace) -> int:  # noqa: ANN001
    """``traci health``: ask the service's own metrics endpoint (from the same config and
    ``TRACI_*`` environment the service reads) whether it is that service, and up."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from traci_ml.core.observe import metrics_url

    m = config.metrics
    ports = {"broker": m.broker_port, "reducer": m.reducer_port}
    port = ports.get(args.service, m.expert_base_port + args.expert_id if m.expert_base_port else 0)
    if not port:
        print(f"traci health: metrics of {args.service} are disabled (port 0)", file=sys.stderr)
        return 1
    url = metrics_url(m.bind, port)
    # only the metrics read here: a health check is not a scrape, so it must not pass for the
    # final one a finished service waits for (RunEnd)
    names = [HEALTH_METRIC[args.service], *(["traci_broker_serve_ready"] if args.ready else [])]
    asked = metrics_url(m.bind, port, names)
    try:
        with urllib.request.urlopen(asked, timeout=args.timeout) as resp:
            text = resp.read().decode()
        samples = [
            s
            for family in text_string_to_metric_families(text)
            if family.name == HEALTH_METRIC[args.service]
            for s in family.samples
        ]
    except (OSError, ValueError) as exc:
        print(f"traci health: {args.service} at {url}: {exc}", file=sys.stderr)
        return 1
    if args.service == "expert":  # the right expert, not just any
        samples = [s for s in samples if s.labels.get("expert") == str(args.expert_id)]
    if not samples:
        want = HEALTH_METRIC[args.service]
        print(f"traci health: {url} serves no {want}: not {args.service}", file=sys.stderr)
        return 1
    if args.ready:
        if args.service != "broker":
            print("traci health: --ready is the broker's (its front door)", file=sys.stderr)
            return 2
        ready = [s.value for f in text_string_to_metric_families(text)
                 if f.name == "traci_broker_serve_ready" for s in f.samples]  # fmt: skip
        if ready != [1.0]:
            why = "no reducer, no live expert, or the run not started"
            print(f"traci health: broker at {url} up, but its front door cannot answer yet "
                  f"({why})", file=sys.stderr)  # fmt: skip
            return 1
        print(f"traci health: broker ready to answer at {url}")
        return 0
    print(f"traci health: {args.service} up at {url}")
    return 0


def config_from_args(args: argparse.Namespace):  # noqa: ANN201
    from traci_ml.core.config import load_config, parse_set

    overrides = parse_set(args.overrides)
    port = getattr(args, "metrics_port", None)
    if port:
        # Expert i serves on metrics.expert_base_port + i: pick the base that lands on `port`.
        if not args.expert_id < port <= 65535:
            raise ConfigError(f"--metrics-port {port}: must exceed the expert id and be <= 65535")
        overrides["metrics.expert_base_port"] = str(port - args.expert_id)
    elif port == 0:
        overrides["metrics.expert_base_port"] = "0"
    if args.run_dir:
        overrides["run_dir"] = args.run_dir
    if args.broker_host:
        overrides["network.broker_host"] = args.broker_host
    if getattr(args, "device", None):
        overrides[f"{args.command}.device"] = args.device
    if getattr(args, "insecure", False):
        overrides["security.insecure"] = "true"
    if getattr(args, "grpc_port", None) is not None:
        overrides["serve.grpc_port"] = str(args.grpc_port)
    path = args.config
    return load_config(path, overrides=overrides)


def check_cluster_security(config) -> None:  # noqa: ANN001
    """Before ``traci up`` starts anything: the broker may bind, every key is readable."""
    from traci_ml.core import security
    from traci_ml.core.data import expert_count

    net = config.network
    curve = security.broker_keys(config) is not None
    if not warn_insecure(config, "up", curve=curve):
        # check_bind refuses a non-loopback bind without CURVE. The --insecure case, where it
        # would only log (hidden by --log-level ERROR), warn_insecure printed instead.
        endpoint = security.tcp_endpoint(net.bind_host, net.expert_port)  # one bind_host for all
        security.check_bind(endpoint, curve=curve, insecure=config.security.insecure)
    for name in security.peer_names(expert_count(config)):
        security.peer_keys(config, name)


def warn_insecure(config, command: str, *, curve: bool | None = None) -> bool:  # noqa: ANN001
    """``traci up``/``traci serve`` start a broker whose log is a file: when it will bind a
    non-loopback ``network.bind_host`` without CURVE (``security.insecure``), say so here, on
    stderr, whatever ``--log-level``. True when it warned."""
    from traci_ml.core.security import is_loopback

    net = config.network
    if curve is None:
        curve = config.security.curve_dir is not None
    if curve or not config.security.insecure or is_loopback(net.bind_host):
        return False
    ports = [p for p in (net.expert_port, net.reducer_port, net.serve_port) if p]
    print(
        f"traci {command}: warning: --insecure: the broker binds {net.bind_host} (ports "
        f"{', '.join(map(str, ports))}) without CURVE keys: anyone who can reach it can "
        "inject embeddings, read gradients and query the model (docs/security.md)",
        file=sys.stderr,
        flush=True,
    )
    return True


def request_command(args: argparse.Namespace, config) -> int:  # noqa: ANN001
    """``traci request`` (``serving.request``), saying which cell of the input is not a
    number where the cluster would only see a missing column: the CSV reader leaves out a
    column that is not all numbers (a label of names), so a feature column with one bad
    cell reaches the front door as absent."""
    from traci_ml.app.client import ServeError
    from traci_ml.app.serving import request, request_ids

    if args.ids is not None:
        return request_ids(args, config)
    bad = non_numeric_cells(args.input)
    if args.columns:  # named columns must be numbers: say which cell is not
        named = [c.strip() for c in args.columns.split(",")]
        culprits = [c for c in named if c in bad]
        if culprits:
            raise DataError(f"{args.input}: " + "; ".join(_cell(c, bad[c]) for c in culprits))
    try:
        return request(args, config)
    except ServeError as exc:
        if exc.status != "missing_columns":
            raise
        lacking, truncated = lacking_columns(exc.detail)
        culprits = [c for c in bad if c in lacking]
        if truncated:  # the cluster named only some: any column holding some numbers
            culprits += [c for c in bad if c not in culprits and bad[c][2]]
        if not culprits:
            raise
        raise DataError(
            f"{args.input}: "
            + "; ".join(_cell(c, bad[c]) for c in culprits)
            + ": a feature column must hold only numbers, so it was left out and the cluster"
            + f" answered missing_columns ({exc.detail})"
        ) from None


def _cell(column: str, found: tuple[int, str, bool]) -> str:
    line, value, _ = found
    return f"column {column!r} holds a non-numeric value {value!r} at line {line}"


def non_numeric_cells(path: str) -> dict[str, tuple[int, str, bool]]:
    """Columns of a CSV (header on line 1) holding a cell that is not a number: column ->
    (file line of the first such cell, its value, whether the column holds any number).
    Empty when the file cannot be read as a CSV (``serving.read_rows`` says why). Read with
    the one table reader (``core.data.read_csv_table``)."""
    from traci_ml.core.data import read_csv_table

    try:
        table = read_csv_table(path)
    except (DataError, OSError):
        return {}
    found: dict[str, tuple[int, str, bool]] = {}
    for k, name in enumerate(table.header):
        first, numeric = None, False
        for line, record in zip(table.lines, table.records, strict=True):
            try:
                float(record[k])
                numeric = True
            except ValueError:
                first = first or (line, record[k])
        if first is not None and name not in found:
            found[name] = (*first, numeric)
    return found


def lacking_columns(detail: str) -> tuple[set[str], bool]:
    """The column names of a ``missing_columns`` detail (``... lacks: a, b (+3 more)`` from
    the broker, ``expert-1 lacks column(s) a, b`` from an expert) and whether it cut the list."""
    import re

    tail = re.split(r": |lacks column\(s\) ", detail)[-1]
    more = re.search(r" \(\+\d+ more\)$", tail)
    if more:
        tail = tail[: more.start()]
    return {c.strip() for c in tail.split(", ") if c.strip()}, more is not None


def deploy(args: argparse.Namespace) -> int:
    """``traci deploy compose|k8s CONFIG``: write the run's deployment files, say what next."""
    out, config = Path(args.out), Path(args.config)
    try:
        if args.deploy_command == "compose":
            from traci_ml.app.compose import generate

            written = generate(config, out)
            then = [f"docker compose -f {out / 'docker-compose.yml'} up -d --build"]
        else:
            from traci_ml.app.k8s import generate_k8s

            written, copies = generate_k8s(config, out)
            then = [f"kubectl apply -k {out / 'overlays' / 'cpu'}   # or overlays/gpu", *copies]
    except TraciError as exc:
        print(f"traci deploy: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    print("then:\n" + "\n".join(f"  {line}" for line in then))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # User expert modules ("package.module:Class") resolve from the current directory, as
    # they do for `python -m traci_ml.app.cli` and the services `traci up` starts.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if args.command == "keys":
        try:
            return generate_keys(args)
        except TraciError as exc:
            print(f"traci keys: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "deploy":
        return deploy(args)
    if args.command == "collect":
        from traci_ml.app.collect import collect

        try:
            dest = collect(
                config_from_args(args), Path(args.out), namespace=args.namespace,
                kubectl=args.kubectl,
            )  # fmt: skip
        except TraciError as exc:
            print(f"traci collect: error: {exc}", file=sys.stderr)
            return 2
        print(f"collected {dest}: traci predict --run {dest} / traci export --run {dest}")
        return 0
    from traci_ml.core.observe import setup_logging

    if args.command == "serve":
        from traci_ml.app import serving

        setup_logging("serve", args.log_level)
        try:
            sets = args.overrides
            if args.grpc_port is not None:
                sets = [*sets, f"serve.grpc_port={args.grpc_port}"]
            config = serving.serve_config(args.run, sets, insecure=args.insecure)
            warn_insecure(config, "serve")
            return serving.serve(config)
        except TraciError as exc:
            print(f"traci serve: error: {exc}", file=sys.stderr)
            return 2
    if args.command == "plot":
        from traci_ml.app import plot
        from traci_ml.app.steps import Steps

        setup_logging("plot", args.log_level)
        # a line, never a spinner: plot.main prints its own line on stdout meanwhile
        step = f"drawing {Path(args.run) / 'plots'} (the attention heat map runs the model)"
        with Steps("traci plot", live=False).step(step):
            return plot.main(args.run)
    if args.command in ("predict", "export"):
        setup_logging(args.command, args.log_level)
        try:
            from traci_ml.app import offline

            return offline.run(args)
        except TraciError as exc:
            print(f"traci {args.command}: error: {exc}", file=sys.stderr)
            return 2
    if getattr(args, "id_from_hostname", False):
        import socket

        try:
            args.expert_id = expert_id_from_hostname(socket.gethostname())
        except TraciError as exc:
            print(f"traci expert: error: {exc}", file=sys.stderr)
            return 2
    name = args.command if args.command != "expert" else f"expert-{args.expert_id}"
    setup_logging(name, args.log_level)
    try:
        config = config_from_args(args)
        if args.command == "health":
            return check_health(config, args)
        if args.command == "request":
            return request_command(args, config)
        if args.command == "http":
            from traci_ml.app.http_v2 import run as run_http
            from traci_ml.core.signals import die_with_parent

            die_with_parent()  # started by traci serve: do not outlive it
            return run_http(config)
        if args.command == "up":
            from traci_ml.app.launcher import up

            check_cluster_security(config)  # fail here, not in every child

            return up(config, argv=list(sys.argv[1:] if argv is None else argv), args=args)
        if args.command in SERVICES:
            from traci_ml.core.signals import die_with_parent

            die_with_parent()  # started by traci up / traci serve: do not outlive it
        if args.command == "broker":
            from traci_ml.services.broker.main import run as run_broker

            return run_broker(config, serve=args.serve)
        if args.command == "reducer":
            from traci_ml.services.reducer.main import run as run_reducer

            return run_reducer(config, resume=args.resume, serve=args.serve)
        from traci_ml.services.expert.main import run as run_expert

        return run_expert(config, expert_id=args.expert_id, resume=args.resume, serve=args.serve)
    except TraciError as exc:  # one line; 2 and 3 are never restarted (core/errors.py)
        print(f"traci {args.command}: error: {exc}", file=sys.stderr)
        return exit_code(exc, service=args.command in SERVICES)


if __name__ == "__main__":
    sys.exit(main())
