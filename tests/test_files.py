"""traci_ml.core.files: a run's files are whole or absent."""

from __future__ import annotations

import json

import pytest

from traci_ml.core.files import replacing, write_atomic, write_json_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json_atomic(path, {"b": 1, "a": 2})
    assert json.loads(path.read_text()) == {"a": 2, "b": 1} and path.read_text().endswith("\n")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"a": 2, "b": 1}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_bytes_text_and_durable_writes(tmp_path):
    write_atomic(tmp_path / "b.bin", b"\x00\x01", durable=True)
    write_atomic(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t.txt").read_text() == "héllo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "t.txt"]
