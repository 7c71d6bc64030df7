"""``traci``: the command line. Parses flags, builds the config once, runs one thing.

    traci up CONFIG [--fresh | --resume]       a local cluster: broker, reducer, experts
    traci broker  [--config CONFIG]            one service, as a container runs it
    traci reducer [--config CONFIG] [--resume]
    traci expert  [--config CONFIG] --id I [--resume]

Every command takes ``--set KEY=VALUE`` (repeatable) and reads ``TRACI_<SECTION>__<KEY>``
environment variables; see docs/config.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from traci_ml.errors import TraciError

SERVICES = ("broker", "reducer", "expert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="traci", description=__doc__.split("\n")[0])
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

    for name in SERVICES:
        p = sub.add_parser(name, help=f"run the {name} service alone")
        p.add_argument("--config", help="YAML run config (default: built-in digits)")
        if name == "expert":
            p.add_argument(
                "--id",
                dest="expert_id",
                type=int,
                required=True,
                help="expert id, 0 <= id < number of views",
            )
        if name != "broker":
            p.add_argument("--resume", action="store_true", help="resume from the checkpoint")
            p.add_argument("--device", help="torch device: auto, cpu, cuda, cuda:N")
        common(p)
    return parser


def config_from_args(args: argparse.Namespace):  # noqa: ANN201
    from traci_ml.config import load_config, parse_set

    overrides = parse_set(args.overrides)
    if args.run_dir:
        overrides["run_dir"] = args.run_dir
    if args.broker_host:
        overrides["network.broker_host"] = args.broker_host
    if getattr(args, "device", None):
        overrides[f"{args.command}.device"] = args.device
    path = args.config
    return load_config(path, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from traci_ml.observe import setup_logging

    name = args.command if args.command != "expert" else f"expert-{args.expert_id}"
    setup_logging(name, args.log_level)
    try:
        config = config_from_args(args)
        if args.command == "up":
            from traci_ml.launcher import up

            return up(config, argv=list(sys.argv[1:] if argv is None else argv), args=args)
        if args.command == "broker":
            from traci_ml.services.broker.main import run as run_broker

            return run_broker(config)
        if args.command == "reducer":
            from traci_ml.services.reducer.main import run as run_reducer

            return run_reducer(config, resume=args.resume)
        from traci_ml.services.expert.main import run as run_expert

        return run_expert(config, expert_id=args.expert_id, resume=args.resume)
    except TraciError as exc:
        print(f"traci {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
