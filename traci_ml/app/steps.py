"""Progress of a command that would otherwise be silent for many seconds (``traci export``).

``Steps(command)`` names each step as it begins: on a terminal a spinner with the step and
its running time (a tick and the time once it is done), elsewhere one line per step
(``traci export: exporting ...``), on stderr so stdout stays the command's own. ``times()``
says where the time went. ``Steps.quiet()`` says nothing (the Python API's default).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO


class Steps:
    def __init__(self, command: str, out: TextIO | None = None, *, live: bool | None = None):
        self.command = command
        self.out = out if out is not None else sys.stderr
        self.live = bool(live if live is not None else _terminal(self.out))
        self.done: list[tuple[str, float]] = []
        self.started = time.monotonic()
        self.silent = False

    @classmethod
    def quiet(cls) -> Steps:
        steps = cls("", live=False)
        steps.silent = True
        return steps

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """One step: said when it begins, timed until it ends (or fails)."""
        start = time.monotonic()
        live = None
        if self.silent:
            pass
        elif self.live:
            live = self._spinner(what, start)
        else:
            print(f"{self.command}: {what}", file=self.out, flush=True)
        try:
            yield
        finally:
            took = time.monotonic() - start
            self.done.append((what, took))
            if live is not None:
                live.stop()
                live.console.print(f"[green]✓[/] {what} [dim]{took:.1f}s[/]", highlight=False)

    def _spinner(self, what: str, start: float) -> Any:
        from rich.console import Console
        from rich.live import Live
        from rich.spinner import Spinner

        def render() -> Any:
            return Spinner("dots", text=f"{what} {time.monotonic() - start:.0f}s", style="cyan")

        console = Console(file=self.out, force_terminal=True)  # a terminal, or asked for one
        live = Live(console=console, get_renderable=render, transient=True,
                    refresh_per_second=8, redirect_stdout=False, redirect_stderr=False)  # fmt: skip
        live.start()
        return live

    def times(self) -> str:
        """``44.1s: loading 2.0s, exporting 35.1s, ...``: the whole and each step."""
        each = ", ".join(f"{what.split(' (')[0]} {took:.1f}s" for what, took in self.done)
        return f"{time.monotonic() - self.started:.1f}s" + (f": {each}" if each else "")


def _terminal(out: TextIO) -> bool:
    from rich.console import Console

    return bool(getattr(out, "isatty", lambda: False)()) and not Console(file=out).is_dumb_terminal
