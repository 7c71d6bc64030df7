"""What ``traci up`` shows while it runs: a live view on a terminal, plain lines elsewhere.

The launcher (``app/launcher.py``, ``Progress``) keeps a ``RunState`` up to date from the
services' processes, the broker's and the reducer's metrics and ``metrics.jsonl``; a view
shows it. ``LiveView`` (``rich``, on a terminal): the phase with a spinner, a progress bar
with the rate, loss and the last eval metric, the experts (registered or missing, running,
restarting) and live experts at the broker. ``PlainView`` (a pipe, a log file, CI): one line
per phase change, the experts still missing by name, a status line every few seconds while
training, one line per eval record. Both are the supervisor's ``Console``: its lines
(restarts, failures with their log tails) come out through the view.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from traci_ml.app.supervisor import Console

STARTING = "starting services"
WAITING = "waiting for experts"
TRAINING = "training"
EVALUATING = "evaluating"
PLOTTING = "plotting"
DONE = "done"


@dataclass(frozen=True)
class RunState:
    """One look at a training run (``traci up``)."""

    phase: str = STARTING
    steps: int = 0  # train.steps
    batch_size: int = 0  # train.batch_size (the eta)
    step: int = 0  # the last train step the reducer took (metrics, else metrics.jsonl)
    n_experts: int = 0
    processes: dict[str, str] = field(default_factory=dict)  # name -> running, restarting..
    registered: tuple[int, ...] | None = None  # experts the broker holds (None: unknown)
    reducer_registered: bool | None = None
    live: int | None = None  # experts alive at the broker
    loss: float | None = None
    samples_per_sec: float | None = None
    metric: str = "accuracy"
    eval_value: float | None = None
    eval_step: int | None = None
    restarts: int = 0
    elapsed: float = 0.0  # seconds since traci up started
    first_step_after: float | None = None  # seconds from start to the first training step

    def missing(self) -> list[str]:
        """Experts not registered at the broker (by the broker's metrics), else not running."""
        names = [f"expert-{i}" for i in range(self.n_experts)]
        if self.registered is not None:
            return [n for i, n in enumerate(names) if i not in self.registered]
        return [n for n in names if self.processes.get(n) != "running"]

    def waiting_line(self) -> str:
        missing = self.missing()
        if self.registered is None:
            who = f"{', '.join(missing)} not running; " if missing else ""
            return f"{WAITING}: {who}who has registered is unknown (metrics.broker_port 0)"
        reducer = "" if self.reducer_registered is None else (
            "; reducer registered" if self.reducer_registered else "; reducer not registered"
        )  # fmt: skip
        done = self.n_experts - len(missing)
        return f"{WAITING}: {', '.join(missing) or 'none'} missing ({done}/{self.n_experts} " \
            f"registered{reducer})"  # fmt: skip

    def status_line(self) -> str:
        """The periodic line of the plain view (the shape ``traci up`` always printed)."""
        parts = [f"step {self.step:>5}/{self.steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.samples_per_sec is not None:
            parts.append(f"{self.samples_per_sec:,.0f} samples/s")
        if self.eval_value is not None:
            parts.append(f"eval {self.metric} {self.eval_value:.4f}")
        experts = [n for n in self.processes if n.startswith("expert-")]
        running = sum(self.processes[n] == "running" for n in experts)
        parts.append(
            f"experts {running}/{len(experts)} running"
            + (f", {self.live} live at broker" if self.live is not None else "")
            + (f" | {self.restarts} restarts" if self.restarts else "")
        )
        if self.phase == EVALUATING:
            parts.append(EVALUATING)
        return " | ".join(parts)


class PlainView(Console):
    """Lines for a pipe or a log: phase changes, who is missing, a status line every
    ``every`` seconds while training, one line per eval record."""

    def __init__(self, out: TextIO, every: float = 2.0) -> None:
        super().__init__(out)
        self.every = every
        self.state = RunState()
        self._printed = float("-inf")
        self._waiting = ""

    def show(self, state: RunState) -> None:
        before, self.state = self.state, state
        if state.phase == WAITING:
            line = state.waiting_line()
            if line != self._waiting:  # on entering the phase and whenever it changes
                self._waiting = line
                self.line(line)
            return
        if state.phase != before.phase:
            self._entered(state, before)
        if state.phase in (TRAINING, EVALUATING):
            now = time.monotonic()
            if now - self._printed >= self.every:
                self._printed = now
                self.line(state.status_line())

    def _entered(self, state: RunState, before: RunState) -> None:
        if state.phase in (TRAINING, EVALUATING) and before.phase in (STARTING, WAITING):
            after = state.first_step_after  # (a first look may fall on an evaluation)
            when = f"; first step {after:.1f}s after start" if after is not None else ""
            self.line(f"{TRAINING}: {state.steps} steps{when}")
        if state.phase == EVALUATING and state.step >= state.steps:
            self.line(f"{EVALUATING}: training done at step {state.step}")
        elif state.phase == PLOTTING:
            self.line(f"{PLOTTING} {state.elapsed:.0f}s after start")

    def eval_record(self, record: dict[str, Any], metric: str) -> None:
        value = record.get(metric)
        what = f"{metric} {value:.4f}" if isinstance(value, int | float) else ""
        loss = record.get("loss")
        more = f" (loss {loss:.4f})" if isinstance(loss, int | float) else ""
        self.line(f"eval after step {record.get('step', '?')}: {what}{more}")

    def close(self) -> None:
        pass


class LiveView(PlainView):
    """A ``rich`` live display on a terminal; the supervisor's lines print above it."""

    def __init__(self, out: TextIO, *, console: Any = None) -> None:
        from rich.console import Console as RichConsole
        from rich.live import Live

        super().__init__(out)
        self._started = time.monotonic()
        self.console = console or RichConsole(file=out)
        self._live = Live(
            console=self.console, get_renderable=self._render, refresh_per_second=8,
            redirect_stdout=False, redirect_stderr=False, transient=False,
        )  # fmt: skip
        self._live.start()

    def line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def show(self, state: RunState) -> None:
        self.state = state  # read by _render from the refresh thread: one assignment

    def eval_record(self, record: dict[str, Any], metric: str) -> None:
        pass  # the panel shows the last one

    def close(self) -> None:
        if self._live.is_started:
            self._live.refresh()
            self._live.stop()

    def _render(self) -> Any:
        return render(replace(self.state, elapsed=time.monotonic() - self._started))


def render(state: RunState) -> Any:
    """The live panel for ``state`` (a rich renderable)."""
    from rich.progress_bar import ProgressBar
    from rich.spinner import Spinner
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 1))
    grid.add_column()
    title = Text(state.phase, style="bold").append(f"  {state.elapsed:.0f}s", style="dim")
    if state.phase == DONE:
        head: Any = Text("✓ ", style="green").append(title)
    else:
        head = Spinner("dots", text=title, style="cyan")
    grid.add_row(head)
    if state.phase == WAITING:
        grid.add_row(Text(state.waiting_line().split(": ", 1)[1], style="yellow"))
    if state.step or state.phase in (TRAINING, EVALUATING):
        bar = Table.grid(padding=(0, 1))
        rate = state.samples_per_sec
        eta = ""
        if rate and state.batch_size and state.phase == TRAINING:
            eta = f"eta {(state.steps - state.step) * state.batch_size / rate:.0f}s"
        bar.add_row(
            ProgressBar(total=max(state.steps, 1), completed=state.step, width=40),
            Text(f"{state.step}/{state.steps}"),
            Text(f"{rate:,.0f} samples/s" if rate else ""),
            Text(eta, style="dim"),
        )
        grid.add_row(bar)
        facts = []
        if state.loss is not None:
            facts.append(f"loss {state.loss:.4f}")
        if state.eval_value is not None:
            facts.append(f"eval {state.metric} {state.eval_value:.4f} (step {state.eval_step})")
        if state.first_step_after is not None:
            facts.append(f"first step {state.first_step_after:.1f}s after start")
        if facts:
            grid.add_row(Text("  ".join(facts)))
    grid.add_row(_experts(state))
    return grid


def _experts(state: RunState) -> Any:
    from rich.text import Text

    text = Text("experts ")
    missing = set(state.missing())
    for i in range(state.n_experts):
        name = f"expert-{i}"
        proc = state.processes.get(name, "starting")
        if state.phase in (PLOTTING, DONE) or proc == "exited":  # the run is over
            text.append(f"✓ {name} ", style="green")
        elif proc != "running":
            text.append(f"○ {name} ({proc}) ", style="red" if proc != "starting" else "dim")
        elif name in missing and state.phase in (STARTING, WAITING):
            text.append(f"○ {name} ", style="yellow")
        else:
            text.append(f"● {name} ", style="green")
    if state.live is not None and state.phase not in (PLOTTING, DONE):
        text.append(f"| {state.live}/{state.n_experts} live at broker", style="dim")
    if state.restarts:
        text.append(f" | {state.restarts} restarts", style="red")
    return text


def make_view(out: TextIO, *, live: bool | None = None) -> PlainView:
    """``LiveView`` when ``out`` is a terminal (``live=None``; not a dumb one), else
    ``PlainView``. A pipe or a file gets lines even where FORCE_COLOR would make ``rich``
    draw: redrawn frames in a log are noise."""
    if live is None:
        from rich.console import Console as RichConsole

        live = out.isatty() and not RichConsole(file=out).is_dumb_terminal
    return LiveView(out) if live else PlainView(out)
