"""The data section's structure on tiny sizes: alignment (plain and psi) checked right, and
one party's load in a fresh process with its RSS figures. No time is asserted."""

from __future__ import annotations

import numpy as np
import pytest

from bench import data


def test_id_sets_share_exactly_the_overlap():
    labels, expert, shared = data.id_sets(1000)
    assert len(labels) == len(expert) == 1000 and shared == 700
    assert len(np.intersect1d(labels, expert)) == 700
    assert len(np.unique(labels)) == len(np.unique(expert)) == 1000


def test_alignment_cells_plain_and_psi():
    out = data.align((2000,), repeats=2)
    assert out["overlap"] == 0.7 and out["id_type"] == "int"
    cells = {c["mode"]: c for c in out["cells"]}
    assert set(cells) == {"plain", "psi"}
    assert cells["plain"]["repeats"] == 2 and cells["psi"]["repeats"] == 1  # psi: largest once
    for c in cells.values():
        assert c["ids"] == 2000 and c["labelled"] == 1400 and sum(c["held"]) == 1400
        assert c["correct"] is True
        for key in ("total_s", "expert_s", "holder_s", "wire_s"):
            assert set(c[key]) == {"median", "min", "max", "n"} and c[key]["n"] == c["repeats"]
        assert c["request_bytes"] > 0 and c["answer_bytes"] > 0
    assert cells["plain"]["request_bytes"] >= 2000 * 8  # the ids as int64
    assert cells["psi"]["request_bytes"] >= 2000 * 32  # one point per id
    assert "held 1,400 = overlap" in data.fmt_align(cells["psi"])


def test_a_wrong_alignment_fails_loudly():
    labels, expert, shared = data.id_sets(500)
    r = data.exchange(labels, expert, "plain")
    data.check_alignment(r["rows"], r["row_map"], expert, shared, "plain")
    with pytest.raises(RuntimeError, match="true overlap"):
        data.check_alignment(r["rows"], r["row_map"], expert, shared + 1, "plain")
    shuffled = expert[::-1].copy()  # same ids, other rows: every position is wrong
    with pytest.raises(RuntimeError, match="wrong ids"):
        data.check_alignment(r["rows"], r["row_map"], shuffled, shared, "plain")


def test_load_of_each_party_in_a_fresh_process(tmp_path):
    info = data.dataset(20_000, parties=2, features=8, cache=tmp_path)
    assert not info["cached"] and data.dataset(20_000, parties=2, features=8,
                                               cache=tmp_path)["cached"]  # fmt: skip
    out = data.load(info)
    assert out["dataset"]["rows"] == 20_000 and out["dataset"]["parties"] == 2
    assert out["budget_ratio"] == 2.0 and len(out["experts"]) == 2
    for k, r in enumerate(out["experts"]):
        assert r["expert"] == k and r["rows"] == 14_000 and r["columns"] == 4
        assert sum(r["held"]) == r["rows"]  # every party id is labelled
        assert set(r["seconds"]) == set(r["steps"]) == {"load", "align", "standardise"}
        assert r["own_float32_mib"] == pytest.approx(14_000 * 4 * 4 / 2**20)
        assert r["peak_rss_mib"] >= r["baseline_rss_mib"] > 0
        assert r["rss_ratio"] == pytest.approx(r["peak_minus_baseline_mib"] / r["own_float32_mib"])
        assert r["over_budget"] == (r["rss_ratio"] >= 2.0)
        assert set(r["peak_added_mib"]) == {"load", "align", "standardise"}
    assert out["max_rss_ratio"] == max(r["rss_ratio"] for r in out["experts"])
    lines = data.summary_lines({"load": out})
    assert len(lines) == 3 and "rss_ratio" in lines[1]
