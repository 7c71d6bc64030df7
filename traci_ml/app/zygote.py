"""Start services by forking one process that has already imported them (Linux).

Every expert and the reducer imports torch and the service code before it can register:
~3-5 s of one core each (``bench/startup.py``), paid by five processes at once on a small
machine. ``traci up`` and ``traci serve`` instead start one *zygote*
(``python -m traci_ml.app.zygote MODULE...``) that imports those modules once, then forks a
process per service on request. A forked service runs exactly what ``python -m
traci_ml.app.cli ARGS`` runs (``cli.main(ARGS)``), in its own session, with its own
environment and log, and exits like a normal interpreter (threads joined, ``atexit`` run).

The zygote never runs torch: it only imports. On a torch build with a GPU backend it leaves
out ``torch._dynamo`` (imported by ``torch.optim`` at the first optimizer) so that nothing
touches the driver before a fork. It dies with the launcher (``PR_SET_PDEATHSIG``), and its
services die with it (``core.signals.die_with_parent``). A service the zygote cannot start
(the zygote gone) is started as a plain child process instead.

Protocol, one JSON object per line: the launcher writes ``{"name", "argv", "env", "log"}``
to the zygote's stdin; the zygote answers ``{"ready": seconds}`` once after its imports,
``{"pid": N}`` per request, and ``{"exit": N, "code": C}`` when a service ends (C as
``subprocess``'s ``returncode``: negative for a signal).
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from traci_ml.core.signals import PARENT_ENV

CLI = "traci_ml.app.cli"
# What every expert and the reducer imports before it can register.
SERVICES = (CLI, "traci_ml.services.expert.main", "traci_ml.services.reducer.main")
GPU_UNSAFE = ("torch._dynamo",)  # imported only where torch has no GPU backend
PATIENCE = 300.0  # seconds a first request waits for the imports before the zygote is dropped


def modules_for(source: str) -> list[str]:
    """The modules a zygote imports for a run whose data comes from ``source``."""
    extra = {"parties": ["traci_ml.core.data.parties"]}
    return [*SERVICES, *GPU_UNSAFE, *extra.get(source, [])]


# -- the launcher's end ------------------------------------------------------------------


class Zygote:
    """A running zygote, seen from the launcher: ``spawn`` forks a service."""

    def __init__(self, modules: list[str], env: dict[str, str], log_path: Path) -> None:
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "traci_ml.app.zygote", *modules],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
            start_new_session=True,  # a terminal's Ctrl-C is the launcher's to handle
        )  # fmt: skip
        self.ready_after: float | None = None  # seconds its imports took
        self._cond = threading.Condition()
        self._pids: list[int] = []
        self._codes: dict[int, int] = {}
        self._gone = False
        self._reader = threading.Thread(target=self._read, name="zygote", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                if "ready" in msg:
                    self.ready_after = float(msg["ready"])
                elif "pid" in msg:
                    self._pids.append(int(msg["pid"]))
                elif "exit" in msg:
                    self._codes[int(msg["exit"])] = int(msg["code"])
                self._cond.notify_all()
        with self._cond:
            self._gone = True
            self._cond.notify_all()

    def spawn(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> Forked | None:
        """Fork ``python -m traci_ml.app.cli ARGS`` (``argv``'s tail) as a service logging to
        ``log``; None when the zygote cannot (gone, or ``argv`` is not a traci command)."""
        if argv[1:3] != ["-m", CLI] or self._gone:
            return None
        request = {"name": name, "argv": argv[3:], "env": env, "log": str(log)}
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            return None
        with self._cond:  # waits out the zygote's imports on the first request
            self._cond.wait_for(lambda: self._pids or self._gone, PATIENCE)
            if self._pids:
                return Forked(self, self._pids.pop(0))
        if not self._gone:  # stuck: nothing more from it (a late fork would double a service)
            self.proc.kill()
            self._gone = True
        return None

    def code(self, pid: int) -> int | None:
        with self._cond:
            if pid in self._codes:
                return self._codes[pid]
            if not self._gone:
                return None
        try:  # the zygote is gone: its services were sent SIGTERM (die_with_parent)
            os.kill(pid, 0)
            return None
        except ProcessLookupError:
            return 255  # ended, with a code nobody can read any more
        except PermissionError:
            return None

    def wait(self, pid: int, timeout: float | None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._codes or self._gone, timeout)
        return self.code(pid)

    def close(self) -> None:
        """End the zygote (its stdin closed); services still running get SIGTERM."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


class Forked:
    """A forked service, with the part of ``subprocess.Popen`` the supervisor uses."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self.zygote, self.pid = zygote, pid

    @property
    def returncode(self) -> int | None:
        return self.zygote.code(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self.zygote.wait(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# -- the zygote --------------------------------------------------------------------------


def _preload(modules: list[str]) -> None:
    for name in modules:
        if name in GPU_UNSAFE and not _cpu_only_torch():
            continue
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 -- the service that needs it says why, in its log
            print(f"zygote: {name} not imported", file=sys.stderr)


def _cpu_only_torch() -> bool:
    torch = sys.modules.get("torch")
    version = getattr(torch, "version", None)
    return (
        version is not None
        and not getattr(version, "cuda", None)
        and not getattr(version, "hip", None)
    )


def _write(fd: int, msg: dict[str, Any]) -> None:
    os.write(fd, (json.dumps(msg) + "\n").encode())


def serve(modules: list[str]) -> dict[str, Any]:
    """The zygote's loop. Returns only in a forked child: the request it is to run."""
    from traci_ml.core.signals import die_with_parent

    die_with_parent()  # the launcher gone: SIGTERM ends us, and our services with us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    started = time.monotonic()
    _preload(modules)
    import gc

    gc.freeze()  # imported objects stay where they are: fewer pages copied per child
    took = time.monotonic() - started
    print(f"zygote: imported {', '.join(modules)} in {took:.2f}s", file=sys.stderr, flush=True)
    replies = os.dup(1)
    _write(replies, {"ready": round(took, 3)})
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    pending = b""
    while True:
        ready, _, _ = select.select([0, wake_r], [], [])
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 4096):
                        break
                except BlockingIOError:
                    break
            _reap(replies)
        if 0 not in ready:
            continue
        data = os.read(0, 65536)
        if not data:  # the launcher is done with us
            sys.exit(0)
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _become(request, (wake_r, wake_w, replies))
                return request
            _write(replies, {"pid": pid})


def _reap(replies: int) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _write(replies, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _become(request: dict[str, Any], fds: tuple[int, ...]) -> None:
    """In a forked child: drop the zygote's state, take the service's session, stdio, env."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in fds:
        os.close(fd)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[PARENT_ENV] = str(os.getppid())  # the zygote: die_with_parent watches it
    try:  # what ps and top show (/proc/PID/comm, 15 bytes)
        import ctypes

        ctypes.CDLL(None).prctl(15, request["name"].encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    request = serve(argv)
    cli = importlib.import_module(CLI)  # by name, as `python -m` would: run, not depended on
    sys.argv = [cli.__file__ or CLI, *request["argv"]]
    return cli.main(request["argv"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
