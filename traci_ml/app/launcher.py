"""``traci up``: a local cluster of separate OS processes on this machine.

Starts the broker, the reducer and every expert as child processes (exactly the commands a
container runs), shows live progress, and stops them all cleanly on Ctrl-C, when training ends,
or when one of them fails (exiting non-zero with the failed service's log tail). The processes
and their supervision are ``traci_ml.app.supervisor``'s; here: the fresh/resume checks (a
resume's checkpoints must fit the config, ``traci_ml.core.fits``, before anything starts),
launch.yaml, the training policy (done when the reducer exits 0), progress, plots, summary.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from traci_ml.app.follow import Progress, parse_broker_scrape
from traci_ml.app.supervisor import Child, Policy, children, supervise
from traci_ml.app.view import DONE, PLOTTING, STARTING, PlainView, make_view
from traci_ml.core.config import Config
from traci_ml.core.errors import ConfigError
from traci_ml.core.rundir import RunDir

__all__ = ["Progress", "parse_broker_scrape", "up"]
log = logging.getLogger(__name__)


def up(config: Config, *, argv: list[str], args: Any) -> int:
    run = RunDir(config.run_path)
    if args.fresh and run.path.exists():
        shutil.rmtree(run.path)
    if not args.resume and run.checkpoints.exists():
        raise ConfigError(
            f"run directory {run.path} already holds checkpoints: pass --fresh to start over "
            "or --resume to continue"
        )
    if args.resume:  # before any process starts or any file is written: one line, exit 2
        from traci_ml.core.fits import check_run

        check_run(config)
    run.logs.mkdir(parents=True, exist_ok=True)
    run.launch.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    view = make_view(sys.stdout)
    try:
        return _supervised(config, run, args, view)
    finally:
        view.close()


def _supervised(config: Config, run: RunDir, args: Any, view: PlainView) -> int:
    progress = Progress(config, sys.stdout, view=view)
    progress.phase(STARTING)
    services = children(config, run.launch, resume=args.resume, gpus=args.gpus, fork=True)
    reducer = next(c for c in services if c.name == "reducer")

    def finished(_: list[Child]) -> bool:
        """Training ends when the reducer exits 0, with a last queue-latency sample."""
        if reducer.code != 0:
            return False
        progress._broker_live()  # a last queue-latency sample, with the run's final steps
        return True

    names = ", ".join(c.name for c in services)
    code = supervise(services, Policy(
        config.launcher, run.pids, progress,
        started=f"started {names}; logs in {run.path}/{RunDir.LOGS}",
        done=finished, on_tick=progress.update,
    ))  # fmt: skip
    if code is None:  # interrupted
        return 130
    if code:
        return code
    code = progress.final(run.path)
    if code == 0:
        progress.phase(PLOTTING)
        # traci up reads no party's file (each expert reads its own): the heat map of
        # attention by class comes from the reducer's eval_predictions.csv, never the data
        _plot(run.path, progress, read_data=config.data.source != "parties")
        progress.phase(DONE)
    return code


def _plot(run_path: Path, progress: Progress, *, read_data: bool) -> None:
    """The run's PNGs (``traci_ml.app.plot``): a failure to plot is a warning, not a failed run."""
    try:
        from traci_ml.app.plot import describe, plot_run

        progress.line(describe(plot_run(run_path, read_data=read_data)))
    except (Exception, KeyboardInterrupt) as exc:  # any failure at all: the run succeeded
        log.warning("plots of %s not written: %s", run_path, exc or type(exc).__name__)
