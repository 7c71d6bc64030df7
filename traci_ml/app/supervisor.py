"""One supervisor for ``traci up`` and ``traci serve``: child processes on this machine.

``children`` builds the broker, the reducer and one process per expert (exactly the commands a
container runs), ``supervise`` starts them, watches them and stops them all: on Ctrl-C or
SIGTERM, when the run is done, or when one fails for good. What ``traci up`` and ``traci serve``
do differently (when the run is done, what is printed, whether a failed expert ends it, which
exit codes are never restarted, the pid file) is a ``Policy``; the loop (``watch``) is one.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from traci_ml.core.config import Config, LauncherConfig
from traci_ml.core.errors import CONFIG_ERROR, DATA_ERROR
from traci_ml.core.files import write_json_atomic
from traci_ml.core.rundir import RunDir
from traci_ml.core.signals import PARENT_ENV

if TYPE_CHECKING:
    from traci_ml.app.zygote import Forked, Zygote

log = logging.getLogger(__name__)
POLL = 0.2
GRACE = 15.0  # seconds the others get to finish once the run is done
STABLE = 30.0  # a service up this long has its restart back-off reset
HOPELESS = (CONFIG_ERROR, DATA_ERROR)  # exit codes no restart mends (core/errors.py)


@dataclass
class Child:
    """One supervised service process. Restarts run ``restart_argv`` (with ``--resume``)."""

    name: str
    argv: list[str]
    restart_argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    zygote: Zygote | None = None  # forks it ready-imported (app/zygote.py); else a new process
    proc: subprocess.Popen | Forked | None = None
    log_file: TextIO | None = None
    restarts: int = 0
    streak: int = 0  # restarts since the service last ran for STABLE seconds (back-off)
    started_at: float = 0.0
    restart_at: float | None = None  # monotonic time of a scheduled restart

    def start(self) -> None:
        argv = self.restart_argv if self.restarts else self.argv
        self.proc = None
        if self.zygote is not None:
            self.proc = self.zygote.spawn(self.name, argv, self.env, self.log_path)
        if self.proc is None:
            if self.log_file is None:
                self.log_file = self.log_path.open("ab")  # type: ignore[assignment]
            self.proc = subprocess.Popen(
                argv, stdout=self.log_file, stderr=subprocess.STDOUT, env=self.env,
                stdin=subprocess.DEVNULL, start_new_session=True,  # Ctrl-C reaches us alone
            )  # fmt: skip
        self.restart_at = None
        self.started_at = time.monotonic()

    @property
    def code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Console:
    """Where the supervisor says what happens to its services, one line at a time."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def restarted(self, name: str, code: int, n: int, limit: int, delay: float) -> None:
        how = f"signal {-code}" if code < 0 else f"code {code}"
        self.line(f"{name} exited with {how}: restart {n}/{limit} in {delay:.1f}s")

    def gave_up(self, child: Child, code: int) -> None:
        self.line(
            f"{child.name} exited with code {code}"
            + (f" after {child.restarts} restarts" if child.restarts else "")
            + f"; last log lines:\n{child.tail()}"
        )


def _never(children: list[Child]) -> bool:
    return False


def _nothing(children: list[Child]) -> None:
    return None


@dataclass(frozen=True)
class Policy:
    """How one supervisor treats its services (``traci up`` and ``traci serve`` differ here).

    ``restart``: the config's ``launcher`` section (on-failure or never, max_restarts,
    restart_delay). ``pid_file``: rewritten at every start and restart. ``console``: says what
    happens. ``started``: the line printed once every service is started. ``done``: asked every
    tick, True when the run has finished (``watch`` returns 0 once the others exit, ``GRACE`` at
    most). ``on_tick``: every tick the run goes on. ``serving`` (``traci serve``): an expert
    that fails for good is left down instead of ending the watch (1); a service exiting 0 is
    restarted like a failure (training: it has ended its part); a config, checkpoint or data
    error (``HOPELESS``) is restarted too (training: never, first start or not); the pid file
    lists the running services only (training: every one started).
    """

    restart: LauncherConfig
    pid_file: Path
    console: Console
    started: str
    done: Callable[[list[Child]], bool] = _never
    on_tick: Callable[[list[Child]], None] = _nothing
    serving: bool = False

    def expendable(self, child: Child) -> bool:
        """Left down when it fails for good while serving: an expert (the broker masks it),
        the HTTP translator (the front door answers on)."""
        return self.serving and (child.name.startswith("expert-") or child.name == "http")


def service_env() -> dict[str, str]:
    """The environment every service (and the zygote) starts with."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}
    # pyarrow's allocator, fixed at its import: the system one gives a party file's read
    # buffers back to the OS (mimalloc keeps ~40 MiB of a 2M-row read; bench data section)
    env.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    return env


def start_zygote(config: Config, name: str = "zygote") -> Zygote | None:
    """A zygote (``app/zygote.py``) importing what this run's services need, logging to
    ``logs/<name>.log``; None where fork is not the way to start processes (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    from traci_ml.app.zygote import Zygote, modules_for

    run = RunDir(config.run_path)
    run.logs.mkdir(parents=True, exist_ok=True)
    try:
        return Zygote(modules_for(config.data.source), service_env(), run.log(name))
    except OSError as exc:  # every service then starts as a plain process
        log.warning("no zygote (%s): each service imports torch itself", exc)
        return None


def children(
    config: Config,
    config_file: Path,
    *,
    resume: bool = False,
    gpus: int = 0,
    serve: bool = False,
    fork: bool = False,
) -> list[Child]:
    """Broker, reducer and one process per expert, each reading ``config_file`` (serving: and
    ``traci http`` with ``serve.http_port`` or ``serve.grpc_port``). ``resume``: the
    first start continues from the checkpoints (a restart always does); ``gpus``: experts spread
    over that many GPUs; ``serve``: every one started with ``--serve`` (a restart runs the same
    command: serving always loads the latest checkpoint), logging to ``logs/serve-<name>.log``;
    ``fork``: the reducer and the experts are forked from a zygote started now, which imports
    torch and the services once for all of them (``app/zygote.py``; ``supervise`` ends it);
    the broker, which imports no torch, starts at once as a new process."""
    from traci_ml.core.data import expert_count

    n = expert_count(config)
    run = RunDir(config.run_path)
    base = [sys.executable, "-m", "traci_ml.app.cli"]
    env = service_env()
    zygote = start_zygote(config, "serve-zygote" if serve else "zygote") if fork else None
    first = ["--resume"] if resume else []
    specs = [("broker", ["broker"], False), ("reducer", ["reducer"], True)]
    specs += [(f"expert-{i}", ["expert", "--id", str(i)], True) for i in range(n)]
    if serve and (config.serve.http_port or config.serve.grpc_port):
        specs.append(("http", ["http"], False))  # the Open Inference Protocol (app/http_v2)
    out = []
    for name, command, resumable in specs:
        argv = [*base, *command, "--config", str(config_file)]
        child_env = dict(env)
        if gpus and name.startswith("expert-"):
            child_env["CUDA_VISIBLE_DEVICES"] = str(int(name.split("-")[1]) % gpus)
        fork = zygote if name not in ("broker", "http") else None
        if serve:
            argv.append("--serve")
            out.append(Child(name, argv, argv, run.log(f"serve-{name}"), child_env, fork))
            continue
        out.append(Child(
            name, argv + (first if resumable else []),
            argv + (["--resume"] if resumable else []), run.log(name), child_env, fork,
        ))  # fmt: skip
    return out


def supervise(children: list[Child], policy: Policy) -> int | None:
    """Start every child, ``watch`` them, then stop them all. The watch's exit code; None when
    interrupted (Ctrl-C or SIGTERM), after saying so."""
    write_pids(children, policy)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for child in children:
            child.start()
        write_pids(children, policy)
        policy.console.line(policy.started)
        return watch(children, policy)
    except KeyboardInterrupt:
        policy.console.line("interrupted: stopping every service")
        return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_all(children)
        for zygote in {id(c.zygote): c.zygote for c in children if c.zygote}.values():
            zygote.close()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def write_pids(children: list[Child], policy: Policy) -> None:
    """The pid of every service (``policy.pid_file``; for operators and fault tests)."""
    pids = {
        c.name: c.pid
        for c in children
        if c.pid is not None and (not policy.serving or c.code is None)
    }
    write_json_atomic(policy.pid_file, pids)


def watch(children: list[Child], policy: Policy) -> int:
    """Restart what fails, with back-off, until the run is done (0) or a service that is not
    expendable fails for good (1)."""
    settings = policy.restart
    gone: set[str] = set()  # expendable services that failed for good: left down
    while True:
        now = time.monotonic()
        for child in children:
            if child.name in gone:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.start()
                    write_pids(children, policy)
                continue
            code = child.code
            if code is None or (code == 0 and not policy.serving):
                continue
            if (
                settings.restart == "never"
                or child.restarts >= settings.max_restarts
                or (not policy.serving and code in HOPELESS)
            ):
                policy.console.gave_up(child, code)
                if not policy.expendable(child):
                    return 1
                gone.add(child.name)  # e.g. an expert the broker masks while serving
                write_pids(children, policy)
                continue
            child.restarts += 1
            child.streak = 1 if now - child.started_at >= STABLE else child.streak + 1
            delay = settings.restart_delay * 2 ** (child.streak - 1)
            child.restart_at = now + delay
            policy.console.restarted(child.name, code, child.restarts, settings.max_restarts, delay)
        if policy.done(children):
            deadline = time.monotonic() + GRACE
            while time.monotonic() < deadline and any(c.code is None for c in children):
                time.sleep(POLL)
            return 0
        policy.on_tick(children)
        time.sleep(POLL)


def stop_all(children: list[Child], timeout: float = 10.0) -> None:
    """SIGTERM to every service; after ``timeout`` seconds SIGKILL to those still running."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs: killing it", child.name, timeout)
            child.proc.kill()
            child.proc.wait()
        if child.log_file is not None:
            child.log_file.close()
