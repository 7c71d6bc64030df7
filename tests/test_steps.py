"""Progress of a long command (traci_ml/app/steps.py): a line per step where the output is not
a terminal, a spinner and a tick with the time where it is, nothing from Steps.quiet()."""

from __future__ import annotations

import io
import re

import pytest

from traci_ml.app.steps import Steps


def test_plain_lines_one_per_step_and_where_the_time_went():
    out = io.StringIO()
    steps = Steps("traci export", out)
    with steps.step("loading runs/x"):
        pass
    with steps.step("exporting (the slow part)"):
        pass
    assert out.getvalue().splitlines() == [
        "traci export: loading runs/x",
        "traci export: exporting (the slow part)",
    ]
    assert re.fullmatch(r"[\d.]+s: loading runs/x [\d.]+s, exporting [\d.]+s", steps.times())


def test_a_terminal_gets_a_spinner_then_a_tick_with_the_time():
    out = io.StringIO()
    steps = Steps("traci export", out, live=True)
    with steps.step("exporting the model"):
        pass
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "exporting the model 0s" in text  # the spinner's line, erased when done
    assert re.search(r"✓ exporting the model \d+\.\ds", text)
    assert "traci export: " not in text


def test_a_failing_step_is_timed_and_the_error_goes_on():
    steps = Steps("traci export", io.StringIO())
    with pytest.raises(ValueError), steps.step("tracing"):
        raise ValueError("no")
    assert [what for what, _ in steps.done] == ["tracing"]


def test_quiet_says_nothing(capsys):
    steps = Steps.quiet()
    with steps.step("anything"):
        pass
    assert capsys.readouterr() == ("", "")
