"""Start a local cluster from Python (a notebook, a script): what ``traci up`` does.

    from traci_ml import LocalCluster

    with LocalCluster("examples/heterogeneous.yaml", overrides={"train.steps": 200}) as run:
        summary = run.wait()            # blocks until training ends; raises if it failed
    print(summary["test_accuracy"], run.run_path)

``LocalCluster`` runs ``traci up`` as a child process (its own signal handling and process
supervision stay intact, and a notebook kernel is never blocked by a service), validates the
config before it starts (a bad key raises ``ConfigError`` here, naming the key), and lets you
follow training while it runs (``records()``, ``last()``, ``output``). ``progress=True``
prints ``traci up``'s lines as they come (the phases, the experts it waits for, a status line
every two seconds, each evaluation), so ``wait()`` in a notebook cell shows the run.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from traci_ml.core.config import Config, load_config, validate
from traci_ml.core.errors import TraciError
from traci_ml.core.rundir import RunDir

TRACI = [sys.executable, "-m", "traci_ml.app.cli"]


class LocalCluster:
    """Broker, reducer and one process per expert on this machine, supervised by ``traci up``.

    ``config`` is a YAML path, a mapping (the YAML's content) or a ``Config``; ``None`` is the
    built-in digits run. ``overrides`` are ``--set`` items (``{"train.steps": 200}``).
    ``fresh`` clears the run directory first, ``resume`` continues from its checkpoints.
    ``progress``: ``True`` prints ``traci up``'s progress lines to stdout as they come, a
    file object gets them instead; ``False`` keeps them in ``output`` only.
    """

    def __init__(
        self,
        config: str | Path | Mapping[str, Any] | Config | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
        fresh: bool = False,
        resume: bool = False,
        progress: bool | TextIO = False,
    ) -> None:
        if fresh and resume:
            raise TraciError("LocalCluster: fresh and resume exclude each other")
        sets = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (overrides or {}).items()}
        if config is None or isinstance(config, str | Path):
            self.config_path = None if config is None else Path(config)
        else:
            resolved = config if isinstance(config, Config) else validate(config)
            tmp = tempfile.mkdtemp(prefix="traci-")
            weakref.finalize(self, shutil.rmtree, tmp, ignore_errors=True)
            self.config_path = Path(tmp) / "config.yaml"
            self.config_path.write_text(yaml.safe_dump(resolved.to_dict(), sort_keys=False))
        self.config = load_config(self.config_path, overrides=sets)  # errors name the key now
        self.argv = [*TRACI, "up"] + ([str(self.config_path)] if self.config_path else [])
        self.argv += [f"--set={k}={v}" for k, v in sets.items()]
        self.argv += ["--fresh"] if fresh else ["--resume"] if resume else []
        self.progress = progress
        self.proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    @property
    def run_path(self) -> Path:
        return self.config.run_path

    # -- running ------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        if self.proc is not None:
            raise TraciError("LocalCluster already started")
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self._reader = threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        return self

    def _drain(self, stream) -> None:  # a full pipe must never block the supervisor
        out = sys.stdout if self.progress is True else self.progress or None
        with stream:
            for line in stream:
                self._lines.append(line)
                if out is not None:
                    print(line, end="", file=out, flush=True)

    @property
    def output(self) -> str:
        """Everything ``traci up`` printed so far."""
        return "".join(self._lines)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the run ends; its ``summary.json``. Raises ``TraciError`` with the last
        output if it failed, ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        if self.proc is None:
            self.start()
        assert self.proc is not None
        self.proc.wait(timeout=timeout)
        self._join_reader()
        if self.proc.returncode != 0:
            raise TraciError(f"traci up exited with {self.proc.returncode}:\n{self.output[-3000:]}")
        return self.summary()

    def stop(self, timeout: float = 60) -> int | None:
        """Ctrl-C the run (services checkpoint and stop); its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._join_reader()
        return self.proc.returncode

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=30)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- following ----------------------------------------------------------------------

    def records(self, kind: str | None = "train") -> list[dict[str, Any]]:
        """The reducer's ``metrics.jsonl`` records of this kind ("train", "eval"; None: all)."""
        path = RunDir(self.run_path).metrics
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line being written
            if kind is None or rec.get("kind") == kind:
                out.append(rec)
        return out

    def last(self, kind: str = "train") -> dict[str, Any] | None:
        recs = self.records(kind)
        return recs[-1] if recs else None

    def summary(self) -> dict[str, Any]:
        path = RunDir(self.run_path).summary
        try:
            return json.loads(path.read_text())
        except OSError:
            raise TraciError(f"{path} does not exist (has the run finished?)") from None
