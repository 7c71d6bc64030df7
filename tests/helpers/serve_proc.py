"""`traci serve` as a real child process for the integration tests: started with ``--set``
overrides, its output in a log beside the run, stopped with SIGINT (killed if it hangs)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

TRACI = [sys.executable, "-m", "traci_ml.app.cli"]


@contextlib.contextmanager
def traci_serve(
    run: Path, sets: dict[str, Any], log_name: str, args: Sequence[str] = ()
) -> Iterator[subprocess.Popen]:
    """``traci serve --run RUN --set k=v ... ARGS`` until the block ends; its output goes to
    ``RUN/../log_name``."""
    argv = [*TRACI, "serve", "--run", str(run), *(f"--set={k}={v}" for k, v in sets.items())]
    argv += args
    with (Path(run).parent / log_name).open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
