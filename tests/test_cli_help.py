"""`traci --help` speaks to users, and what `--help` says a command writes is what it writes
(issue 14: it showed the module's developer docstring; export named a file it never wrote)."""

from __future__ import annotations

import pytest

from traci_ml.app.cli import build_parser
from traci_ml.app.export import FORMATS


def subparser(name: str):
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices[name]


def test_top_level_help_is_for_users_not_the_module_docstring():
    text = build_parser().format_help()
    assert "TRACI" in text and "traci up CONFIG" in text
    assert "``" not in text  # reST markup of a docstring
    assert "Parses flags" not in text


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_export_help_names_the_file_export_writes(fmt):
    help_text = " ".join(subparser("export").format_help().split())
    assert f"RUN_DIR/{FORMATS[fmt]} ({fmt})" in help_text


def test_up_help_documents_gpus():
    assert "--gpus" in subparser("up").format_help()
