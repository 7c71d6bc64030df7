"""bench.quality's plumbing: tables offline, the CSV TRACI reads, its split, the baselines on a
tiny table, the split check and the report (no TRACI run, no timing, no score of a long run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.quality import aggregate, line, ratios, split_note, summary_lines
from bench.quality_tables import (
    TABLES,
    Table,
    baselines,
    check_split,
    even_views,
    load_table,
    score,
    split_data,
    table_config,
    traci_score,
    write_csv,
)
from traci_ml.core.config import Config, validate
from traci_ml.core.data import load_dataset

SHAPES = {"digits": (1797, 64), "breast_cancer": (569, 30), "wine": (178, 13),
          "iris": (150, 4), "diabetes": (442, 10), "friedman1": (2000, 10)}  # fmt: skip


def tiny(task: str, n: int = 40, seed: int = 0) -> Table:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)) * [1, 10, 100, 0.1, 3] + 7
    if task == "classification":
        y = np.where(x[:, 0] > 7, "yes", "no")
    else:
        y = 2.0 * x[:, 0] - 0.03 * x[:, 1] + 0.01 * rng.standard_normal(n)
    return Table("tiny", task, "test", ("a b", "c", "d", "e", "f"), x, y)


@pytest.mark.parametrize("name", TABLES)
def test_every_table_is_offline_and_has_its_shape(name: str) -> None:
    t = load_table(name)
    assert t.x.shape == SHAPES[name] and len(t.y) == len(t.x)
    assert len(set(t.columns)) == len(t.columns)
    assert all(c.replace("_", "").isalnum() for c in t.columns)  # plain CSV header names
    assert t.task == ("regression" if name in ("diabetes", "friedman1") else "classification")


def test_views_split_the_columns_like_the_default_run() -> None:
    cols = tuple(f"c{i}" for i in range(10))
    views = even_views(cols)
    assert [len(v["columns"]) for v in views] == [3, 3, 2, 2]
    assert [c for v in views for c in v["columns"]] == list(cols)
    assert [len(v["columns"]) for v in even_views(("a", "b"))] == [1, 1]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_csv_is_what_traci_reads_and_the_split_is_its_own(task: str, tmp_path: Path) -> None:
    t = tiny(task)
    cfg = table_config(t, write_csv(t, tmp_path / "t.csv"), tmp_path / "run")
    config = validate(cfg)
    # every key but the data section, the run directory and ports keeps its default
    default = Config()
    for section in ("expert", "reducer", "train", "join"):
        assert getattr(config, section) == getattr(default, section)
    assert config.embed_dim == default.embed_dim and config.seed == default.seed
    data = split_data(cfg)
    x = t.x.astype(np.float32)  # TRACI's reader: float32 cells, written exactly
    assert np.array_equal(data["x_train"], x[data["train"]])
    assert np.array_equal(data["x_test"], x[data["test"]])
    ds = load_dataset(config)  # what the services load: the same rows in the same order
    assert np.array_equal(ds.ids_train, data["train"]) and np.array_equal(ds.ids_test, data["test"])
    if task == "regression":
        assert np.allclose(data["y_test"], t.y[data["test"]], rtol=1e-6)
    else:
        assert list(data["y_test"]) == [["no", "yes"].index(v) for v in t.y[data["test"]]]


def test_digits_keeps_the_default_data_section(tmp_path: Path) -> None:
    cfg = table_config(load_table("digits"), None, tmp_path / "run")
    assert "data" not in cfg
    assert validate(cfg).data == Config().data
    assert len(split_data(cfg)["test"]) == round(1797 * Config().data.test_fraction)


def test_check_split_accepts_the_test_rows_and_nothing_else() -> None:
    test = np.array([7, 2, 9])
    scored = [{"row": str(i), "id": str(t)} for i, t in enumerate(test)]
    check_split(test, scored)
    check_split(test, scored[::-1])  # order in the file does not matter, the mapping does
    with pytest.raises(RuntimeError, match="1 of 3 differ"):
        check_split(test, [*scored[:2], {"row": "2", "id": "3"}])
    with pytest.raises(RuntimeError, match="other rows"):
        check_split(test, scored[:2])


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_baselines_fit_on_a_tiny_table(task: str, tmp_path: Path) -> None:
    t = tiny(task, n=120)
    data = split_data(table_config(t, write_csv(t, tmp_path / "t.csv"), tmp_path / "run"))
    out = baselines(task, data)
    assert set(out) == {"linear", "boosting"}
    assert "StandardScaler" in out["linear"]["model"]
    if task == "classification":
        assert out["linear"]["accuracy"] >= 0.9  # one standardised column decides
    else:
        assert out["linear"]["r2"] > 0.99 and out["linear"]["rmse"] < 0.1
    assert all(v["fit_s"] >= 0 for v in out.values())


def test_traci_scores_like_the_baselines() -> None:
    rows = [{"label": "a", "prediction": "a"}, {"label": "b", "prediction": "a"}]
    assert traci_score("classification", rows) == {"accuracy": 0.5}
    reg = [{"label": "1", "prediction": "1.5"}, {"label": "3", "prediction": "2.5"}]
    got = traci_score("regression", reg)
    assert got == score("regression", np.array([1.0, 3.0]), np.array([1.5, 2.5]))
    assert got == pytest.approx({"r2": 0.75, "rmse": 0.5})


def _run(table: str, task: str, seed: int, traci: float, linear: float) -> dict:
    m = "accuracy" if task == "classification" else "r2"
    fig = (lambda v: {m: v, "rmse": 1 - v}) if m == "r2" else (lambda v: {m: v})
    return {
        "table": table, "task": task, "source": "s", "seed": seed, "rows": 10, "features": 2,
        "train_rows": 8, "test_rows": 2, "experts": 2, "steps": 5, "val_fraction": 0.1,
        "traci": {**fig(traci), "wall_s": 1.0, "train_s": 0.5, "summary_test": {},
                  "best": None, "stop": "steps_exhausted", "final_train_loss": 0.1,
                  "evals": []},
        "linear": {**fig(linear), "fit_s": 0.1, "model": "Ridge"},
        "boosting": {**fig(0.5), "fit_s": 0.1, "model": "HGB"},
    }  # fmt: skip


def test_the_report_averages_seeds_and_judges_the_bar() -> None:
    ok = aggregate([_run("a", "classification", 0, 0.9, 0.8), _run("a", "classification", 1,
                                                                    0.7, 0.8)])  # fmt: skip
    assert ok["traci"]["accuracy"] == pytest.approx(0.8) and ok["meets_linear"]
    assert ok["traci"]["per_seed"]["accuracy"] == [0.9, 0.7] and ok["seeds"] == [0, 1]
    low = aggregate([_run("b", "regression", 0, 0.4, 0.5)])
    assert low["metric"] == "r2" and not low["meets_linear"]
    result = {"rows": [ok, low], "seeds": [0, 1], "below_linear": ["b"], "split": "same",
              "loadavg_start": (1.0, 1.0, 1.0), "loadavg_end": (2.0, 2.0, 2.0)}  # fmt: skip
    got = ratios(result)
    assert got["quality_worst_margin_vs_linear"] == pytest.approx(-0.1)
    assert got["quality_below_linear"] == ["b"]
    text = "\n".join(summary_lines(result))
    assert "BELOW linear" in text and "MISSED on b" in text and "load average" in text


def test_the_split_note_says_where_traci_held_rows_out() -> None:
    assert "val_fraction" not in split_note([{"val_fraction": 0.0}])
    assert "data.val_fraction 0.1" in split_note([{"val_fraction": 0.1}, {}])


def test_a_row_names_the_step_model_selection_picked() -> None:
    r = _run("a", "classification", 0, 0.9, 0.8)
    assert "best step" not in line(aggregate([r]))
    r["traci"]["best"] = {"round": 1, "step": 500}
    assert "best step 500" in line(aggregate([r]))
